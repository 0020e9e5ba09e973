//! A whole migration through both state machines over an in-memory link, in virtual time.

mod common;

use common::*;
use trustmig_protocol::attestation::{
    qualifying_data, AttestationError, Attester, Measurement, FINAL_LABEL,
};
use trustmig_protocol::error::{Error, PeerMisbehaved};
use trustmig_protocol::handshake::Established;
use trustmig_protocol::keys::Direction;
use trustmig_protocol::messages::Message;
use trustmig_protocol::migration::*;
use trustmig_protocol::order::{Limits, MemoryJournal, NonConvergence};
use trustmig_protocol::precopy::*;
use trustmig_protocol::record::{Opener, RecordType, Sealer};
use trustmig_protocol::testing::{SoftAttester, SoftVerifier, VecGuest};

const PAGE: usize = 4096;
const PAGES: u64 = 4096; // 16 MiB guest
const BANDWIDTH: u64 = 1_000_000_000; // simulated link, bytes/s

struct Report {
    decisions: Vec<RoundDecision>,
    stop_copy_bytes: u64,
    src: VecGuest,
    dst: VecGuest,
    result: Result<(), Error>,
    stats: SourceStats,
}

fn sessions() -> (Established, Established) {
    run(Setup::default(), &mut MemoryJournal::default()).expect("handshake")
}

/// Migrate a guest that dirties `dirty_pages_per_sec` pages per virtual second.
fn migrate(dirty_pages_per_sec: u64, limits: Limits, corrupt_digest: bool) -> Report {
    let (mut s, d) = sessions();
    let streams = s.streams;
    let mut src = VecGuest::new(PAGE, PAGES, 700, 7);
    let mut dst = VecGuest::new(PAGE, PAGES, 0, 9);
    dst.pause(); // the destination guest exists paused until Commit
    let mut sealers: Vec<Sealer> = (0..streams)
        .map(|i| Sealer::new(s.keys.stream_secret(Direction::SourceToDestination, i), i))
        .collect();
    let mut openers: Vec<Opener> = (0..streams)
        .map(|i| Opener::new(d.keys.stream_secret(Direction::SourceToDestination, i), i))
        .collect();
    let mut engine = PrecopySource::new(&src, limits, streams).unwrap();
    let mut receiver = PrecopyDest::new(&dst, PAGE as u32, PAGES, streams).unwrap();
    let mut decisions = Vec::new();
    let mut buf = Vec::new();
    let mut wire = Vec::new();

    // Seal on the batch's stream, "transmit", open and apply at the destination.
    let mut send = |typ: RecordType,
                    stream: u16,
                    payload: &[u8],
                    dst: &mut VecGuest,
                    rx: &mut PrecopyDest|
     -> u64 {
        wire.clear();
        sealers[stream as usize]
            .seal(typ, payload, &mut wire)
            .unwrap();
        let n = wire.len() as u64;
        let (t, p) = openers[stream as usize].open(&mut wire).unwrap();
        match t {
            RecordType::Pages => {
                rx.on_pages(dst, stream, p).unwrap();
            }
            RecordType::DeviceState => rx.on_device_state(p).unwrap(),
            _ => {}
        }
        n
    };

    engine.begin(&mut src).unwrap();
    let result = loop {
        loop {
            buf.clear();
            let Some(batch) = engine.next_batch(&src, &mut buf).unwrap() else {
                break;
            };
            let n = send(
                RecordType::Pages,
                batch.stream,
                &buf,
                &mut dst,
                &mut receiver,
            );
            // Virtual time passes while the batch is on the wire; the guest dirties meanwhile.
            src.run(dirty_pages_per_sec * n / BANDWIDTH);
        }
        match engine.end_round(&mut src, BANDWIDTH) {
            Ok(d @ RoundDecision::SwitchOver { .. }) => {
                decisions.push(d);
                break Ok(());
            }
            Ok(d) => decisions.push(d),
            Err(e) => break Err(Error::from(e)),
        }
    };
    if let Err(e) = result {
        engine.rollback(&mut src);
        return Report {
            decisions,
            stop_copy_bytes: 0,
            src,
            dst,
            result: Err(e),
            stats: engine.stats().clone(),
        };
    }
    engine.stop_and_copy(&mut src).unwrap();
    let mut stop_copy_bytes = 0;
    loop {
        buf.clear();
        let Some(batch) = engine.next_batch(&src, &mut buf).unwrap() else {
            break;
        };
        stop_copy_bytes += send(
            RecordType::Pages,
            batch.stream,
            &buf,
            &mut dst,
            &mut receiver,
        );
    }
    let device_state = b"vcpu0: rip=0x1000".to_vec();
    stop_copy_bytes += send(
        RecordType::DeviceState,
        0,
        &device_state,
        &mut dst,
        &mut receiver,
    );
    for i in 0..streams {
        send(RecordType::StreamEnd, i, &[], &mut dst, &mut receiver);
    }
    let mut digest = engine.finish(&device_state, &s.transcript_hash).unwrap();
    if corrupt_digest {
        digest[0] ^= 1;
    }

    // Control plane: switch-over, final evidence, commit.
    let mut src_att = SoftAttester::new(b"k", SRC, EXE);
    let ver = SoftVerifier {
        key: b"k".to_vec(),
        allowed_exe: vec![EXE],
    };
    let mut sm = SourceMigration::new(&mut s);
    let mut dm = DestMigration::new(&d);
    let counts: Vec<u64> = openers.iter().map(|o| o.records()).collect();
    let result = (|| {
        let so = sm.switch_over(counts.clone(), digest, false)?;
        let DestEvent::AwaitStreams(expected) = dm.handle(&so, &ver)? else {
            panic!("await streams")
        };
        assert_eq!(expected, counts);
        assert!(openers.iter().all(|o| o.is_ended()));
        let computed = receiver.final_digest(&d.transcript_hash)?;
        let challenge = dm.streams_complete(&counts, computed, [0x77; 32])?;
        let SourceEvent::Send(fe) = sm.handle(&challenge, &mut src_att)? else {
            panic!("final evidence")
        };
        assert_eq!(sm.outcome_on_failure(), Outcome::RollBack);
        let DestEvent::Send(ready) = dm.handle(&fe, &ver)? else {
            panic!("ready")
        };
        assert_eq!(sm.handle(&ready, &mut src_att)?, SourceEvent::ReadyToCommit);
        let commit = sm.commit()?;
        assert_eq!(sm.outcome_on_failure(), Outcome::Committed);
        assert_eq!(dm.handle(&commit, &ver)?, DestEvent::Resume);
        dst.resume();
        let resumed = dm.resumed()?;
        assert_eq!(sm.handle(&resumed, &mut src_att)?, SourceEvent::Resumed);
        Ok(())
    })();
    Report {
        decisions,
        stop_copy_bytes,
        src,
        dst,
        result,
        stats: engine.stats().clone(),
    }
}

