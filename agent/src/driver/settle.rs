//! Settling a migration whose source journalled COMMIT but never saw `Resumed` (SPEC.md §8.8
//! rule 3): ask the destination, on a fresh control connection, whether it committed, and keep
//! asking until it answers. Until then the VM stays stopped here: only the destination's "not
//! committed" may give it back, or two copies could run.

use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info, warn};
use trustmig_protocol::messages::Message;
use trustmig_protocol::order::{hex, OrderId, VerifiedOrder};
use trustmig_protocol::settlement::{Settle, VmAction};
use trustmig_protocol::AgentId;

use crate::backend;
use crate::backoff::Backoff;
use crate::ctx::{history_entry, Ctx};
use crate::driver::channel::SourceChannel;
use crate::error::AgentError;
use crate::journal::{Record, State};

/// First pause between unanswered settlement queries; it doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// Longest pause between unanswered settlement queries: a destination back from an outage
/// learns within a minute that its source waits, and an unreachable one costs one dial a minute.
const RETRY_MAX: Duration = Duration::from_secs(60);

/// What a settlement that gave the VM back means for it.
pub const NOT_MOVED: &str = "settled: the destination never committed";

/// What a settlement query found out.
#[derive(Debug)]
pub enum Settlement {
    /// The destination journalled COMMIT: the VM is its now. Journalled DONE here.
    Moved,
    /// The destination never committed and now never will: the source gives the VM back,
    /// paused when the machine's give-back says so (`Rules::give_back`).
    NotMoved {
        /// The VM stays paused: it was at the claim, or was handed over paused.
        paused_before: bool,
    },
    /// No answer (destination unreachable, ...): the VM stays stopped here, in doubt.
    InDoubt(String),
    /// The destination never committed, but the order was settled here meanwhile (by the
    /// operator): nothing to do.
    Meanwhile,
}

impl Settlement {
    /// What this means for the VM, for the operator.
    pub fn vm_state(&self) -> String {
        match self {
            Self::Moved => "moved: the destination confirmed it committed and owns the VM (settled after the session was lost)".into(),
            Self::NotMoved { .. } => NOT_MOVED.into(),
            Self::Meanwhile => "the destination never committed; the order was settled here meanwhile (by the operator)".into(),
            Self::InDoubt(why) => format!("committed: the source keeps the VM stopped, in doubt, and asks the destination again until it answers (settlement query failed: {why})"),
        }
    }
}

/// A source-side order at COMMIT whose outcome only its destination knows.
#[derive(Clone, Debug)]
pub struct InDoubt {
    /// The order.
    pub id: OrderId,
    /// Its VM.
    pub vm: String,
    /// The destination's identity.
    pub destination: AgentId,
    /// The destination's address.
    pub addr: String,
}

impl InDoubt {
    /// A source's journal record, when it names the destination (records written before the
    /// journal kept it do not).
    pub fn from_record(r: &Record) -> Option<Self> {
        let id = ::hex::decode(&r.order_id).ok()?.try_into().ok()?;
        let destination = ::hex::decode(r.peer.as_deref()?).ok()?.try_into().ok()?;
        Some(Self {
            id,
            vm: r.vm.clone(),
            destination,
            addr: r.peer_addr.clone()?,
        })
    }

    /// The order as its source knows it.
    pub fn of(order: &VerifiedOrder) -> Self {
        let body = order.body();
        Self {
            id: *order.id(),
            vm: body.vm.clone(),
            destination: body.destination,
            addr: body.destination_addr.clone(),
        }
    }
}

