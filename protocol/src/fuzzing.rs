//! Fuzz harnesses; each `fuzz/fuzz_targets/*.rs` is a one-line call into this module.
//! Every harness must never panic on any input; where the format is canonical it asserts
//! that re-encoding a decoded value decodes to the same value.

use crate::handshake::{ChannelBinding, DestinationConfig, DestinationHandshake};
use crate::keys::TrafficSecret;
use crate::messages::Message;
use crate::order::{MemoryJournal, OrderPolicy, Role, SignedOrder};
use crate::precopy::{PrecopyDest, PAGE_HEADER};
use crate::record::Opener;
use crate::testing::{SoftAttester, SoftVerifier, VecGuest};

/// Control-message decoder: decode, and if it decodes, re-encode and decode again to equal.
pub fn control_message(data: &[u8]) {
    if let Ok(m) = Message::decode(data) {
        let again = Message::decode(&m.encode()).expect("re-encoded message decodes");
        assert_eq!(m, again);
    }
}

/// Order decoder and verifier with a fixed policy.
pub fn order_verify(data: &[u8]) {
    if let Ok(o) = SignedOrder::from_cbor(data) {
        assert_eq!(SignedOrder::from_cbor(&o.to_cbor()).as_ref(), Ok(&o));
        let _ = o.verify(&OrderPolicy {
            operators: &[o.operator, [7; 32]],
            me: [1; 32],
            role: Role::Destination,
            now: 1_800_000_000,
        });
        let _ = o.dangerous_unverified_body();
    }
}

/// Record opener fed arbitrary records (first byte picks one-shot or split-in-two).
pub fn record_open(data: &[u8]) {
    let mut opener = Opener::new(TrafficSecret::dangerous_from_bytes([3; 32], [4; 12]), 0);
    let mut buf = data.to_vec();
    if let Some(h) = buf.first().copied() {
        let cut = (h as usize).min(buf.len());
        let (a, b) = buf.split_at_mut(cut);
        let _ = opener.open(a);
        let _ = opener.open(b);
    }
}

/// Split fuzz input into messages with 2-byte big-endian length prefixes.
fn split(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while rest.len() >= 2 {
        let n = (usize::from(rest[0]) << 8 | usize::from(rest[1])).min(rest.len() - 2);
        out.push(&rest[2..2 + n]);
        rest = &rest[2 + n..];
    }
    out
}

/// The destination handshake fed an arbitrary sequence of messages.
pub fn responder_handshake(data: &[u8]) {
    let channel = ChannelBinding {
        tls_exporter: [5; 32],
        local: [1; 32],
        peer: [2; 32],
    };
    let mut hs = DestinationHandshake::new(
        DestinationConfig {
            // The test operator key (seed [42; 32]) so seeds signed by the tests reach deep.
            operators: vec![ed25519_dalek::SigningKey::from_bytes(&[42; 32])
                .verifying_key()
                .to_bytes()],
            now: 1_800_000_000,
        },
        channel,
        [6; 32],
    );
    let mut attester = SoftAttester::new(b"fuzz", [1; 32], [8; 32]);
    let verifier = SoftVerifier {
        key: b"fuzz".to_vec(),
        allowed_exe: vec![[8; 32]],
    };
    let mut journal = MemoryJournal::default();
    for msg in split(data) {
        let first = hs.handle(msg, &mut attester, &verifier, &mut journal);
        if first.is_err() {
            // Sticky: the same error again.
            assert_eq!(
                hs.handle(msg, &mut attester, &verifier, &mut journal).err(),
                first.err()
            );
            break;
        }
    }
}

/// The pre-copy destination fed arbitrary page batches: must never write out of bounds or
/// panic, and must refuse a batch as a whole.
pub fn precopy_dest(data: &[u8]) {
    let page_size = 512usize;
    let pages = 200u64;
    let mut guest = VecGuest::new(page_size, pages, 0, 1);
    let mut dest = match PrecopyDest::new(&guest, page_size as u32, pages, 2) {
        Ok(d) => d,
        Err(_) => return,
    };
    for (i, msg) in split(data).into_iter().enumerate() {
        let before = guest.mem.clone();
        let stream = (i % 2) as u16;
        let r = if msg.first() == Some(&0xDE) {
            dest.on_device_state(&msg[1..]).map(|_| 0)
        } else {
            dest.on_pages(&mut guest, stream, msg)
        };
        if r.is_err() {
            assert_eq!(before, guest.mem, "a refused batch wrote nothing");
            break;
        }
        assert!(msg.len() >= PAGE_HEADER || msg.first() == Some(&0xDE));
    }
}