fn limits(downtime_ms: u32, max_rounds: u32, on: NonConvergence) -> Limits {
    Limits {
        downtime_ms,
        bandwidth_bps: 0,
        max_rounds,
        on_nonconvergence: on,
    }
}

#[test]
fn memory_equal_at_pause_for_several_dirty_rates() {
    // Page-dirtying rates as a fraction of the link: 0, ~1%, ~10%, ~25%, ~50%.
    let link_pages = BANDWIDTH / PAGE as u64;
    for rate in [
        0,
        link_pages / 100,
        link_pages / 10,
        link_pages / 4,
        link_pages / 2,
    ] {
        let r = migrate(rate, limits(5, 30, NonConvergence::Force), false);
        r.result.as_ref().unwrap();
        assert!(r.src.paused, "source paused at switch-over");
        assert!(
            r.src.mem == r.dst.mem,
            "destination memory differs at rate {rate}"
        );
        assert!(!r.dst.paused, "destination resumed after commit");
        assert!(r.stats.zero_pages_skipped > 0, "zero pages elided");
    }
}

#[test]
fn predicted_downtime_is_respected_when_dirty_rate_is_at_most_half_the_bandwidth() {
    let link_pages = BANDWIDTH / PAGE as u64;
    for rate in [link_pages / 10, link_pages / 2] {
        let target = 5;
        let r = migrate(rate, limits(target, 30, NonConvergence::Abort), false);
        r.result.as_ref().unwrap();
        let last = *r.decisions.last().unwrap();
        let RoundDecision::SwitchOver {
            predicted_ms,
            converged,
        } = last
        else {
            panic!()
        };
        assert!(converged);
        assert!(predicted_ms <= u64::from(target));
        // What stop-and-copy actually sent, at the link rate, is within the target.
        let actual_ms = r.stop_copy_bytes * 1000 / BANDWIDTH;
        assert!(
            actual_ms <= u64::from(target),
            "stop-and-copy took {actual_ms} ms at rate {rate}"
        );
    }
}

