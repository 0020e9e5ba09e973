//! Every way evidence can be wrong is rejected, each with its own error variant.

mod common;

use common::*;
use trustmig_attest::evidence::Evidence;
use trustmig_attest::quote::{QuoteInfo, QuoteParseError};
use trustmig_attest::tpm::TpmError;
use trustmig_attest::wire::WireError;
use trustmig_attest::{PolicyVerifier, VerifyError};
use trustmig_protocol::attestation::{EvidenceVerifier, Measurement};
use trustmig_protocol::Digest;

struct Fixture {
    a: Agent,
    v: PolicyVerifier,
    q: Digest,
    ev: Evidence,
}

fn fixture() -> Option<Fixture> {
    let mut a = agent()?;
    let v = verifier_for(&mut a.att);
    let q = qd(1, 2);
    let ev = a.att.evidence(&q).expect("quote");
    v.verify_evidence(&ev.to_cbor(), &q, &AGENT)
        .expect("untampered evidence verifies");
    Some(Fixture { a, v, q, ev })
}

impl Fixture {
    fn check(&self, ev: &Evidence) -> VerifyError {
        self.v
            .verify_evidence(&ev.to_cbor(), &self.q, &AGENT)
            .expect_err("tampered evidence must be rejected")
    }

    fn flip_quote(&self, offset: usize, bit: u8) -> VerifyError {
        let mut ev = self.ev.clone();
        ev.quote[offset] ^= 1 << bit;
        self.check(&ev)
    }
}

/// Offsets of each TPMS_ATTEST field's value in the quote.
struct Offsets {
    signer: usize,
    extra: usize,
    clock: usize,
    reset: usize,
    restart: usize,
    safe: usize,
    firmware: usize,
    count: usize,
    hash: usize,
    select: usize,
    digest: usize,
}

fn offsets(q: &QuoteInfo) -> Offsets {
    let signer = 8;
    let extra = signer + q.qualified_signer.len() + 2;
    let clock = extra + q.extra_data.len();
    Offsets {
        signer,
        extra,
        clock,
        reset: clock + 8,
        restart: clock + 12,
        safe: clock + 16,
        firmware: clock + 17,
        count: clock + 25,
        hash: clock + 29,
        select: clock + 32,
        digest: clock + 37,
    }
}

#[test]
fn flipped_bit_in_each_tpms_attest_field() {
    let Some(f) = fixture() else { return };
    let q = QuoteInfo::parse(&f.ev.quote).expect("parse");
    assert_eq!(
        q.to_bytes(),
        f.ev.quote,
        "parser is canonical on a real quote"
    );
    let o = offsets(&q);
    assert_eq!(o.digest + q.pcr_digest.len(), f.ev.quote.len());

    assert!(matches!(f.flip_quote(0, 0), VerifyError::BadMagic(_)));
    assert!(matches!(f.flip_quote(5, 3), VerifyError::BadType(_)));
    assert!(matches!(
        f.flip_quote(o.signer + 5, 1),
        VerifyError::QualifiedSignerMismatch { .. }
    ));
    assert!(matches!(
        f.flip_quote(o.extra, 7),
        VerifyError::QualifyingDataMismatch { .. }
    ));
    // Fields with no expected value are covered by the signature.
    for (field, off) in [
        ("clock", o.clock + 7),
        ("resetCount", o.reset + 3),
        ("restartCount", o.restart + 3),
        ("firmwareVersion", o.firmware + 7),
    ] {
        assert_eq!(f.flip_quote(off, 0), VerifyError::BadSignature, "{field}");
    }
    // safe: YES -> NO is only caught by the signature; any other value is malformed.
    assert_eq!(f.flip_quote(o.safe, 0), VerifyError::BadSignature);
    assert_eq!(
        f.flip_quote(o.safe, 1),
        VerifyError::MalformedQuote(QuoteParseError::BadSafe(3))
    );
    assert!(matches!(
        f.flip_quote(o.count + 3, 1),
        VerifyError::MalformedQuote(_)
    ));
    assert!(matches!(
        f.flip_quote(o.hash + 1, 0),
        VerifyError::PcrSelectionMismatch { .. }
    ));
    assert!(matches!(
        f.flip_quote(o.select + 2, 0),
        VerifyError::PcrSelectionMismatch { .. }
    ));
    assert!(matches!(
        f.flip_quote(o.digest + 10, 4),
        VerifyError::LogDoesNotReplay { .. }
    ));
    // Length prefixes.
    assert!(matches!(
        f.flip_quote(o.signer - 1, 0),
        VerifyError::MalformedQuote(_)
    ));
    assert!(matches!(
        f.flip_quote(o.digest - 1, 6),
        VerifyError::MalformedQuote(_)
    ));
}

