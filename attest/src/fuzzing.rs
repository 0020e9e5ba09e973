//! Fuzz entry points; each cargo-fuzz target is a one-line call. Never panics on any input
//! except when an internal invariant (round trip) is broken.

use crate::{event_log, policy::Policy, quote::QuoteInfo};

/// The `TPMS_ATTEST` parser; accepted input must re-encode to the same bytes.
pub fn tpms_attest(data: &[u8]) {
    if let Ok(q) = QuoteInfo::parse(data) {
        assert_eq!(
            q.to_bytes(),
            data,
            "TPMS_ATTEST parse/encode is not canonical"
        );
        let _ = q.selects_only(16);
    }
}

/// The event-log decoder; a decoded log re-encodes and decodes to the same log.
pub fn event_log(data: &[u8]) {
    if let Ok(log) = event_log::decode(data) {
        let again = event_log::decode(&event_log::encode(&log));
        assert_eq!(again.as_ref(), Ok(&log), "event log does not round-trip");
        let _ = event_log::replay(&log);
    }
}

/// The policy loader; an accepted policy re-serializes to TOML that parses to an equal policy.
pub fn policy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(p) = Policy::from_toml_str(text) {
        let again = Policy::from_toml_str(&p.to_toml());
        assert!(
            matches!(&again, Ok(q) if *q == p),
            "policy does not round-trip"
        );
    }
}

/// TPM public areas (an agent's AK, an EK from an enrollment request): parsed or refused; an
/// accepted AK's name is computed as the verifier computes it.
pub fn public_area(data: &[u8]) {
    if crate::public::AkPublic::parse(data).is_ok() {
        let _ = crate::public::object_name(data);
    }
    let _ = crate::public::EkPublic::parse(data);
}

/// Certificates (an EK certificate in an enrollment request, an EK CA file): one DER
/// certificate, and PEM text holding any number; each accepted one is read as the enroller
/// reads it, and checked as a chain to itself.
pub fn certificates(data: &[u8]) {
    let mut certs = Vec::new();
    certs.extend(crate::x509::Certificate::from_der(data));
    if let Ok(ders) = std::str::from_utf8(data).map(crate::x509::pem_certificates) {
        for der in ders.into_iter().flatten() {
            certs.extend(crate::x509::Certificate::from_der(&der));
        }
    }
    for c in &certs {
        let _ = (c.rsa_public(), c.subject(), c.der());
        // Within its own validity, so that the chain and signature checks run.
        let now = c.validity().0;
        let _ = crate::x509::verify_chain(c, &[], std::slice::from_ref(c), now);
    }
}

/// What a peer's handshake or an operator's enrollment files bring in CBOR: the evidence and
/// the three enrollment messages, decoded or refused.
pub fn cbor_messages(data: &[u8]) {
    if let Ok(e) = crate::evidence::Evidence::from_cbor(data) {
        let _ = crate::evidence::Evidence::from_cbor(&e.to_cbor()).expect("evidence re-encodes");
    }
    let _ = crate::EnrollRequest::from_cbor(data);
    let _ = crate::EnrollChallenge::from_cbor(data);
    let _ = crate::EnrollResponse::from_cbor(data);
}
