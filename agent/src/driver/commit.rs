//! Carrying out an order's commit machine (`trustmig_protocol::commit::Side`): the drivers feed
//! it what they learn and do what it says, in its order. Journal writes are done here, durably,
//! before the outputs that wait for them are released; messages and VM actions go back to the
//! driver, which owns the channel and the backend. spec: SPEC.md §8.7–8.8
//!
//! The journal checks claims, COMMIT and revocations against the same rules again (a second
//! line of defence: a write the machine asks for and the rules refuse is an error, never a
//! silent skip). Several machines may stand for one order (the session's, a settlement
//! answer's on another connection): each takes the journal's record before every input.

use std::collections::{BTreeMap, VecDeque};

use trustmig_protocol::commit::{Input, Output, Side, Signal};
use trustmig_protocol::migration::CommitEvidence;
use trustmig_protocol::order::{OrderId, Role};
use trustmig_protocol::settlement::{Entry, Gate, State, VmAction};

use crate::ctx::Ctx;
use crate::error::AgentError;

/// One order's machine and the outputs not yet carried out.
pub struct Commit {
    side: Side,
    id: OrderId,
    queue: VecDeque<Output>,
    /// What the next journal record says (an error, a summary).
    note: String,
    /// The digests COMMIT rests on, journalled with it.
    evidence: Option<CommitEvidence>,
}

impl Commit {
    /// The machine of `id`, claimed just now (its session starts).
    pub fn claimed(ctx: &Ctx, id: OrderId) -> Result<Self, AgentError> {
        let journal = ctx.journal.lock().expect("journal lock");
        let entry = journal.entry(&id).ok_or_else(|| {
            AgentError::Journal(format!("no journal record of order {}", hex::encode(id)))
        })?;
        Ok(Self::new(Side::claimed(journal.rules(), entry), id))
    }

    /// The machine of `id` as the journal shows it, with no session (settlement).
    pub fn journalled(ctx: &Ctx, id: OrderId, role: Role) -> Self {
        let journal = ctx.journal.lock().expect("journal lock");
        Self::new(
            Side::from_journal(journal.rules(), role, journal.entry(&id)),
            id,
        )
    }

    /// A machine handed over (a restart's, a settlement's).
    pub fn new(side: Side, id: OrderId) -> Self {
        Self {
            side,
            id,
            queue: VecDeque::new(),
            note: String::new(),
            evidence: None,
        }
    }

    /// The order it decides.
    pub fn id(&self) -> OrderId {
        self.id
    }

    /// The machine.
    pub fn side(&mut self) -> &mut Side {
        &mut self.side
    }

    /// Feed `input` (the machine first takes the journal's record as it is now); the next
    /// journal record it writes says `note`.
    pub fn feed(&mut self, ctx: &Ctx, input: Input, note: impl Into<String>) {
        self.note = note.into();
        let latest = ctx.journal.lock().expect("journal lock").entry(&self.id);
        self.side.sync(latest);
        self.queue.extend(self.side.handle(input));
    }

    /// The next journal record says `note` instead.
    pub fn set_note(&mut self, note: impl Into<String>) {
        self.note = note.into();
    }

    /// Queue outputs the machine gave outside [`Self::feed`] (a query's, a restart's).
    pub fn queue(&mut self, outputs: Vec<Output>, note: impl Into<String>) {
        self.note = note.into();
        self.queue.extend(outputs);
    }

    /// The digests the COMMIT record carries.
    pub fn with_evidence(&mut self, evidence: Option<CommitEvidence>) {
        self.evidence = evidence;
    }

    /// The next output for the driver to carry out, journal writes done on the way (each
    /// durable before what it held back is released). `None`: nothing more to do.
    pub fn next(&mut self, ctx: &Ctx) -> Result<Option<Output>, AgentError> {
        while let Some(o) = self.queue.pop_front() {
            let Output::Journal(e) = o else {
                return Ok(Some(o));
            };
            if let Err(err) = self.write(ctx, e) {
                // Failed or refused (a settlement answer rolled the order back meanwhile):
                // nothing that waited for it happens; the session fails from the journal's
                // record as it is.
                self.queue.clear();
                let latest = ctx.journal.lock().expect("journal lock").entry(&self.id);
                self.side.write_failed(latest);
                return Err(err);
            }
            self.queue.extend(self.side.handle(Input::Durable));
        }
        Ok(None)
    }

    /// Every output left, journal writes done (for callers with nothing to send).
    pub fn drain(&mut self, ctx: &Ctx) -> Result<Vec<Output>, AgentError> {
        let mut out = Vec::new();
        while let Some(o) = self.next(ctx)? {
            out.push(o);
        }
        Ok(out)
    }

    fn write(&mut self, ctx: &Ctx, e: Entry) -> Result<(), AgentError> {
        let mut journal = ctx.journal.lock().expect("journal lock");
        let note = std::mem::take(&mut self.note);
        match e.state {
            State::Committed => {
                let digests = self.evidence.map(|e| {
                    BTreeMap::from([
                        ("transcript".to_string(), hex::encode(e.transcript)),
                        ("manifest_root".to_string(), hex::encode(e.manifest_root)),
                        ("final_digest".to_string(), hex::encode(e.final_digest)),
                    ])
                });
                journal.commit(&self.id, Gate::Open, digests.unwrap_or_default())
            }
            state => journal.set(&self.id, state, note),
        }
    }
}

/// The machine's next output must be `want`: anything else means the order was settled
/// otherwise meanwhile (a settlement answer rolled it back), and this session must not go on.
pub fn expect(got: Option<Output>, want: Output) -> Result<(), AgentError> {
    match got {
        Some(o) if o == want => Ok(()),
        got => {
            let step = match want {
                Output::Send(Signal::Commit) | Output::Vm(VmAction::Resume) => "commit",
                Output::Send(Signal::Ready) => "send Ready",
                Output::Send(Signal::Resumed) => "confirm the resume",
                _ => "go on",
            };
            Err(AgentError::Refused(format!(
                "refusing to {step}: the order's journal no longer allows it (settled otherwise meanwhile; the machine says {got:?})"
            )))
        }
    }
}
