//! Pure-Rust formats without a TPM: policy files, TPMS_ATTEST parser limits, X.509 helpers,
//! and the fuzz entry points on seed inputs.

use trustmig_attest::event_log;
use trustmig_attest::fuzzing;
use trustmig_attest::policy::{EventKind, Policy, PolicyError};
use trustmig_attest::quote::{QuoteInfo, QuoteParseError};
use trustmig_attest::x509::{pem_certificates, CertError, Certificate};
use trustmig_protocol::attestation::Measurement;

const EXE: &str = "1111111111111111111111111111111111111111111111111111111111111111";

fn policy_text() -> String {
    format!(
        r#"version = 1
pcr = 23
allowed_executables = ["{EXE}"]
allowed_configs = ["{}"]
required_events = ["agent-executable", "image-manifest"]

[[trusted_ak]]
agent = "{}"
ak_name = "000b{}"
"#,
        "22".repeat(32),
        "a7".repeat(32),
        "cd".repeat(32)
    )
}

#[test]
fn policy_parses_and_round_trips() {
    let p = Policy::from_toml_str(&policy_text()).expect("policy");
    assert_eq!(p.pcr, 23);
    assert_eq!(p.allowed_executables, vec![[0x11; 32]]);
    assert_eq!(p.allowed_configs, Some(vec![[0x22; 32]]));
    assert_eq!(
        p.required_events,
        vec![EventKind::AgentExecutable, EventKind::ImageManifest]
    );
    assert_eq!(p.trusted_aks.len(), 1);
    assert_eq!(Policy::from_toml_str(&p.to_toml()).expect("again"), p);
    fuzzing::policy(policy_text().as_bytes());
}

#[test]
fn policy_errors_are_specific() {
    let t = policy_text();
    let e = |s: &str| Policy::from_toml_str(s).expect_err("must fail");
    assert!(matches!(
        e(&t.replace("version = 1", "version = 2")),
        PolicyError::Version(2)
    ));
    assert!(matches!(
        e(&t.replace("pcr = 23", "pcr = 10")),
        PolicyError::Pcr(10)
    ));
    assert!(matches!(
        e(&t.replace(&format!("[\"{EXE}\"]"), "[]")),
        PolicyError::NoExecutables
    ));
    assert!(matches!(
        e(&t.replace(EXE, "11")),
        PolicyError::BadValue {
            field: "allowed_executables",
            ..
        }
    ));
    assert!(matches!(
        e(&format!("{t}log_only = true\n")),
        PolicyError::Syntax(_)
    ));
    assert!(matches!(
        e(&t.replace("image-manifest", "whatever")),
        PolicyError::Syntax(_)
    ));
    assert!(matches!(
        e(&t.replace("000b", "0004")),
        PolicyError::BadValue {
            field: "trusted_ak.ak_name",
            ..
        }
    ));
    let dup = format!(
        "{t}\n[[trusted_ak]]\nagent = \"{}\"\nak_name = \"000b{}\"\n",
        "b8".repeat(32),
        "cd".repeat(32)
    );
    assert!(matches!(e(&dup), PolicyError::DuplicateAk(_)));
}

