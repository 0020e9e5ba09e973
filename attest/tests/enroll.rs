//! Enrollment with MakeCredential/ActivateCredential against swtpm EK certificates.

use trustmig_attest::enroll::{EnrollError, EnrollResponse, Enroller};
use trustmig_attest::swtpm::{or_skip, LocalCa, Swtpm};
use trustmig_attest::tpm::{Tpm, TpmConfig, TpmError};
use trustmig_attest::x509::CertError;
use trustmig_attest::EnrollRequest;

const AGENT: [u8; 32] = [0x5a; 32];

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

struct Site {
    ca: LocalCa,
    _tpm: Swtpm,
    agent: Tpm,
}

fn site() -> Option<Site> {
    let ca = LocalCa::new().expect("CA dir");
    let tpm = or_skip(Swtpm::start_manufactured(&ca))?;
    let agent = Tpm::open(TpmConfig::new(tpm.tcti())).expect("open agent TPM");
    Some(Site {
        ca,
        _tpm: tpm,
        agent,
    })
}

/// The verifier's own TPM, used only for TPM2_MakeCredential.
fn verifier_tpm() -> Option<(Swtpm, Tpm)> {
    let t = or_skip(Swtpm::start())?;
    let tpm = Tpm::open(TpmConfig::new(t.tcti())).expect("open verifier TPM");
    Some((t, tpm))
}

#[test]
fn enrollment_succeeds_and_feeds_the_trust_store() {
    let Some(mut s) = site() else { return };
    let Some((_vt, mut maker)) = verifier_tpm() else {
        return;
    };
    let enroller =
        Enroller::from_pem(&s.ca.certificates_pem().expect("CA certs")).expect("anchors");

    let req = s.agent.enroll_request(AGENT).expect("request");
    let req = EnrollRequest::from_cbor(&req.to_cbor()).expect("request round trip");
    let (challenge, pending) = enroller
        .challenge(&req, &mut maker, now())
        .expect("challenge");
    let response = s.agent.activate_credential(&challenge).expect("activate");
    let response = EnrollResponse::from_cbor(&response.to_cbor()).expect("response round trip");
    let entry = pending.finish(&response).expect("enrolled");
    assert_eq!(entry.agent, AGENT);
    assert_eq!(entry.ak_name, s.agent.ak_public().name());
    let mut policy = trustmig_attest::Policy::from_toml_str(&format!(
        "version = 1\nallowed_executables = [\"{}\"]\n{}",
        hex::encode([1u8; 32]),
        entry.to_toml()
    ))
    .expect("policy with the enrolled AK");
    assert_eq!(policy.trusted_aks, vec![entry.clone()]);
    policy.trust(entry).expect("idempotent");
}

#[test]
fn enrollment_fails_with_wrong_ek_ca() {
    let Some(mut s) = site() else { return };
    let Some(other) = site() else { return };
    let Some((_vt, mut maker)) = verifier_tpm() else {
        return;
    };
    // The verifier trusts only the other site's CA.
    let enroller =
        Enroller::from_pem(&other.ca.certificates_pem().expect("CA certs")).expect("anchors");
    let req = s.agent.enroll_request(AGENT).expect("request");
    let err = enroller
        .challenge(&req, &mut maker, now())
        .err()
        .expect("must fail");
    assert!(
        matches!(
            err,
            EnrollError::EkCertUntrusted(CertError::Untrusted { .. })
        ),
        "{err}"
    );
}

#[test]
fn enrollment_fails_with_expired_ek_certificate() {
    let Some(mut s) = site() else { return };
    let Some((_vt, mut maker)) = verifier_tpm() else {
        return;
    };
    let enroller =
        Enroller::from_pem(&s.ca.certificates_pem().expect("CA certs")).expect("anchors");
    let req = s.agent.enroll_request(AGENT).expect("request");
    // Long before the certificate's notBefore.
    let err = enroller
        .challenge(&req, &mut maker, 0)
        .err()
        .expect("must fail");
    assert!(
        matches!(err, EnrollError::EkCertUntrusted(CertError::Expired { .. })),
        "{err}"
    );
}

#[test]
fn enrollment_fails_when_cert_is_for_another_ek() {
    let Some(mut s) = site() else { return };
    let Some(mut other) = site() else { return };
    let Some((_vt, mut maker)) = verifier_tpm() else {
        return;
    };
    let enroller =
        Enroller::from_pem(&s.ca.certificates_pem().expect("CA certs")).expect("anchors");
    let mut req = s.agent.enroll_request(AGENT).expect("request");
    req.ek_public = other.agent.ek_public().expect("other EK");
    let err = enroller
        .challenge(&req, &mut maker, now())
        .err()
        .expect("must fail");
    assert_eq!(err, EnrollError::EkMismatch);
}

#[test]
fn enrollment_fails_for_an_ak_from_a_different_tpm() {
    // The attacker presents a genuine EK (site A) with an AK that lives in TPM B.
    let Some(mut a) = site() else { return };
    let Some(mut b) = site() else { return };
    let Some((_vt, mut maker)) = verifier_tpm() else {
        return;
    };
    let enroller =
        Enroller::from_pem(&a.ca.certificates_pem().expect("CA certs")).expect("anchors");
    let mut req = a.agent.enroll_request(AGENT).expect("request");
    req.ak_public = b.agent.ak_public().as_bytes().to_vec();
    let (challenge, pending) = enroller
        .challenge(&req, &mut maker, now())
        .expect("challenge");
    // TPM A holds the EK but not an AK with that name: ActivateCredential fails.
    let err = a
        .agent
        .activate_credential(&challenge)
        .err()
        .expect("TPM A must refuse");
    assert!(
        matches!(
            err,
            TpmError::Command {
                command: "TPM2_ActivateCredential",
                ..
            }
        ),
        "{err}"
    );
    let text = err.to_string();
    eprintln!("typed TPM error: {text}");
    assert!(text.starts_with("TPM2_ActivateCredential on handle 0x81010020 failed: TPM_RC 0x000001df: integrity check failed"), "{text}");
    // TPM B holds the AK but not the EK: it cannot unwrap the secret either.
    let err = b
        .agent
        .activate_credential(&challenge)
        .err()
        .expect("TPM B must refuse");
    assert!(matches!(err, TpmError::Command { .. }), "{err}");
    // A guessed answer is refused by the verifier.
    let guess = EnrollResponse {
        secret: vec![0; 32],
    };
    assert_eq!(pending.finish(&guess).err(), Some(EnrollError::WrongSecret));
}

/// The activated credential is wiped when a response is dropped (a compile-time check:
/// removing the wipe fails to build). The verifier's pending secret is too, inside the crate.
#[test]
fn an_enrollment_response_is_wiped_when_dropped() {
    fn wiped_on_drop<T: zeroize::ZeroizeOnDrop>() {}
    wiped_on_drop::<EnrollResponse>();
}
