//! Quote/verify round trip through the protocol traits.

mod common;

use common::*;
use trustmig_attest::evidence::Evidence;
use trustmig_protocol::attestation::{Attester, EvidenceVerifier, Measurement};

#[test]
fn quote_verify_round_trip() {
    let Some(mut a) = agent() else { return };
    let v = verifier_for(&mut a.att);
    let q = qd(1, 2);
    let evidence = Attester::quote(&mut a.att, &q).expect("quote");
    let claims = v.verify(&evidence, &q, &AGENT).expect("verify");
    assert_eq!(
        claims.measurements,
        vec![
            Measurement::AgentExecutable(EXE),
            Measurement::AgentConfig(CONFIG),
            Measurement::ImageManifest(MANIFEST)
        ]
    );
    assert_eq!(claims.image_manifest(), Some(&MANIFEST));
    // The decoded evidence re-encodes to the same bytes.
    let ev = Evidence::from_cbor(&evidence).expect("decode");
    assert_eq!(ev.to_cbor(), evidence);
    // The qualified signer the TPM wrote is the one computed in pure Rust.
    let parsed = trustmig_attest::quote::QuoteInfo::parse(&ev.quote).expect("parse");
    assert_eq!(
        parsed.qualified_signer,
        a.att.tpm().ak_public().qualified_name()
    );
}

#[test]
fn ak_is_persisted_and_reloaded() {
    let Some(mut a) = agent() else { return };
    let name = a.att.tpm().ak_public().name();
    drop(a.att);
    let mut again =
        trustmig_attest::tpm::TpmAttester::open(trustmig_attest::tpm::TpmConfig::new(a.tpm.tcti()))
            .expect("reopen");
    assert_eq!(again.tpm().ak_public().name(), name);
    // Reopening reset the PCR: the fresh log verifies.
    again
        .measure(&Measurement::AgentExecutable(EXE))
        .expect("extend");
    again
        .measure(&Measurement::AgentConfig(CONFIG))
        .expect("extend");
    let v = verifier_for(&mut again);
    let q = qd(3, 4);
    let ev = again.evidence(&q).expect("quote").to_cbor();
    assert_eq!(
        v.verify_evidence(&ev, &q, &AGENT)
            .expect("verify")
            .measurements
            .len(),
        2
    );
}

/// The slow-TPM harness: a quote through it still verifies, and waits at least the delay a
/// hardware TPM takes to sign (swtpm alone quotes in a few ms).
#[test]
fn a_slow_tpm_quotes_correctly_and_slowly() {
    use trustmig_attest::slowtpm::{Delay, SlowTpm};
    let Some(a) = agent() else { return };
    let delay = std::time::Duration::from_millis(150);
    let slow = SlowTpm::start(a.tpm.port(), Delay::signing(delay)).expect("relay");
    drop(a.att); // one TCTI connection to the TPM at a time
    let mut att =
        trustmig_attest::tpm::TpmAttester::open(trustmig_attest::tpm::TpmConfig::new(slow.tcti()))
            .expect("open through the relay");
    att.measure(&Measurement::AgentExecutable(EXE))
        .expect("extend");
    att.measure(&Measurement::AgentConfig(CONFIG))
        .expect("extend");
    let v = verifier_for(&mut att);
    let q = qd(5, 6);
    let t = std::time::Instant::now();
    let ev = att.evidence(&q).expect("quote").to_cbor();
    assert!(t.elapsed() >= delay, "the quote waited {:?}", t.elapsed());
    assert_eq!(
        v.verify_evidence(&ev, &q, &AGENT)
            .expect("verify")
            .measurements,
        vec![
            Measurement::AgentExecutable(EXE),
            Measurement::AgentConfig(CONFIG)
        ]
    );
}

/// A long-running agent extends an image manifest and a final digest for every migration:
/// its log is rebased before it grows past what a verifier accepts (`MAX_EVENTS`), so its
/// quotes keep verifying, and each still carries what stands (executable first, the
/// configuration in force, the latest manifest) and the final digest it was taken for.
#[test]
fn a_long_running_agents_quotes_keep_verifying_past_the_event_limit() {
    use trustmig_attest::event_log::MAX_EVENTS;
    use trustmig_attest::tpm::REBASE_AT;
    let Some(mut a) = agent() else { return };
    let config2 = [0x23; 32];
    let mut policy = policy_for(&mut a.att, AGENT);
    policy.allowed_configs = Some(vec![CONFIG, config2]);
    let v = trustmig_attest::verify::PolicyVerifier::new(policy);
    let mut rebased = 0;
    for i in 0..MAX_EVENTS as u32 {
        let n = i.to_le_bytes()[0];
        if i == 100 {
            // A reload measures the new configuration.
            Attester::extend(&mut a.att, &Measurement::AgentConfig(config2)).expect("config");
        }
        let before = a.att.log().len();
        Attester::extend(&mut a.att, &Measurement::ImageManifest([n; 32])).expect("manifest");
        rebased += usize::from(a.att.log().len() < before);
        let q = qd(n, 2);
        let evidence = Attester::quote(&mut a.att, &q).expect("handshake quote");
        let claims = v
            .verify(&evidence, &q, &AGENT)
            .expect("handshake quote verifies");
        assert_eq!(claims.image_manifest(), Some(&[n; 32]));
        let before = a.att.log().len();
        Attester::extend(&mut a.att, &Measurement::MigrationFinal([!n; 32])).expect("final");
        rebased += usize::from(a.att.log().len() < before);
        let q = qd(n, 3);
        let evidence = Attester::quote(&mut a.att, &q).expect("final quote");
        let claims = v
            .verify(&evidence, &q, &AGENT)
            .expect("final quote verifies");
        assert_eq!(claims.migration_final(), Some(&[!n; 32]));
        assert!(
            claims.measurements.len() <= REBASE_AT + 1,
            "{}",
            claims.measurements.len()
        );
        assert_eq!(claims.measurements[0], Measurement::AgentExecutable(EXE));
        let config = if i >= 100 { config2 } else { CONFIG };
        assert!(claims
            .measurements
            .contains(&Measurement::AgentConfig(config)));
    }
    assert!(rebased >= 3, "{rebased} rebases in {MAX_EVENTS} migrations");
    // A rebase since the reload claims only the configuration in force.
    let log = a.att.log();
    assert!(!log.contains(&Measurement::AgentConfig(CONFIG)), "{log:?}");
    assert_eq!(
        log[..2],
        [
            Measurement::AgentExecutable(EXE),
            Measurement::AgentConfig(config2)
        ]
    );
}