/// Ask the destination once and journal what the rules make of its answer: DONE when it
/// committed, rolled back when it never did (before the VM is given back).
pub async fn ask(ctx: &Arc<Ctx>, p: &InDoubt) -> Settlement {
    let committed = match query(ctx, p).await {
        Ok(c) => c,
        Err(e) => {
            return Settlement::InDoubt(format!(
                "{e}; should it never answer (its host gone for good): `{}` with `--moved` or `--resume-here`, once you know where the VM runs",
                ctx.home.command(&["settle", &hex(&p.id)])
            ))
        }
    };
    let note = if committed {
        "settled: the destination committed"
    } else {
        NOT_MOVED
    };
    let decided =
        ctx.journal
            .lock()
            .expect("journal lock")
            .settle(&p.id, Settle::Answer { committed }, note);
    match (committed, decided) {
        (true, Ok(Some(_))) => Settlement::Moved,
        // The machine's give-back, as it journalled it: paused or not by `Rules::give_back`.
        (false, Ok(Some(act))) => {
            debug_assert!(
                matches!(act, VmAction::GiveBack { .. }),
                "\"not committed\" gives the VM back, not {act:?}"
            );
            Settlement::NotMoved {
                paused_before: act
                    == VmAction::GiveBack {
                        paused_before: true,
                    },
            }
        }
        (true, Ok(None)) => {
            error!(order = %hex(&p.id), vm = %p.vm, "the destination says it committed this order, which was already settled here (by the operator?) as not moved: the VM may run in two places; stop one of them");
            Settlement::Moved
        }
        (false, Ok(None)) => Settlement::Meanwhile,
        // The VM is the destination's either way; unrecorded, a restart asks again.
        (true, Err(e)) => {
            warn!(order = %hex(&p.id), vm = %p.vm, "the destination committed, but the journal refused the record ({e})");
            Settlement::Moved
        }
        // Without the record a restart would ask again and the VM must not run meanwhile:
        // still in doubt (the destination's "no" is final, the next answer is the same).
        (false, Err(e)) => Settlement::InDoubt(format!(
            "the destination never committed, but the journal refused the record ({e})"
        )),
    }
}

async fn query(ctx: &Arc<Ctx>, p: &InDoubt) -> Result<bool, AgentError> {
    if crate::fault::query_unanswered() {
        return Err(AgentError::Migration(
            "fault injection: the settlement query went unanswered".into(),
        ));
    }
    let mut chan = SourceChannel::connect_to(ctx, &p.addr, p.destination).await?;
    chan.send(&Message::SettleQuery { order_id: p.id }.encode())
        .await?;
    let reply = chan.recv().await?;
    match Message::decode(&reply) {
        Ok(Message::SettleAnswer {
            order_id,
            committed,
        }) if order_id == p.id => Ok(committed),
        Ok(m) => Err(AgentError::Migration(format!(
            "destination answered the settlement query with {}",
            m.name()
        ))),
        Err(e) => Err(AgentError::Migration(format!(
            "destination's settlement answer: {e}"
        ))),
    }
}

/// The pauses between unanswered queries.
fn backoff() -> Backoff {
    Backoff::new(RETRY_FIRST, RETRY_MAX)
}

/// Ask the destination about the order `order_id` (at COMMIT here) once, and log the answer:
/// the fault injection's late `Commit` (`fault::settle_before_commit`).
pub async fn ask_about(ctx: &Arc<Ctx>, order_id: &OrderId) {
    let asked =
        (ctx.journal.lock().expect("journal lock").record(order_id)).and_then(InDoubt::from_record);
    // Asked only: the session goes on as if no answer came (the late `Commit` is the point).
    if let Some(p) = asked {
        match query(ctx, &p).await {
            Ok(committed) => info!(committed, "settlement asked before Commit"),
            Err(e) => info!("settlement asked before Commit: no answer ({e})"),
        }
    }
}

/// Keep asking about `p` in the background (at once, or first after a pause when the caller
/// just asked), pausing [`RETRY_FIRST`] doubling to [`RETRY_MAX`] between unanswered queries,
/// until the destination answers; then act on the answer. The order stays at COMMIT in the
/// journal meanwhile, so a restart asks again. It never gives up on its own (until the
/// destination answers, running the VM here could make two copies); the operator may settle
/// the order by hand meanwhile ([`by_operator`]), and then the queries stop.
pub fn keep_asking(ctx: Arc<Ctx>, p: InDoubt, asked_already: bool) {
    let turn = Arc::new(tokio::sync::Mutex::new(()));
    ctx.in_doubt
        .lock()
        .expect("in-doubt lock")
        .insert(p.id, turn.clone());
    tokio::spawn(async move {
        let mut pauses = backoff();
        if asked_already {
            tokio::time::sleep(pauses.next_pause()).await;
        }
        loop {
            let pause = pauses.next_pause();
            let done = {
                let _turn = turn.lock().await;
                answer_once(&ctx, &p, pause).await
            };
            if done {
                ctx.in_doubt.lock().expect("in-doubt lock").remove(&p.id);
                return;
            }
            tokio::time::sleep(pause).await;
        }
    });
}

