//! The pure-Rust evidence verifier. spec: attestation.md §3 (checks in this order)

use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};
use trustmig_protocol::attestation::{AttestationError, Claims, EvidenceVerifier, Measurement};
use trustmig_protocol::{ct_eq, AgentId, Digest};

use crate::event_log::{quoted_digest, replay_prefixes};
use crate::evidence::{Evidence, EvidenceDecodeError};
use crate::policy::{EventKind, Policy};
use crate::public::{AkPublic, PublicError};
use crate::quote::{QuoteInfo, QuoteParseError};

/// Why evidence was rejected. Every variant names what mismatched; none is ever ignored.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The evidence bytes are not the evidence structure.
    #[error("evidence: {0}")]
    Decode(#[from] EvidenceDecodeError),
    /// The AK public area is not an acceptable attestation key.
    #[error("AK public area: {0}")]
    AkPublic(#[from] PublicError),
    /// No trust-store entry for this AK.
    #[error("AK {ak_name} is not trusted for any agent")]
    UntrustedAk {
        /// Hex name of the AK.
        ak_name: String,
    },
    /// The AK is trusted, but for another agent than the peer.
    #[error("AK {ak_name} is enrolled for agent {enrolled_for}, not for peer {peer}")]
    AkNotForPeer {
        /// Hex name of the AK.
        ak_name: String,
        /// The agent it is enrolled for (hex).
        enrolled_for: String,
        /// The peer we are talking to (hex).
        peer: String,
    },
    /// `TPMS_ATTEST.magic` is wrong.
    #[error("quote magic {0:#010x} is not TPM_GENERATED_VALUE")]
    BadMagic(u32),
    /// `TPMS_ATTEST.type` is wrong.
    #[error("quote type {0:#06x} is not TPM_ST_ATTEST_QUOTE")]
    BadType(u16),
    /// `TPMS_ATTEST` is malformed in some other way.
    #[error("quote is malformed: {0}")]
    MalformedQuote(QuoteParseError),
    /// `qualifiedSigner` is not the AK's qualified name: another key signed this quote.
    #[error("quote qualifiedSigner {got} is not the AK's qualified name {expected}")]
    QualifiedSignerMismatch {
        /// Expected (hex).
        expected: String,
        /// Found (hex).
        got: String,
    },
    /// `extraData` is not the expected qualifying data (wrong nonce, channel, order or identity).
    #[error("quote extraData {got} is not the expected qualifying data {expected}")]
    QualifyingDataMismatch {
        /// Expected (hex).
        expected: String,
        /// Found (hex).
        got: String,
    },
    /// The quote does not select exactly the policy's PCR in the SHA-256 bank.
    #[error("quote selects {got}, policy requires exactly PCR {pcr} of the SHA-256 bank")]
    PcrSelectionMismatch {
        /// Policy PCR.
        pcr: u8,
        /// What the quote selects (debug form).
        got: String,
    },
    /// The signature is malformed or does not verify with the AK.
    #[error("quote signature does not verify with the AK")]
    BadSignature,
    /// A strict prefix of the log replays to the quoted PCR: events were appended.
    #[error("event log has {extra} extra event(s) after the quoted PCR state")]
    ExtraEvents {
        /// How many trailing events are not covered by the quote.
        extra: usize,
    },
    /// The event log does not replay to the quoted PCR digest (altered, missing or foreign event).
    #[error("event log of {events} events replays to pcrDigest {replayed}, quote has {quoted}")]
    LogDoesNotReplay {
        /// Number of events.
        events: usize,
        /// Replayed pcrDigest (hex).
        replayed: String,
        /// Quoted pcrDigest (hex).
        quoted: String,
    },
    /// The first event is not the agent executable measurement.
    #[error("first event is {0}, must be agent-executable")]
    ExecutableNotFirst(String),
    /// The agent executable measurement is not allow-listed.
    #[error("agent executable {0} is not allowed by policy")]
    ExecutableNotAllowed(String),
    /// The agent configuration measurement is not allow-listed.
    #[error("agent configuration {0} is not allowed by policy")]
    ConfigNotAllowed(String),
    /// A required event kind is absent from the log.
    #[error("required event {0} is missing from the event log")]
    MissingRequiredEvent(EventKind),
}

impl From<QuoteParseError> for VerifyError {
    fn from(e: QuoteParseError) -> Self {
        match e {
            QuoteParseError::BadMagic(m) => Self::BadMagic(m),
            QuoteParseError::BadType(t) => Self::BadType(t),
            other => Self::MalformedQuote(other),
        }
    }
}

/// Verifies TPM evidence against a [`Policy`]; implements [`EvidenceVerifier`].
#[derive(Clone, Debug)]
pub struct PolicyVerifier {
    policy: Policy,
}

impl PolicyVerifier {
    /// A verifier enforcing `policy`.
    pub fn new(policy: Policy) -> Self {
        Self { policy }
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Verify with typed errors. Checks run in the order of spec attestation.md §3; the first
    /// failure is returned and nothing is accepted after any failure.
    pub fn verify_evidence(
        &self,
        evidence: &[u8],
        qualifying_data: &Digest,
        peer: &AgentId,
    ) -> Result<Claims, VerifyError> {
        // 1. Decode.
        let ev = Evidence::from_cbor(evidence)?;
        // 2. AK public area, and its binding to the peer's identity.
        let ak = AkPublic::parse(&ev.ak_public)?;
        let name = ak.name();
        match self
            .policy
            .trusted_aks
            .iter()
            .find(|t| ct_eq(&t.ak_name, &name))
        {
            None => {
                return Err(VerifyError::UntrustedAk {
                    ak_name: hex::encode(&name),
                })
            }
            Some(t) if !ct_eq(&t.agent, peer) => {
                return Err(VerifyError::AkNotForPeer {
                    ak_name: hex::encode(&name),
                    enrolled_for: hex::encode(t.agent),
                    peer: hex::encode(peer),
                })
            }
            Some(_) => {}
        }
        // 3. Strict TPMS_ATTEST parse (magic, type, framing, trailing bytes).
        let q = QuoteInfo::parse(&ev.quote)?;
        // 4. Signer.
        let qn = ak.qualified_name();
        if !ct_eq(&q.qualified_signer, &qn) {
            return Err(VerifyError::QualifiedSignerMismatch {
                expected: hex::encode(&qn),
                got: hex::encode(&q.qualified_signer),
            });
        }
        // 5. Freshness and channel binding.
        if !ct_eq(&q.extra_data, qualifying_data) {
            return Err(VerifyError::QualifyingDataMismatch {
                expected: hex::encode(qualifying_data),
                got: hex::encode(&q.extra_data),
            });
        }
        // 6. PCR selection.
        if !q.selects_only(self.policy.pcr) {
            let got = q
                .pcr_select
                .iter()
                .map(|s| format!("bank {:#06x} bitmap {}", s.hash, hex::encode(&s.select)))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(VerifyError::PcrSelectionMismatch {
                pcr: self.policy.pcr,
                got,
            });
        }
        // 7. Event-log replay to the quoted pcrDigest.
        let prefixes = replay_prefixes(&ev.event_log);
        let events = ev.event_log.len();
        let full = quoted_digest(&prefixes[events]);
        if !ct_eq(&full, &q.pcr_digest) {
            if let Some(k) = prefixes[..events]
                .iter()
                .position(|p| ct_eq(&quoted_digest(p), &q.pcr_digest))
            {
                return Err(VerifyError::ExtraEvents { extra: events - k });
            }
            return Err(VerifyError::LogDoesNotReplay {
                events,
                replayed: hex::encode(full),
                quoted: hex::encode(&q.pcr_digest),
            });
        }
        // 8. Signature over the exact quote bytes (every field above, and clockInfo and
        //    firmwareVersion, are covered by it).
        let sig = ev.signature.to_fixed().ok_or(VerifyError::BadSignature)?;
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, ak.point())
            .verify(&ev.quote, &sig)
            .map_err(|_| VerifyError::BadSignature)?;
        // 9. Policy over the now-authenticated log.
        self.check_events(&ev.event_log)?;
        Ok(Claims {
            measurements: ev.event_log,
        })
    }

    fn check_events(&self, log: &[Measurement]) -> Result<(), VerifyError> {
        match log.first() {
            Some(Measurement::AgentExecutable(_)) => {}
            Some(m) => {
                return Err(VerifyError::ExecutableNotFirst(
                    EventKind::of(m).to_string(),
                ))
            }
            None => {
                return Err(VerifyError::MissingRequiredEvent(
                    EventKind::AgentExecutable,
                ))
            }
        }
        for m in log {
            match m {
                Measurement::AgentExecutable(d)
                    if !self.policy.allowed_executables.iter().any(|a| ct_eq(a, d)) =>
                {
                    return Err(VerifyError::ExecutableNotAllowed(hex::encode(d)));
                }
                Measurement::AgentConfig(d) => {
                    if let Some(allowed) = &self.policy.allowed_configs {
                        if !allowed.iter().any(|a| ct_eq(a, d)) {
                            return Err(VerifyError::ConfigNotAllowed(hex::encode(d)));
                        }
                    }
                }
                _ => {}
            }
        }
        for k in &self.policy.required_events {
            if !log.iter().any(|m| EventKind::of(m) == *k) {
                return Err(VerifyError::MissingRequiredEvent(*k));
            }
        }
        Ok(())
    }
}

impl EvidenceVerifier for PolicyVerifier {
    fn verify(
        &self,
        evidence: &[u8],
        qualifying_data: &Digest,
        peer: &AgentId,
    ) -> Result<Claims, AttestationError> {
        self.verify_evidence(evidence, qualifying_data, peer)
            .map_err(AttestationError::new)
    }
}
