//! The synthetic guest arriving: N data streams bound by their `StreamInit`, pages written
//! into a zeroed, paused guest by the pre-copy engine. spec: SPEC.md §7.1, §8.1–8.5

use std::sync::{Arc, Mutex};

use tokio::net::TcpStream;
use tokio::sync::mpsc;
use trustmig_protocol::error::PeerMisbehaved;
use trustmig_protocol::handshake::Established;
use trustmig_protocol::keys::KeySchedule;
use trustmig_protocol::messages::TransferMode;
use trustmig_protocol::precopy::{GuestMemory, PrecopyDest};
use trustmig_protocol::record::{Opener, RecordType};

use crate::backend::{Arrived, DestVm, Tasks};
use crate::ctx::{Ctx, DataConn};
use crate::error::{AgentError, Link};
use crate::guest::{SyntheticGuest, PAGE_SIZE};
use crate::net::stream_init;
use crate::net::wire::{read_record, WireError};

struct Receiving {
    engine: PrecopyDest,
    guest: SyntheticGuest,
}

/// A synthetic guest being received: created zeroed and paused, resumed only on `Commit`.
pub(crate) struct SyntheticDest {
    vm: String,
    state: Arc<Mutex<Receiving>>,
    arrived: Option<mpsc::Receiver<Result<Arrived, AgentError>>>,
    tasks: Tasks,
}

impl SyntheticDest {
    /// Check that this host can take the guest the handshake announced, and make room for it.
    pub fn prepare(ctx: &Ctx, vm: &str, est: &Established) -> Result<Self, AgentError> {
        let TransferMode::Precopy {
            page_size,
            page_count,
        } = est.mode
        else {
            return Err(AgentError::Refused(
                "the synthetic backend receives pre-copy pages only".into(),
            ));
        };
        if page_size as usize != PAGE_SIZE {
            return Err(AgentError::Refused(format!(
                "page size {page_size} unsupported (synthetic guests use {PAGE_SIZE})"
            )));
        }
        if ctx.vms.lock().expect("vms lock").contains_key(vm) {
            return Err(AgentError::Refused(format!(
                "a VM named {vm:?} already runs here"
            )));
        }
        // The peer is attested but its numbers are still input: refuse a guest this host cannot
        // hold rather than abort on allocation.
        let guest = {
            let _room = Room::take(page_count)?;
            // Pre-faulting 4 GiB takes about a second: the agent's runtime is multi-threaded,
            // so this worker hands its other tasks to the rest meanwhile.
            tokio::task::block_in_place(|| SyntheticGuest::zeroed(vm, page_count))
                .map_err(|e| AgentError::Refused(e.to_string()))?
        };
        let engine = PrecopyDest::new(&guest, page_size, page_count, est.streams)?;
        Ok(Self {
            vm: vm.to_string(),
            state: Arc::new(Mutex::new(Receiving { engine, guest })),
            arrived: None,
            tasks: Tasks::default(),
        })
    }
}

/// Memory being pre-faulted for incoming guests: not yet counted in `MemAvailable`, so a
/// second migration that checks meanwhile must count it.
static BEING_FAULTED: Mutex<u64> = Mutex::new(0);

/// Room for an incoming guest's memory and its per-page bookkeeping (digests, dirty bitmap),
/// held while it is pre-faulted.
pub(super) struct Room(u64);

impl Room {
    /// Per page beyond its bytes: a 32-byte digest and a bit of dirty bitmap, rounded up.
    const PER_PAGE_OVERHEAD: u64 = 33;

    /// Room as `MemAvailable` says there is. Without it (kernels before 3.14, some sandboxes)
    /// the guest is refused: it could not be told whether it fits.
    pub(super) fn take(page_count: u64) -> Result<Self, AgentError> {
        let avail = crate::guest::mem_available().ok_or_else(|| {
            AgentError::Refused(
                "cannot tell how much memory is free here (no MemAvailable in /proc/meminfo)"
                    .into(),
            )
        })?;
        Self::take_within(page_count, avail)
    }