#[test]
fn non_convergence_gets_the_orders_action() {
    // The guest dirties pages twice as fast as the link can carry them.
    let rate = 2 * BANDWIDTH / PAGE as u64;
    let r = migrate(rate, limits(1, 4, NonConvergence::Abort), false);
    assert!(
        matches!(
            r.result,
            Err(Error::Precopy(PrecopyError::NotConverged { rounds: 4, .. }))
        ),
        "{:?}",
        r.result.err()
    );
    assert!(
        !r.src.paused && r.src.throttle == 0,
        "rollback: source runs at full speed"
    );

    let r = migrate(rate, limits(1, 4, NonConvergence::Force), false);
    r.result.as_ref().unwrap();
    assert!(matches!(
        r.decisions.last(),
        Some(RoundDecision::SwitchOver {
            converged: false,
            ..
        })
    ));
    assert!(r.stats.forced);
    assert!(r.src.mem == r.dst.mem);

    let r = migrate(rate, limits(1, 4, NonConvergence::Throttle), false);
    r.result.as_ref().unwrap();
    let throttles: Vec<u8> = r
        .decisions
        .iter()
        .filter_map(|d| match d {
            RoundDecision::Throttle { percent, .. } => Some(*percent),
            _ => None,
        })
        .collect();
    assert!(!throttles.is_empty(), "throttled");
    assert!(
        throttles.windows(2).all(|w| w[0] < w[1]),
        "throttle escalates: {throttles:?}"
    );
    assert!(r.src.mem == r.dst.mem);
}

#[test]
fn a_wrong_final_digest_is_refused_and_nothing_commits() {
    let r = migrate(0, limits(5, 30, NonConvergence::Force), true);
    assert!(
        matches!(
            r.result,
            Err(Error::PeerMisbehaved(
                PeerMisbehaved::FinalDigestMismatch { .. }
            ))
        ),
        "{:?}",
        r.result.err()
    );
    assert!(r.dst.paused, "destination never resumed");
}

/// A source that ends its streams without device state is at fault, and said to be: the
/// destination has no final digest to compare (it was an "API misuse" of its own).
#[test]
fn a_source_that_never_sent_device_state_is_named() {
    let dst = VecGuest::new(PAGE, 64, 0, 1);
    let rx = PrecopyDest::new(&dst, PAGE as u32, 64, 1).unwrap();
    let e = rx.final_digest(&[2; 32]).unwrap_err();
    assert_eq!(e, PrecopyError::NoDeviceState);
    assert!(e
        .to_string()
        .contains("source ended its streams without sending the device state"));
}

#[test]
fn destination_never_writes_outside_the_guest() {
    let mut dst = VecGuest::new(PAGE, 64, 0, 1);
    let mut rx = PrecopyDest::new(&dst, PAGE as u32, 64, 1).unwrap();
    let mut payload = 1u32.to_be_bytes().to_vec();
    payload.extend_from_slice(&64u64.to_be_bytes());
    payload.push(1);
    payload.extend_from_slice(&[0xAB; PAGE]);
    assert_eq!(
        rx.on_pages(&mut dst, 0, &payload),
        Err(PrecopyError::OutOfBounds {
            pfn: 64,
            page_count: 64
        })
    );
    assert!(dst.mem.iter().all(|&b| b == 0));
    // A valid first entry followed by a bad one: nothing is written (all-or-nothing).
    let mut rx = PrecopyDest::new(&dst, PAGE as u32, 64, 1).unwrap();
    let mut payload = 2u32.to_be_bytes().to_vec();
    payload.extend_from_slice(&3u64.to_be_bytes());
    payload.push(1);
    payload.extend_from_slice(&[0xCD; PAGE]);
    payload.extend_from_slice(&4u64.to_be_bytes());
    payload.push(9);
    assert!(matches!(
        rx.on_pages(&mut dst, 0, &payload),
        Err(PrecopyError::BadBatch(_))
    ));
    assert!(dst.mem.iter().all(|&b| b == 0));
    // Pages on a stream that does not own their chunk are refused.
    let mut big = VecGuest::new(PAGE, 256, 0, 1);
    let mut rx = PrecopyDest::new(&big, PAGE as u32, 256, 2).unwrap();
    let mut payload = 1u32.to_be_bytes().to_vec();
    payload.extend_from_slice(&64u64.to_be_bytes());
    payload.push(0);
    assert_eq!(
        rx.on_pages(&mut big, 0, &payload),
        Err(PrecopyError::WrongStream {
            pfn: 64,
            stream: 0,
            expected: 1
        })
    );
}