/// The commit machines (`commit::Side`) under any sequence of inputs, one byte each, to
/// either side: no panic, and the outputs that move a VM only ever follow the record they need
/// (a destination resumes only once it journalled COMMIT or a restart settled it; a source
/// sends `Commit` only at COMMIT and gives its VM back only once it journalled the rollback).
pub fn commit_sides(data: &[u8]) {
    use crate::commit::{Input, Output, Side, Signal};
    use crate::settlement::{Rules, Settle, State, VmAction};
    let r = Rules::default();
    let (src, dst) = ([1u8; 32], [2u8; 32]);
    let mut sides = [Side::new(r, Role::Source), Side::new(r, Role::Destination)];
    for &b in data {
        let i = usize::from(b & 1);
        let side = &mut sides[i];
        let out = match b >> 1 {
            0 => side
                .claim(Some(if i == 0 { dst } else { src }), b & 2 != 0)
                .unwrap_or_default(),
            1 => side.revoke().unwrap_or_default(),
            2 => side
                .query(if b & 4 != 0 { &src } else { &dst })
                .unwrap_or_default(),
            3 => side
                .operator(Settle::OperatorResumeHere)
                .unwrap_or_default(),
            4 => side.operator(Settle::OperatorMoved).unwrap_or_default(),
            5 => {
                let records: Vec<_> = side.entry().copied().into_iter().collect();
                let x = Side::restart(r, side.role(), &records);
                *side = x.side;
                x.outputs
            }
            n => side.handle(match n % 12 {
                0 => Input::Durable,
                1 => Input::SwitchedOver,
                2 => Input::Ready,
                3 => Input::Resumed,
                4 => Input::FinalVerified,
                5 => Input::Commit,
                6 => Input::VmRunning,
                7 => Input::Failed,
                8 => Input::Answer { committed: true },
                9 => Input::Answer { committed: false },
                10 => Input::Unanswered,
                _ => Input::Durable,
            }),
        };
        let state = side.entry().map(|e| e.state);
        for o in out {
            match o {
                Output::Vm(VmAction::Resume) => assert!(
                    matches!(state, Some(State::Committed | State::Settled)),
                    "resume at {state:?}"
                ),
                Output::Vm(VmAction::GiveBack { .. }) => {
                    assert_eq!(state, Some(State::RolledBack), "give back")
                }
                Output::Send(Signal::Commit) => {
                    assert_eq!(state, Some(State::Committed), "Commit")
                }
                _ => {}
            }
        }
    }
}

/// Which order a VM belongs to (`history::VmHistory`), replayed over any journal, two bytes a
/// record (VM, order, role, flag; state), as the agent replays its journal file at every
/// start: no panic, and what it says names only what the records do (the current order wrote
/// about the VM; the last move is one of its records, and "migrated away" is that record's).
pub fn vm_history(data: &[u8]) {
    use crate::history::VmHistory;
    use crate::settlement::{Entry, Rules, State};
    const STATES: [State; 6] = [
        State::Claimed,
        State::Committed,
        State::Done,
        State::RolledBack,
        State::Settled,
        State::Revoked,
    ];
    let records: Vec<(u8, u8, Entry)> = data
        .chunks_exact(2)
        .map(|c| {
            let role = if c[0] & 8 == 0 {
                Role::Source
            } else {
                Role::Destination
            };
            let e = Entry {
                role,
                state: STATES[usize::from(c[1]) % STATES.len()],
                peer: None,
                flag: c[0] & 16 != 0,
            };
            (c[0] & 1, (c[0] >> 1) & 3, e)
        })
        .collect();
    let r = Rules::default();
    let h = VmHistory::of(&r, records.iter().copied());
    for vm in 0..2u8 {
        if let Some(o) = h.order(&vm) {
            assert!(records.iter().any(|(v, k, _)| *v == vm && k == o));
        }
        match h.last_move(&vm) {
            Some((o, e)) => {
                assert!(records.contains(&(vm, *o, *e)));
                assert_eq!(h.migrated_away(&r, &vm), r.left_here(e));
            }
            None => assert!(!h.migrated_away(&r, &vm)),
        }
    }
}

#[cfg(test)]
mod tests {
    /// `runs` pseudo-random 24-byte inputs (xorshift64 from `seed`), each fed to `harness`.
    fn feed(runs: usize, mut x: u64, harness: fn(&[u8])) {
        for _ in 0..runs {
            let seq: Vec<u8> = (0..24)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            harness(&seq);
        }
    }

    /// The VM history harness's invariants hold on many pseudo-random journals (the fuzz
    /// smoke run goes further).
    #[test]
    fn vm_histories_name_only_what_the_records_do() {
        feed(2000, 7, super::vm_history);
    }

    /// The commit harness's invariants hold on many pseudo-random input sequences (the fuzz
    /// smoke run goes further).
    #[test]
    fn commit_sides_hold_their_invariants() {
        feed(5000, 0x9e37_79b9_7f4a_7c15, super::commit_sides);
        // The happy path (a byte: side in bit 0, input above it): claims made durable, the
        // switch-over, `Ready` sent and received, COMMIT durable and `Commit` sent, the
        // destination's COMMIT durable and its VM resumed.
        super::commit_sides(&[0, 1, 24, 25, 26, 33, 28, 24, 35, 25]);
    }
}