#[test]
fn trailing_bytes_after_quote() {
    let Some(f) = fixture() else { return };
    let mut ev = f.ev.clone();
    ev.quote.push(0);
    assert_eq!(
        f.check(&ev),
        VerifyError::MalformedQuote(QuoteParseError::Wire(WireError::TrailingBytes(
            1,
            "TPMS_ATTEST"
        )))
    );
}

#[test]
fn flipped_bit_in_signature() {
    let Some(f) = fixture() else { return };
    for part in 0..2 {
        let mut ev = f.ev.clone();
        let v = if part == 0 {
            &mut ev.signature.r
        } else {
            &mut ev.signature.s
        };
        v[17] ^= 0x20;
        assert_eq!(f.check(&ev), VerifyError::BadSignature);
    }
    let mut ev = f.ev.clone();
    ev.signature.r.push(1); // 33 bytes
    assert_eq!(f.check(&ev), VerifyError::BadSignature);
}

#[test]
fn wrong_nonce() {
    let Some(f) = fixture() else { return };
    let e =
        f.v.verify_evidence(&f.ev.to_cbor(), &qd(7, 2), &AGENT)
            .unwrap_err();
    assert!(
        matches!(e, VerifyError::QualifyingDataMismatch { .. }),
        "{e}"
    );
}

#[test]
fn wrong_channel_binding() {
    let Some(f) = fixture() else { return };
    let e =
        f.v.verify_evidence(&f.ev.to_cbor(), &qd(1, 8), &AGENT)
            .unwrap_err();
    assert!(
        matches!(e, VerifyError::QualifyingDataMismatch { .. }),
        "{e}"
    );
}

#[test]
fn old_quote_replayed_against_new_nonce() {
    let Some(mut f) = fixture() else { return };
    let old = f.ev.to_cbor();
    // A fresh session: new nonce, new quote verifies; the old evidence does not.
    let fresh_qd = qd(42, 2);
    let fresh = f.a.att.evidence(&fresh_qd).expect("quote").to_cbor();
    f.v.verify_evidence(&fresh, &fresh_qd, &AGENT)
        .expect("fresh quote verifies");
    let e = f.v.verify_evidence(&old, &fresh_qd, &AGENT).unwrap_err();
    assert!(
        matches!(e, VerifyError::QualifyingDataMismatch { .. }),
        "{e}"
    );
}

#[test]
fn event_log_that_does_not_replay() {
    let Some(f) = fixture() else { return };
    let mut ev = f.ev.clone();
    ev.event_log[1] = Measurement::AgentConfig([0x23; 32]);
    assert!(matches!(
        f.check(&ev),
        VerifyError::LogDoesNotReplay { events: 3, .. }
    ));
    // Same digest, different kind: the kind label is part of the extended value.
    let mut ev = f.ev.clone();
    ev.event_log[2] = Measurement::MigrationFinal(MANIFEST);
    assert!(matches!(f.check(&ev), VerifyError::LogDoesNotReplay { .. }));
}