#[test]
fn large_pages_travel_in_record_sized_batches() {
    let page = 64 << 10;
    let pages = 130;
    let mut src = VecGuest::new(page, pages, 1000, 5);
    let mut dst = VecGuest::new(page, pages, 0, 6);
    let mut e = PrecopySource::new(&src, limits(5, 30, NonConvergence::Force), 2).unwrap();
    let mut rx = PrecopyDest::new(&dst, page as u32, pages, 2).unwrap();
    e.begin(&mut src).unwrap();
    let mut buf = Vec::new();
    let mut batches = 0;
    while let Some(b) = e.next_batch(&src, &mut buf).unwrap() {
        assert!(
            buf.len() <= trustmig_protocol::record::MAX_PAYLOAD,
            "batch of {} bytes",
            buf.len()
        );
        rx.on_pages(&mut dst, b.stream, &buf).unwrap();
        buf.clear();
        batches += 1;
    }
    assert!(
        batches > 3,
        "64 KiB pages split into several batches per chunk"
    );
    assert!(src.mem == dst.mem);
}

#[test]
fn committed_outcome_survives_later_errors() {
    let (mut s, d) = sessions();
    let mut att = SoftAttester::new(b"k", SRC, EXE);
    let ver = SoftVerifier {
        key: b"k".to_vec(),
        allowed_exe: vec![EXE],
    };
    let mut sm = SourceMigration::new(&mut s);
    let mut dm = DestMigration::new(&d);
    let so = sm.switch_over(vec![1], [9; 32], false).unwrap();
    dm.handle(&so, &ver).unwrap();
    let ch = dm.streams_complete(&[1], [9; 32], [1; 32]).unwrap();
    let SourceEvent::Send(fe) = sm.handle(&ch, &mut att).unwrap() else {
        panic!()
    };
    let DestEvent::Send(ready) = dm.handle(&fe, &ver).unwrap() else {
        panic!()
    };
    sm.handle(&ready, &mut att).unwrap();
    assert_eq!(
        sm.outcome_on_failure(),
        Outcome::Committed,
        "ready-to-commit: the journal decides"
    );
    let commit = sm.commit().unwrap();
    // A garbage message after COMMIT: an error, yet the VM stays the destination's.
    assert!(sm.handle(b"\x00", &mut att).is_err());
    assert_eq!(sm.outcome_on_failure(), Outcome::Committed);
    dm.handle(&commit, &ver).unwrap();
    assert!(dm.handle(b"\x00", &ver).is_err());
    assert_eq!(dm.outcome_on_failure(), Outcome::Committed);
}

#[test]
fn device_state_may_overtake_pages_of_other_streams() {
    let mut dst = VecGuest::new(PAGE, 256, 0, 1);
    let mut rx = PrecopyDest::new(&dst, PAGE as u32, 256, 2).unwrap();
    rx.on_device_state(b"cpu").unwrap();
    let mut payload = 1u32.to_be_bytes().to_vec();
    payload.extend_from_slice(&64u64.to_be_bytes());
    payload.push(1);
    payload.extend_from_slice(&[7; PAGE]);
    rx.on_pages(&mut dst, 1, &payload).unwrap();
    assert!(
        rx.on_device_state(b"again").is_err(),
        "device state only once"
    );
}

// ---------------------------------------------------------------------------------------------
// The final signature, the late quote and strict mode (SPEC.md §8.7).

const DIGEST: [u8; 32] = [0x5D; 32];

fn verifier() -> SoftVerifier {
    SoftVerifier {
        key: b"k".to_vec(),
        allowed_exe: vec![EXE],
    }
}

fn sessions_with(strict: bool) -> (Established, Established) {
    let mut body = order_body(1);
    body.strict_final_quote = strict;
    let setup = Setup {
        signed: trustmig_protocol::order::SignedOrder::sign(&body, &op()),
        ..Setup::default()
    };
    run(setup, &mut MemoryJournal::default()).expect("handshake")
}