    /// Room out of `avail` bytes, less what other guests being pre-faulted took. A guest whose
    /// pre-faulting is under way counts twice meanwhile (its room here, and the pages it
    /// already touched in `avail`): that errs towards refusing, never towards an abort.
    fn take_within(page_count: u64, avail: u64) -> Result<Self, AgentError> {
        let want = page_count.saturating_mul(PAGE_SIZE as u64 + Self::PER_PAGE_OVERHEAD);
        let mut faulting = BEING_FAULTED.lock().unwrap_or_else(|e| e.into_inner());
        let free = avail.saturating_sub(*faulting);
        if want > free {
            return Err(AgentError::Refused(format!(
                "guest of {} MiB does not fit: {} MiB of memory available here",
                want >> 20,
                free >> 20
            )));
        }
        *faulting += want;
        Ok(Self(want))
    }
}

impl Drop for Room {
    fn drop(&mut self) {
        let mut faulting = BEING_FAULTED.lock().unwrap_or_else(|e| e.into_inner());
        *faulting = faulting.saturating_sub(self.0);
    }
}

impl DestVm for SyntheticDest {
    /// A synthetic guest lives in the agent, with no operator's `cont` to run it later.
    const HANDS_OVER_PAUSED: bool = false;

    fn start(
        &mut self,
        ctx: &Arc<Ctx>,
        est: Established,
        conns: mpsc::Receiver<DataConn>,
    ) -> Result<(), AgentError> {
        let Established {
            keys,
            transcript_hash,
            streams,
            ..
        } = est;
        let (done_tx, mut done_rx) = mpsc::channel::<(u16, Result<u64, AgentError>)>(16);
        let (ctx2, state) = (ctx.clone(), self.state.clone());
        self.tasks.spawn(bind_streams(
            ctx2,
            Arc::new(keys),
            streams,
            state,
            conns,
            done_tx,
        ));
        // Every stream to its end, then the digest of what arrived.
        let (tx, rx) = mpsc::channel(1);
        self.arrived = Some(rx);
        let state = self.state.clone();
        self.tasks.spawn(async move {
            let mut finished: Vec<Option<u64>> = vec![None; streams as usize];
            let r = loop {
                if finished.iter().all(Option::is_some) {
                    let digest = state
                        .lock()
                        .expect("state lock")
                        .engine
                        .final_digest(&transcript_hash);
                    break digest.map_err(AgentError::from).map(|digest| Arrived {
                        stream_records: finished.iter().map(|n| n.unwrap_or(0)).collect(),
                        digest,
                    });
                }
                match done_rx.recv().await {
                    Some((i, Ok(n))) => {
                        if let Some(slot) = finished.get_mut(i as usize) {
                            *slot = Some(n);
                        }
                    }
                    Some((_, Err(e))) => break Err(e),
                    None => break Err(AgentError::Migration("data streams ended".into())),
                }
            };
            let _ = tx.send(r).await;
        });
        Ok(())
    }

    async fn arrived(&mut self) -> Result<Arrived, AgentError> {
        match &mut self.arrived {
            Some(rx) => rx
                .recv()
                .await
                .unwrap_or_else(|| Err(AgentError::Migration("receiving ended".into()))),
            None => std::future::pending().await,
        }
    }

    fn activity(&self) -> Option<u64> {
        Some(
            self.state
                .lock()
                .expect("state lock")
                .engine
                .pages_written(),
        )
    }

    async fn resume(&mut self, ctx: &Arc<Ctx>, paused: bool) -> Result<(), AgentError> {
        let mut guest = {
            let mut st = self.state.lock().expect("state lock");
            std::mem::replace(&mut st.guest, SyntheticGuest::empty(&self.vm))
        };
        // Never paused here: `HANDS_OVER_PAUSED` is false, so the driver refused before COMMIT.
        debug_assert!(!paused, "a synthetic guest handed over paused");
        guest.resume();
        ctx.vms
            .lock()
            .expect("vms lock")
            .insert(self.vm.clone(), guest);
        Ok(())
    }