/// One turn of [`keep_asking`]: ask and act on the answer. Returns whether the order is
/// settled (by this answer, or meanwhile by the operator).
async fn answer_once(ctx: &Arc<Ctx>, p: &InDoubt, pause: Duration) -> bool {
    let in_doubt = (ctx.journal.lock().expect("journal lock").record(&p.id))
        .is_some_and(|r| r.state == State::Committed);
    if !in_doubt {
        info!(order = %hex(&p.id), vm = %p.vm, "settled meanwhile (by the operator): no more settlement queries");
        return true;
    }
    let settled = |what: &str| {
        let entry = history_entry("source", None, Some(what), &hex(&p.id), &p.vm);
        ctx.remember(entry);
    };
    match ask(ctx, p).await {
        s @ Settlement::Moved => {
            backend::forget_moved(ctx, &p.vm);
            info!(order = %hex(&p.id), vm = %p.vm, "settled: the destination committed and owns the VM");
            settled(&s.vm_state());
            true
        }
        s @ Settlement::NotMoved { paused_before } => {
            let vm_state = backend::resume_given_back(ctx, &p.vm, paused_before).await;
            let text = format!("{}; {vm_state}", s.vm_state());
            warn!(order = %hex(&p.id), vm = %p.vm, "{text}");
            settled(&text);
            true
        }
        s @ Settlement::Meanwhile => {
            info!(order = %hex(&p.id), vm = %p.vm, "{}", s.vm_state());
            true
        }
        Settlement::InDoubt(why) => {
            warn!(order = %hex(&p.id), vm = %p.vm, "still in doubt, the VM stays stopped; asking again in {pause:?}: {why}");
            false
        }
    }
}

/// The operator settles an order in doubt here by hand, named by its id or a prefix of it
/// (hex, as `trustmig status` lists it): `resume` when they know its destination never ran the
/// VM (say, that host is gone for good), else because it does. Only orders whose destination
/// is being asked ([`keep_asking`]) can be settled so: not one whose session still runs.
/// Journalled as the operator's decision; the queries stop. spec: SPEC.md §8.8
pub async fn by_operator(ctx: &Arc<Ctx>, order: &str, resume: bool) -> Result<String, AgentError> {
    let prefix = order.to_ascii_lowercase();
    if prefix.is_empty() || !prefix.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(AgentError::Usage(format!("order id {order:?} is not hex")));
    }
    let (id, turn) = {
        let in_doubt = ctx.in_doubt.lock().expect("in-doubt lock");
        let mut matches = in_doubt
            .iter()
            .filter(|(id, _)| hex(*id).starts_with(&prefix));
        match (matches.next(), matches.next()) {
            (Some((id, turn)), None) => (*id, turn.clone()),
            (Some(_), Some(_)) => {
                return Err(AgentError::Usage(format!(
                    "{order:?} matches several orders in doubt here: give more digits"
                )))
            }
            (None, _) => {
                return Err(AgentError::Usage(format!(
                    "no order in doubt here matches {order:?} (only an order whose session was lost after COMMIT, while its destination is being asked, can be settled by hand)"
                )))
            }
        }
    };
    // After an answer being acted on, if any: then the journal says whether it is still open.
    let _turn = turn.lock().await;
    let (how, note) = if resume {
        (
            Settle::OperatorResumeHere,
            "settled by the operator: the destination never ran the VM",
        )
    } else {
        (
            Settle::OperatorMoved,
            "settled by the operator: the destination owns the VM",
        )
    };
    let (vm_action, r) = {
        let mut journal = ctx.journal.lock().expect("journal lock");
        let decided = journal.settle(&id, how, note).map_err(|e| {
            AgentError::Usage(format!(
                "order {} was settled meanwhile (its destination answered): {e}",
                hex(&id)
            ))
        })?;
        let r = journal.record(&id).cloned().expect("just journalled");
        (decided, r)
    };
    ctx.in_doubt.lock().expect("in-doubt lock").remove(&id);
    let what = match vm_action.and_then(VmAction::given_back) {
        Some(paused_before) => backend::resume_given_back(ctx, &r.vm, paused_before).await,
        None => backend::forget_moved(ctx, &r.vm),
    };
    let text = format!("{note}; {what}");
    warn!(order = %hex(&id), vm = %r.vm, "{text}");
    ctx.remember(history_entry("source", None, Some(&text), &hex(&id), &r.vm));
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unanswered_queries_back_off_to_a_minute() {
        let mut pauses = backoff();
        let seen: Vec<u64> = (0..9).map(|_| pauses.next_pause().as_secs()).collect();
        assert_eq!(seen, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }
}