/// Switch-over and challenge (`nonce`) without a data plane: the source's `FinalEvidence`.
fn final_evidence(
    sm: &mut SourceMigration,
    dm: &mut DestMigration,
    streams: u16,
    nonce: [u8; 32],
    att: &mut dyn Attester,
) -> Vec<u8> {
    let counts = vec![0; usize::from(streams)];
    let so = sm
        .switch_over(counts.clone(), DIGEST, false)
        .expect("switch-over");
    dm.handle(&so, &verifier()).expect("await streams");
    let challenge = dm
        .streams_complete(&counts, DIGEST, nonce)
        .expect("challenge");
    let SourceEvent::Send(fe) = sm.handle(&challenge, att).expect("final evidence") else {
        panic!("final evidence")
    };
    fe
}

/// The destination takes `fe` and answers `Ready`; the source commits; the destination
/// resumes.
fn ready_commit_resume(
    sm: &mut SourceMigration,
    dm: &mut DestMigration,
    fe: &[u8],
    att: &mut dyn Attester,
) {
    let DestEvent::Send(ready) = dm.handle(fe, &verifier()).expect("ready") else {
        panic!("ready")
    };
    sm.handle(&ready, att).expect("ready to commit");
    let commit = sm.commit().expect("commit");
    assert_eq!(
        dm.handle(&commit, &verifier()).expect("resume"),
        DestEvent::Resume
    );
}

/// A fresh destination machine for session `d`, past `SwitchOver`, having sent the challenge
/// `nonce`: what a second `FinalEvidence` meets.
fn challenged(d: &Established, streams: u16, nonce: [u8; 32]) -> DestMigration {
    let mut dm = DestMigration::new(d);
    let counts = vec![0; usize::from(streams)];
    let so = Message::SwitchOver {
        stream_records: counts.clone(),
        paused: false,
    }
    .encode();
    dm.handle(&so, &verifier()).expect("await streams");
    dm.streams_complete(&counts, DIGEST, nonce)
        .expect("challenge");
    dm
}