    async fn discard(self, _ctx: &Arc<Ctx>) {
        // The guest lived in this process only: dropping it (and the receiving tasks) is all.
    }
}

/// Accept data connections for this session: bind each stream index once, after its
/// `StreamInit` record authenticates (`net::stream_init`); then read it to its end.
/// spec: SPEC.md §7.1
async fn bind_streams(
    ctx: Arc<Ctx>,
    keys: Arc<KeySchedule>,
    streams: u16,
    state: Arc<Mutex<Receiving>>,
    conns: mpsc::Receiver<DataConn>,
    done: mpsc::Sender<(u16, Result<u64, AgentError>)>,
) {
    let mut binder = stream_init::Binder::new(conns, &keys, streams, ctx.step_timeout());
    let mut readers = tokio::task::JoinSet::new();
    while let Some((i, mut sock, opener)) = binder.next().await {
        let (state, done) = (state.clone(), done.clone());
        readers.spawn(async move {
            let r = read_stream(&mut sock, opener, i, &state).await;
            // The connection closes only once the driver has this stream's result: closing it
            // first let the source notice, cut the other streams, and their "cut before its
            // end" reach the driver ahead of this stream's own cause (a tampered record, say),
            // seen once in CI on a loaded machine.
            let _ = done.send((i, r)).await;
            drop(sock);
        });
    }
    // The session is over: the readers go with this task (a JoinSet aborts its tasks when
    // dropped) once every stream's reader has finished or the driver gave up.
    while readers.join_next().await.is_some() {}
}

/// Read one bound stream to `StreamEnd`; returns the number of records it carried.
async fn read_stream(
    sock: &mut TcpStream,
    mut opener: Opener,
    i: u16,
    state: &Mutex<Receiving>,
) -> Result<u64, AgentError> {
    let mut buf = Vec::with_capacity(1 << 20);
    let cut = || AgentError::transport(Link::Data(i), crate::error::CUT);
    loop {
        // Typed errors, so the Abort the source gets says record-failure or migration-failed.
        match read_record(sock, &mut buf).await {
            Ok(true) => {}
            Ok(false) | Err(WireError::Closed) | Err(WireError::Io(_)) => return Err(cut()),
            Err(WireError::Record(e)) => return Err(e.into()),
            Err(e) => return Err(AgentError::transport(Link::Data(i), e)),
        }
        let (typ, payload) = opener.open(&mut buf)?;
        crate::fault::record_opened();
        match typ {
            RecordType::Pages => {
                let mut st = state.lock().expect("state lock");
                let Receiving { engine, guest } = &mut *st;
                engine.on_pages(guest, i, payload)?;
            }
            RecordType::DeviceState => {
                state
                    .lock()
                    .expect("state lock")
                    .engine
                    .on_device_state(payload)?;
            }
            RecordType::KeyUpdate => {}
            RecordType::StreamEnd => return Ok(opener.records()),
            t => {
                return Err(PeerMisbehaved::BadField(format!(
                    "{t:?} record on pre-copy data stream {i}"
                ))
                .into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest larger than the free memory is refused by name; two migrations that each fit
    /// alone but not together are not both let in while the first is pre-faulted.
    #[test]
    fn room_for_a_guest_counts_the_ones_being_faulted() {
        // 1 TiB said to be free: nothing is allocated, only counted.
        let avail = 1u64 << 40;
        let per_page = PAGE_SIZE as u64 + Room::PER_PAGE_OVERHEAD;
        let e = Room::take_within(avail / per_page + 1, avail)
            .err()
            .expect("too big");
        assert!(e.to_string().contains("does not fit"), "{e}");
        let most = avail / per_page * 6 / 10;
        let first = Room::take_within(most, avail).expect("fits alone");
        let e = Room::take_within(most, avail)
            .err()
            .expect("not beside the first");
        assert!(e.to_string().contains("does not fit"), "{e}");
        drop(first);
        assert!(Room::take_within(most, avail).is_ok(), "room comes back");
    }
}