/// A policy file is read up to its limit: larger ones are refused by size, as is text that
/// is not UTF-8, and a good one reads back.
#[test]
fn policy_files_are_bounded_and_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, policy_text()).expect("write");
    assert!(Policy::from_file(&path).is_ok());
    let big = trustmig_attest::policy::MAX_POLICY_SIZE + 10;
    std::fs::write(&path, vec![b'#'; big]).expect("write");
    match Policy::from_file(&path) {
        Err(PolicyError::TooLarge(n)) => assert_eq!(n, big),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    // A device that never ends is refused by what was read of it, not read for ever.
    match Policy::from_file(std::path::Path::new("/dev/zero")) {
        Err(PolicyError::TooLarge(n)) => {
            assert_eq!(n, trustmig_attest::policy::MAX_POLICY_SIZE + 1)
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    std::fs::write(&path, [0xff, 0xfe]).expect("write");
    let e = Policy::from_file(&path).expect_err("not UTF-8");
    assert!(e.to_string().contains("policy.toml"), "{e}");
    let e = Policy::from_file(&dir.path().join("none")).expect_err("missing");
    assert!(matches!(e, PolicyError::Io { .. }), "{e:?}");
}

fn sample_quote() -> Vec<u8> {
    let q = QuoteInfo {
        qualified_signer: vec![0, 0x0b].into_iter().chain([7; 32]).collect(),
        extra_data: vec![9; 32],
        clock: 1234,
        reset_count: 1,
        restart_count: 0,
        safe: true,
        firmware_version: 0x2019_1023_0016_3636,
        pcr_select: vec![trustmig_attest::quote::PcrSelection {
            hash: 0x000b,
            select: vec![0, 0, 1],
        }],
        pcr_digest: vec![5; 32],
    };
    q.to_bytes()
}

#[test]
fn tpms_attest_parser_is_strict_and_canonical() {
    let bytes = sample_quote();
    let q = QuoteInfo::parse(&bytes).expect("parse");
    assert!(q.selects_only(16));
    assert!(!q.selects_only(23));
    fuzzing::tpms_attest(&bytes);
    for cut in 0..bytes.len() {
        assert!(
            QuoteInfo::parse(&bytes[..cut]).is_err(),
            "truncated at {cut} accepted"
        );
        fuzzing::tpms_attest(&bytes[..cut]);
    }
    let mut b = bytes.clone();
    b[4] = 0x80;
    b[5] = 0x17; // TPM_ST_ATTEST_CERTIFY
    assert_eq!(QuoteInfo::parse(&b), Err(QuoteParseError::BadType(0x8017)));
    let mut b = bytes.clone();
    b[6] = 0xff; // qualifiedSigner size way beyond TPM2B_NAME
    assert!(matches!(
        QuoteInfo::parse(&b),
        Err(QuoteParseError::Wire(_))
    ));
}

#[test]
fn event_log_round_trip_and_replay() {
    let log = vec![
        Measurement::AgentExecutable([1; 32]),
        Measurement::ImageManifest([2; 32]),
    ];
    let bytes = event_log::encode(&log);
    assert_eq!(event_log::decode(&bytes).expect("decode"), log);
    fuzzing::event_log(&bytes);
    fuzzing::event_log(&bytes[..bytes.len() - 1]);
    let prefixes = event_log::replay_prefixes(&log);
    assert_eq!(prefixes[0], [0; 32]);
    assert_eq!(
        prefixes[1],
        trustmig_protocol::sha256(&[&[0; 32], &log[0].pcr_digest()])
    );
    assert_eq!(event_log::replay(&log), prefixes[2]);
    let long: Vec<_> = (0..=event_log::MAX_EVENTS)
        .map(|_| Measurement::AgentConfig([0; 32]))
        .collect();
    assert!(matches!(
        event_log::decode(&event_log::encode(&long)),
        Err(event_log::EventLogError::TooLong(_))
    ));
}

#[test]
fn x509_helpers_reject_garbage() {
    assert!(matches!(
        pem_certificates("no pem here"),
        Err(CertError::Pem(_))
    ));
    assert!(matches!(
        pem_certificates("-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n"),
        Err(CertError::Pem(_))
    ));
    assert!(matches!(
        Certificate::from_der(&[0x30, 0x03, 0x02, 0x01]),
        Err(CertError::Malformed(_))
    ));
    assert!(matches!(
        Certificate::from_der(&[]),
        Err(CertError::Malformed(_))
    ));
}

/// Deterministic mutation smoke test of the fuzz entry points (the real fuzzing is cargo-fuzz).
#[test]
fn fuzz_entry_points_survive_mutations() {
    let seeds: Vec<Vec<u8>> = vec![
        sample_quote(),
        event_log::encode(&[
            Measurement::AgentExecutable([1; 32]),
            Measurement::MigrationFinal([3; 32]),
        ]),
        policy_text().into_bytes(),
    ];
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for _ in 0..3000 {
        for (i, seed) in seeds.iter().enumerate() {
            let mut m = seed.clone();
            for _ in 0..(next() % 4 + 1) {
                let pos = (next() as usize) % m.len().max(1);
                match next() % 3 {
                    0 if !m.is_empty() => m[pos] ^= 1 << (next() % 8),
                    1 if !m.is_empty() => m.truncate(pos),
                    _ => m.insert(pos.min(m.len()), next() as u8),
                }
            }
            match i {
                0 => fuzzing::tpms_attest(&m),
                1 => fuzzing::event_log(&m),
                _ => fuzzing::policy(&m),
            }
            let _ = Certificate::from_der(&m);
        }
    }
}