#[test]
fn missing_event() {
    let Some(f) = fixture() else { return };
    let mut ev = f.ev.clone();
    ev.event_log.remove(1);
    assert!(matches!(
        f.check(&ev),
        VerifyError::LogDoesNotReplay { events: 2, .. }
    ));
    let mut ev = f.ev.clone();
    ev.event_log.pop();
    assert!(matches!(
        f.check(&ev),
        VerifyError::LogDoesNotReplay { events: 2, .. }
    ));
}

#[test]
fn extra_event() {
    let Some(f) = fixture() else { return };
    let mut ev = f.ev.clone();
    ev.event_log.push(Measurement::MigrationFinal([0x44; 32]));
    assert_eq!(f.check(&ev), VerifyError::ExtraEvents { extra: 1 });
}

#[test]
fn required_event_never_measured() {
    let Some(tpm) = trustmig_attest::swtpm::or_skip(trustmig_attest::swtpm::Swtpm::start()) else {
        return;
    };
    let mut att =
        trustmig_attest::tpm::TpmAttester::open(trustmig_attest::tpm::TpmConfig::new(tpm.tcti()))
            .expect("open");
    att.measure(&Measurement::AgentExecutable(EXE))
        .expect("extend");
    let v = verifier_for(&mut att);
    let q = qd(1, 2);
    let ev = att.evidence(&q).expect("quote").to_cbor();
    assert_eq!(
        v.verify_evidence(&ev, &q, &AGENT).unwrap_err(),
        VerifyError::MissingRequiredEvent(trustmig_attest::policy::EventKind::AgentConfig)
    );
}

#[test]
fn untrusted_ak() {
    let Some(mut f) = fixture() else { return };
    let mut p = policy_for(&mut f.a.att, AGENT);
    p.trusted_aks.clear();
    let v = PolicyVerifier::new(p);
    let e = v
        .verify_evidence(&f.ev.to_cbor(), &f.q, &AGENT)
        .unwrap_err();
    assert!(matches!(e, VerifyError::UntrustedAk { .. }), "{e}");
    // Through the protocol trait the same failure is an AttestationError naming it.
    let e = EvidenceVerifier::verify(&v, &f.ev.to_cbor(), &f.q, &AGENT).unwrap_err();
    assert!(e.reason.contains("not trusted"), "{}", e.reason);
}

#[test]
fn ak_enrolled_for_another_agent() {
    let Some(f) = fixture() else { return };
    let e =
        f.v.verify_evidence(&f.ev.to_cbor(), &f.q, &OTHER_AGENT)
            .unwrap_err();
    assert!(matches!(e, VerifyError::AkNotForPeer { .. }), "{e}");
}

#[test]
fn ak_from_a_different_tpm() {
    let Some(f) = fixture() else { return };
    // A second TPM quotes the same log and nonce but claims the trusted AK of the first.
    let Some(mut other) = agent() else { return };
    let mut ev = other.att.evidence(&f.q).expect("quote");
    ev.ak_public = f.ev.ak_public.clone();
    let e = f.check(&ev);
    assert!(
        matches!(e, VerifyError::QualifiedSignerMismatch { .. }),
        "{e}"
    );
    // Its own AK is simply not trusted.
    let ev = other.att.evidence(&f.q).expect("quote");
    assert!(matches!(f.check(&ev), VerifyError::UntrustedAk { .. }));
}

#[test]
fn ak_public_that_is_not_an_ak() {
    let Some(f) = fixture() else { return };
    let mut ev = f.ev.clone();
    ev.ak_public[5] |= 0x02; // objectAttributes bit 17: set `decrypt`
    assert!(matches!(f.check(&ev), VerifyError::AkPublic(_)));
}

