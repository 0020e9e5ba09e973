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