/// A guest paused before its migration is handed over paused: the source's `SwitchOver` says
/// so and the destination machine reports it; a running guest's `SwitchOver` encodes exactly
/// as before the field existed (no `paused` key), and a destination reads that as running.
#[test]
fn a_paused_guest_is_handed_over_paused() {
    for paused in [false, true] {
        let (mut s, d) = sessions_with(false);
        let mut sm = SourceMigration::new(&mut s);
        let mut dm = DestMigration::new(&d);
        let so = sm
            .switch_over(vec![0; usize::from(s.streams)], DIGEST, paused)
            .expect("switch-over");
        assert_eq!(
            contains(&so, b"paused"),
            paused,
            "the key is sent only when true"
        );
        assert!(!dm.hands_over_paused(), "running until the source says");
        dm.handle(&so, &verifier()).expect("await streams");
        assert_eq!(dm.hands_over_paused(), paused);
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn the_final_digest_is_signed_in_the_downtime_and_quoted_after_resumed() {
    let (mut s, d) = sessions_with(false);
    let mut att = SoftAttester::new(b"k", SRC, EXE);
    let mut sm = SourceMigration::new(&mut s);
    let mut dm = DestMigration::new(&d);
    let fe = final_evidence(&mut sm, &mut dm, s.streams, [0x77; 32], &mut att);
    // No TPM quote before Commit: the evidence is the signature alone.
    let Ok(Message::FinalEvidence { evidence, .. }) = Message::decode(&fe) else {
        panic!("final evidence")
    };
    assert!(evidence.is_none());
    ready_commit_resume(&mut sm, &mut dm, &fe, &mut att);
    // The late quote is for after Resumed only.
    assert!(sm.final_quote(&mut att).is_err());
    let resumed = dm.resumed().expect("resumed");
    assert!(dm.awaits_final_quote());
    sm.handle(&resumed, &mut att).expect("resumed");
    let fq = sm
        .final_quote(&mut att)
        .expect("quote")
        .expect("not strict");
    assert_eq!(
        dm.handle(&fq, &verifier()).expect("late quote"),
        DestEvent::FinalQuote(Ok(()))
    );
    assert!(sm.final_quote(&mut att).expect("again").is_none(), "once");
}

#[test]
fn a_late_quote_of_another_digest_is_an_incident_not_a_rollback() {
    let (mut s, d) = sessions_with(false);
    let mut att = SoftAttester::new(b"k", SRC, EXE);
    let mut sm = SourceMigration::new(&mut s);
    let mut dm = DestMigration::new(&d);
    let nonce = [0x77; 32];
    let fe = final_evidence(&mut sm, &mut dm, s.streams, nonce, &mut att);
    let DestEvent::Send(_) = dm.handle(&fe, &verifier()).expect("ready") else {
        panic!("ready")
    };
    dm.handle(&Message::Commit.encode(), &verifier())
        .expect("commit");
    dm.resumed().expect("resumed");
    // A source TPM whose log says another final digest, quoted for the right challenge.
    att.extend(&Measurement::MigrationFinal([0xEE; 32]))
        .expect("extend");
    let qd = qualifying_data(
        FINAL_LABEL,
        &nonce,
        &s.channel.tls_exporter,
        s.order.id(),
        &SRC,
    );
    let evidence = att.quote(&qd).expect("quote");
    let fq = Message::FinalQuote { evidence }.encode();
    let DestEvent::FinalQuote(Err(incident)) = dm.handle(&fq, &verifier()).expect("verdict") else {
        panic!("a mismatch must be reported")
    };
    assert!(incident.contains("mismatch"), "{incident}");
    assert_eq!(
        dm.outcome_on_failure(),
        Outcome::Committed,
        "the VM stays where it runs"
    );
}

#[test]
fn a_final_signature_by_another_key_or_replayed_is_refused() {
    // Another key: an attacker who did not get the attested key signs the right digest.
    let (mut s, d) = sessions_with(false);
    let mut att = SoftAttester::new(b"k", SRC, EXE);
    let mut sm = SourceMigration::new(&mut s);
    let mut dm = DestMigration::new(&d);
    let nonce = [0x77; 32];
    let fe = final_evidence(&mut sm, &mut dm, s.streams, nonce, &mut att);
    let forged = trustmig_protocol::finalsig::FinalKey::from_seed(&[0x99; 32]);
    let ctx = trustmig_protocol::finalsig::FinalContext {
        nonce: &nonce,
        tls_exporter: &d.channel.tls_exporter,
        order_id: d.order.id(),
        transcript_hash: &d.transcript_hash,
    };
    let bad = Message::FinalEvidence {
        digest: DIGEST,
        signature: forged.sign(&ctx, &DIGEST).to_vec(),
        evidence: None,
    }
    .encode();
    let e = dm.handle(&bad, &verifier()).unwrap_err();
    assert!(
        matches!(e, Error::PeerMisbehaved(PeerMisbehaved::BadFinalSignature)),
        "{e:?}"
    );
    assert_eq!(dm.outcome_on_failure(), Outcome::RollBack);
    drop(fe);

    // Replayed: the genuine signature of one challenge, offered for another.
    let (mut s, d) = sessions_with(false);
    let mut sm = SourceMigration::new(&mut s);
    let mut dm = DestMigration::new(&d);
    let fe = final_evidence(&mut sm, &mut dm, s.streams, [0x77; 32], &mut att);
    let mut dm2 = challenged(&d, s.streams, [0x78; 32]);
    let e = dm2.handle(&fe, &verifier()).unwrap_err();
    assert!(
        matches!(e, Error::PeerMisbehaved(PeerMisbehaved::BadFinalSignature)),
        "{e:?}"
    );
    // The genuine one for its own challenge still verifies.
    assert!(matches!(
        dm.handle(&fe, &verifier()),
        Ok(DestEvent::Send(_))
    ));
}

#[test]
fn a_strict_order_quotes_before_commit_and_requires_it() {
    let (mut s, d) = sessions_with(true);
    let mut att = SoftAttester::new(b"k", SRC, EXE);
    let mut sm = SourceMigration::new(&mut s);
    let mut dm = DestMigration::new(&d);
    let fe = final_evidence(&mut sm, &mut dm, s.streams, [0x77; 32], &mut att);
    let Ok(Message::FinalEvidence {
        digest,
        signature,
        evidence,
    }) = Message::decode(&fe)
    else {
        panic!("final evidence")
    };
    assert!(evidence.is_some(), "the quote travels before Commit");
    // Without its quote a strict destination refuses.
    let with = |evidence: Option<Vec<u8>>| {
        Message::FinalEvidence {
            digest,
            signature: signature.clone(),
            evidence,
        }
        .encode()
    };
    let mut dm2 = challenged(&d, s.streams, [0x77; 32]);
    let e = dm2.handle(&with(None), &verifier()).unwrap_err();
    assert!(
        matches!(&e, Error::PeerMisbehaved(PeerMisbehaved::BadField(w)) if w.contains("without the TPM quote")),
        "{e:?}"
    );
    // A quote for another challenge (an earlier session's, replayed): the qualifying data
    // does not match.
    let mut other = SoftAttester::new(b"k", SRC, EXE);
    other
        .extend(&Measurement::MigrationFinal(digest))
        .expect("extend");
    let qd = |nonce: &[u8; 32]| {
        qualifying_data(
            FINAL_LABEL,
            nonce,
            &d.channel.tls_exporter,
            d.order.id(),
            &SRC,
        )
    };
    let stale = other.quote(&qd(&[0x78; 32])).expect("quote");
    let mut dm3 = challenged(&d, s.streams, [0x77; 32]);
    let e = dm3.handle(&with(Some(stale)), &verifier()).unwrap_err();
    assert!(
        matches!(&e, Error::Attestation(a) if a.to_string().contains("qualifying data")),
        "{e:?}"
    );
    // A quote for this challenge whose TPM log attests another final digest.
    let mut liar = SoftAttester::new(b"k", SRC, EXE);
    liar.extend(&Measurement::MigrationFinal([0xEE; 32]))
        .expect("extend");
    let lie = liar.quote(&qd(&[0x77; 32])).expect("quote");
    let mut dm4 = challenged(&d, s.streams, [0x77; 32]);
    let e = dm4.handle(&with(Some(lie)), &verifier()).unwrap_err();
    assert!(
        matches!(
            e,
            Error::PeerMisbehaved(PeerMisbehaved::FinalDigestMismatch { .. })
        ),
        "{e:?}"
    );
    assert_eq!(dm4.outcome_on_failure(), Outcome::RollBack);
    // The right quote, for an order that did not ask for one: refused as a field it has not.
    let (mut s5, d5) = sessions_with(false);
    let mut sm5 = SourceMigration::new(&mut s5);
    let mut dm5 = DestMigration::new(&d5);
    let fe5 = final_evidence(&mut sm5, &mut dm5, s5.streams, [0x77; 32], &mut att);
    let Ok(Message::FinalEvidence {
        digest: digest5,
        signature: signature5,
        ..
    }) = Message::decode(&fe5)
    else {
        panic!("final evidence")
    };
    let mut q5 = SoftAttester::new(b"k", SRC, EXE);
    q5.extend(&Measurement::MigrationFinal(digest5))
        .expect("extend");
    let quote5 = q5
        .quote(&qualifying_data(
            FINAL_LABEL,
            &[0x77; 32],
            &d5.channel.tls_exporter,
            d5.order.id(),
            &SRC,
        ))
        .expect("quote");
    let unasked = Message::FinalEvidence {
        digest: digest5,
        signature: signature5,
        evidence: Some(quote5),
    }
    .encode();
    let e = dm5.handle(&unasked, &verifier()).unwrap_err();
    assert!(
        matches!(&e, Error::PeerMisbehaved(PeerMisbehaved::BadField(w)) if w.contains("did not ask for")),
        "{e:?}"
    );
    // With it: ready, commit, resumed, and no late quote.
    ready_commit_resume(&mut sm, &mut dm, &fe, &mut att);
    let resumed = dm.resumed().expect("resumed");
    assert!(!dm.awaits_final_quote());
    sm.handle(&resumed, &mut att).expect("resumed");
    assert!(sm.final_quote(&mut att).expect("strict").is_none());
}

/// An attester that refuses every call: a step that reaches the TPM fails with it.
struct NoTpm;

impl Attester for NoTpm {
    fn extend(&mut self, _: &Measurement) -> Result<(), AttestationError> {
        Err(AttestationError::new("the TPM was asked to extend"))
    }
    fn quote(&mut self, _: &[u8; 32]) -> Result<Vec<u8>, AttestationError> {
        Err(AttestationError::new("the TPM was asked to quote"))
    }
}

/// Between the guest's stop and `cont` the source asks nothing of its TPM unless the order is
/// strict (SPEC.md §8.7): the final evidence, `Ready` and `Commit` go through with a TPM that
/// refuses everything, so neither a slow TPM nor one busy for another migration or the audit
/// anchor can stretch the downtime (the agent takes its TPM's lock only for a call:
/// `attestation::SharedTpm`). A strict order's final evidence does reach the TPM.
#[test]
fn the_switch_over_asks_nothing_of_the_tpm_unless_strict() {
    let (mut s, d) = sessions_with(false);
    let mut sm = SourceMigration::new(&mut s);
    let mut dm = DestMigration::new(&d);
    let fe = final_evidence(&mut sm, &mut dm, s.streams, [0x77; 32], &mut NoTpm);
    ready_commit_resume(&mut sm, &mut dm, &fe, &mut NoTpm);
    // After Resumed, the late quote is the TPM's.
    let resumed = dm.resumed().expect("resumed");
    sm.handle(&resumed, &mut NoTpm).expect("resumed");
    let late = sm.final_quote(&mut NoTpm).unwrap_err().to_string();
    assert!(late.contains("the TPM was asked to extend"), "{late}");

    let (mut s, d) = sessions_with(true);
    let mut sm = SourceMigration::new(&mut s);
    let mut dm = DestMigration::new(&d);
    let counts = vec![0; usize::from(s.streams)];
    let so = sm
        .switch_over(counts.clone(), DIGEST, false)
        .expect("switch-over");
    dm.handle(&so, &verifier()).expect("await streams");
    let challenge = dm
        .streams_complete(&counts, DIGEST, [0x77; 32])
        .expect("challenge");
    let strict = sm.handle(&challenge, &mut NoTpm).unwrap_err().to_string();
    assert!(strict.contains("the TPM was asked"), "{strict}");
}

/// Record counts that disagree: a source that announces more (or fewer) records per stream
/// than arrived (a stream cut after its last whole record, records dropped on the way and the
/// count forged to match nothing) is refused before any challenge, naming both counts; and
/// one that announces another number of streams too. Nothing commits.
#[test]
fn record_counts_that_disagree_are_refused_before_the_challenge() {
    let (_, d) = sessions();
    for (announced, received) in [
        (vec![5, 3], vec![5, 2]),
        (vec![5, 3], vec![6, 3]),
        (vec![5], vec![5, 0]),
    ] {
        let mut dm = DestMigration::new(&d);
        let so = Message::SwitchOver {
            stream_records: announced.clone(),
            paused: false,
        }
        .encode();
        dm.handle(&so, &verifier()).expect("await streams");
        let e = dm
            .streams_complete(&received, DIGEST, [1; 32])
            .expect_err("counts disagree");
        assert!(
            matches!(&e, Error::PeerMisbehaved(PeerMisbehaved::BadField(f))
                if f.contains(&format!("{announced:?}")) && f.contains(&format!("{received:?}"))),
            "{e:?}"
        );
        assert_ne!(dm.outcome_on_failure(), Outcome::Committed);
    }
}

/// A data stream recorded from one session and replayed into the next (same agents, same
/// order and channel; only the destination's fresh nonce differs) opens nothing: its first
/// record fails authentication under the new session's keys, for every stream and both
/// directions, and the new session's own records open.
#[test]
fn a_stream_recorded_in_one_session_opens_nothing_in_the_next() {
    let (old_src, _) = sessions();
    let (new_src, new_dst) = run(
        Setup {
            dst_nonce: [0xBC; 32],
            ..Setup::default()
        },
        &mut MemoryJournal::default(),
    )
    .expect("handshake");
    for dir in [
        Direction::SourceToDestination,
        Direction::DestinationToSource,
    ] {
        for i in 0..new_src.streams {
            let record = |keys: &trustmig_protocol::keys::KeySchedule| {
                let mut out = Vec::new();
                Sealer::new(keys.stream_secret(dir, i), i)
                    .seal(RecordType::Pages, b"guest pages", &mut out)
                    .expect("seal");
                out
            };
            let mut recorded = record(&old_src.keys);
            let mut opener = Opener::new(new_dst.keys.stream_secret(dir, i), i);
            assert!(opener.open(&mut recorded).is_err(), "{dir:?} stream {i}");
            let mut fresh = record(&new_src.keys);
            let mut opener = Opener::new(new_dst.keys.stream_secret(dir, i), i);
            assert!(
                opener.open(&mut fresh).is_ok(),
                "{dir:?} stream {i}: its own"
            );
        }
    }
}