#[test]
fn agent_measurement_outside_allow_list() {
    let Some(tpm) = trustmig_attest::swtpm::or_skip(trustmig_attest::swtpm::Swtpm::start()) else {
        return;
    };
    let mut att =
        trustmig_attest::tpm::TpmAttester::open(trustmig_attest::tpm::TpmConfig::new(tpm.tcti()))
            .expect("open");
    att.measure(&Measurement::AgentExecutable([0x66; 32]))
        .expect("extend");
    att.measure(&Measurement::AgentConfig(CONFIG))
        .expect("extend");
    let v = verifier_for(&mut att);
    let q = qd(1, 2);
    let ev = att.evidence(&q).expect("quote").to_cbor();
    let e = v.verify_evidence(&ev, &q, &AGENT).unwrap_err();
    assert_eq!(
        e,
        VerifyError::ExecutableNotAllowed(hex::encode([0x66; 32]))
    );

    // A fresh agent start (reopening resets the PCR) with an unknown configuration.
    let cfg = att.tpm().config().clone();
    drop(att);
    let mut fresh = trustmig_attest::tpm::TpmAttester::open(cfg).expect("reopen");
    fresh
        .measure(&Measurement::AgentExecutable(EXE))
        .expect("extend");
    fresh
        .measure(&Measurement::AgentConfig([0x77; 32]))
        .expect("extend");
    let ev = fresh.evidence(&q).expect("quote").to_cbor();
    assert_eq!(
        v.verify_evidence(&ev, &q, &AGENT).unwrap_err(),
        VerifyError::ConfigNotAllowed(hex::encode([0x77; 32]))
    );
}

#[test]
fn executable_must_be_first_event() {
    let Some(tpm) = trustmig_attest::swtpm::or_skip(trustmig_attest::swtpm::Swtpm::start()) else {
        return;
    };
    let mut att =
        trustmig_attest::tpm::TpmAttester::open(trustmig_attest::tpm::TpmConfig::new(tpm.tcti()))
            .expect("open");
    att.measure(&Measurement::AgentConfig(CONFIG))
        .expect("extend");
    att.measure(&Measurement::AgentExecutable(EXE))
        .expect("extend");
    let v = verifier_for(&mut att);
    let q = qd(1, 2);
    let ev = att.evidence(&q).expect("quote").to_cbor();
    assert_eq!(
        v.verify_evidence(&ev, &q, &AGENT).unwrap_err(),
        VerifyError::ExecutableNotFirst("agent-config".into())
    );
}

#[test]
fn pcr_extended_by_someone_else_between_log_and_quote() {
    let Some(mut f) = fixture() else { return };
    // Someone extends the PCR directly, bypassing the event log.
    f.a.att
        .tpm()
        .pcr_extend(&[0x99; 32])
        .expect("foreign extend");
    // The attester notices before quoting...
    assert!(matches!(
        f.a.att.evidence(&f.q),
        Err(TpmError::PcrDrift { pcr: 16, .. })
    ));
    // ...and the verifier rejects such a quote on its own.
    let ev = f.a.att.evidence_unchecked(&f.q).expect("quote");
    assert!(matches!(
        f.check(&ev),
        VerifyError::LogDoesNotReplay { events: 3, .. }
    ));
}

#[test]
fn quote_of_another_pcr_than_policy() {
    let Some(mut f) = fixture() else { return };
    let mut p = policy_for(&mut f.a.att, AGENT);
    p.pcr = 23;
    let e = PolicyVerifier::new(p)
        .verify_evidence(&f.ev.to_cbor(), &f.q, &AGENT)
        .unwrap_err();
    assert!(
        matches!(e, VerifyError::PcrSelectionMismatch { pcr: 23, .. }),
        "{e}"
    );
}

#[test]
fn garbage_evidence() {
    let Some(f) = fixture() else { return };
    let e =
        f.v.verify_evidence(b"\xa1\x61q\x00", &f.q, &AGENT)
            .unwrap_err();
    assert!(matches!(e, VerifyError::Decode(_)), "{e}");
    let mut bytes = f.ev.to_cbor();
    bytes.push(0);
    assert!(matches!(
        f.v.verify_evidence(&bytes, &f.q, &AGENT),
        Err(VerifyError::Decode(_))
    ));
}
