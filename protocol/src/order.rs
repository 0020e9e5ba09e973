//! Signed migration orders: the control-plane defence. spec: SPEC.md §3
//!
//! An operator signs the exact CBOR bytes of an [`OrderBody`]; agents verify the signature over
//! those bytes (never a re-encoding), then the validity window, then their own role. A
//! [`VerifiedOrder`] can only be obtained through [`SignedOrder::verify`], so code that holds one
//! knows all checks passed. Single use is the [`OrderJournal`]'s job.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::{codec, AgentId};

/// Version of the order body format.
pub const ORDER_VERSION: u8 = 1;
/// Largest accepted order body, in bytes. spec: SPEC.md §9
pub const MAX_ORDER_BODY: usize = 4096;
/// Longest validity window an order may have, in seconds (one day). spec: SPEC.md §3.3
pub const MAX_ORDER_LIFETIME: u64 = 24 * 3600;
/// Clock skew tolerated between operator and agents, in seconds. spec: SPEC.md §3.3
pub const MAX_CLOCK_SKEW: u64 = 120;
/// Most pre-copy rounds an order may ask for. spec: SPEC.md §9
pub const MAX_ROUNDS_LIMIT: u32 = 1000;

/// 16 random bytes naming one migration.
pub type OrderId = [u8; 16];

/// What to do when pre-copy does not converge within the order's rounds. spec: SPEC.md §8.4
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NonConvergence {
    /// Slow the guest's vCPUs in steps and keep going; switch over at the last step.
    Throttle,
    /// Switch over anyway, accepting a longer downtime.
    Force,
    /// Give up; the source keeps running.
    Abort,
}

impl std::str::FromStr for NonConvergence {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "throttle" => Ok(Self::Throttle),
            "force" => Ok(Self::Force),
            "abort" => Ok(Self::Abort),
            other => Err(format!(
                "unknown non-convergence action {other:?} (throttle, force, abort)"
            )),
        }
    }
}

/// Limits an operator puts on one migration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Target downtime (pause to resume), milliseconds; must be > 0.
    pub downtime_ms: u32,
    /// Bandwidth cap in bytes per second; 0 means uncapped.
    pub bandwidth_bps: u64,
    /// Most pre-copy rounds before the non-convergence action; 1..=[`MAX_ROUNDS_LIMIT`].
    pub max_rounds: u32,
    /// What to do when the rounds run out.
    pub on_nonconvergence: NonConvergence,
}

/// The signed content of an order. spec: SPEC.md §3.1, `order-body` in messages.cddl
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderBody {
    /// Format version, [`ORDER_VERSION`].
    pub v: u8,
    /// Single-use identifier.
    #[serde(with = "serde_bytes")]
    pub order_id: OrderId,
    /// Which VM to move (agent-local name).
    pub vm: String,
    /// Identity key of the agent that sends the VM.
    #[serde(with = "serde_bytes")]
    pub source: AgentId,
    /// Identity key of the agent that receives it.
    #[serde(with = "serde_bytes")]
    pub destination: AgentId,
    /// Where the source dials the destination (`host:port`).
    pub destination_addr: String,
    /// Migration limits.
    pub limits: Limits,
    /// Not valid before this UNIX time (seconds).
    pub not_before: u64,
    /// Not valid after this UNIX time (seconds).
    pub not_after: u64,
    /// Strict mode: the source's TPM quotes the final digest before `Commit` (inside the
    /// guest's downtime) instead of after `Resumed` (SPEC.md §8.7). Absent when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub strict_final_quote: bool,
}

/// An order as it travels: the exact body bytes, who signed them, and the signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedOrder {
    /// CBOR of an [`OrderBody`], exactly as signed.
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// The operator's ed25519 public key.
    #[serde(with = "serde_bytes")]
    pub operator: [u8; 32],
    /// ed25519 signature over `"trustmig order v1" || body`.
    #[serde(with = "serde_bytes")]
    pub sig: Vec<u8>,
}

/// Domain separation for order signatures. spec: SPEC.md §3.2
pub const ORDER_SIGNING_CONTEXT: &[u8] = b"trustmig order v1";

/// Which end of a migration the verifying agent is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Sends the VM; dials the peer.
    Source,
    /// Receives the VM; accepts the peer.
    Destination,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Source => "source",
            Self::Destination => "destination",
        })
    }
}

/// Why an order was refused. Each names what was wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OrderError {
    /// The order's operator key is not in this agent's trust store.
    #[error("order signed by operator key {0} which is not trusted here (add it with `trustmig trust add-operator`)")]
    UnknownOperator(String),
    /// The signature does not verify over the body.
    #[error("order signature does not verify (forged or altered order)")]
    BadSignature,
    /// The signed order or its body could not be decoded.
    #[error("order is malformed: {0}")]
    Malformed(String),
    /// Body is larger than [`MAX_ORDER_BODY`].
    #[error("order body of {0} bytes exceeds {MAX_ORDER_BODY}")]
    TooLarge(usize),
    /// Unknown body version.
    #[error("order version {0} is not supported (this agent speaks {ORDER_VERSION})")]
    UnsupportedVersion(u8),
    /// `now` is before `not_before` (beyond the skew allowance).
    #[error("order is not valid yet (valid from UNIX time {not_before}, now {now})")]
    NotYetValid {
        /// Start of validity.
        not_before: u64,
        /// The verifier's time.
        now: u64,
    },
    /// `now` is after `not_after` (beyond the skew allowance).
    #[error("order expired at UNIX time {not_after} (now {now}); sign a new one")]
    Expired {
        /// End of validity.
        not_after: u64,
        /// The verifier's time.
        now: u64,
    },
    /// Validity window empty or longer than [`MAX_ORDER_LIFETIME`].
    #[error("order validity window {0}s is empty or longer than {MAX_ORDER_LIFETIME}s")]
    BadWindow(u64),
    /// The order names other agents than the verifier in its role.
    #[error("order names {expected_role} {named} but this agent is {me}")]
    WrongAgent {
        /// The role the verifier plays.
        expected_role: Role,
        /// Hex of the key the order names for that role.
        named: String,
        /// Hex of the verifier's own key.
        me: String,
    },
    /// Source and destination are the same agent.
    #[error("order names the same agent as source and destination")]
    SameAgent,
    /// A limit is out of range.
    #[error("order limit out of range: {0}")]
    BadLimits(String),
    /// The order id was used before.
    #[error("order {0} was already used (replayed order refused)")]
    Replayed(String),
    /// The operator revoked the order on this agent (`trustmig order revoke`).
    #[error("order {0} was revoked by the operator")]
    Revoked(String),
    /// The journal could not record the id.
    #[error("order journal failed: {0}")]
    Journal(String),
}

/// What an agent trusts and knows when verifying an order.
#[derive(Clone, Debug)]
pub struct OrderPolicy<'a> {
    /// Operator keys allowed to sign orders.
    pub operators: &'a [[u8; 32]],
    /// The verifying agent's own identity.
    pub me: AgentId,
    /// Which role the verifying agent plays.
    pub role: Role,
    /// The verifier's current UNIX time in seconds (sans-IO: the caller reads the clock).
    pub now: u64,
}

/// An order whose signature, window, limits and role all checked out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedOrder {
    body: OrderBody,
    signed: SignedOrder,
}

impl VerifiedOrder {
    /// The verified body.
    pub fn body(&self) -> &OrderBody {
        &self.body
    }
    /// The order as signed (to forward to the peer unchanged).
    pub fn signed(&self) -> &SignedOrder {
        &self.signed
    }
    /// The order id.
    pub fn id(&self) -> &OrderId {
        &self.body.order_id
    }
}

/// Lower-case hex, for messages.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl SignedOrder {
    /// Encode and sign `body` with the operator key.
    pub fn sign(body: &OrderBody, key: &SigningKey) -> Self {
        let body = codec::encode(body);
        let sig = key.sign(&signing_input(&body));
        Self {
            body,
            operator: key.verifying_key().to_bytes(),
            sig: sig.to_bytes().to_vec(),
        }
    }

    /// Decode a signed order from its CBOR file or wire form.
    pub fn from_cbor(bytes: &[u8]) -> Result<Self, OrderError> {
        codec::decode(bytes).map_err(|e| OrderError::Malformed(e.to_string()))
    }

    /// Its CBOR form.
    pub fn to_cbor(&self) -> Vec<u8> {
        codec::encode(self)
    }

    /// Decode the body without verifying anything (for display of a refused order).
    pub fn dangerous_unverified_body(&self) -> Result<OrderBody, OrderError> {
        codec::decode(&self.body).map_err(|e| OrderError::Malformed(e.to_string()))
    }

    /// Check signature, format, window, limits and role. spec: SPEC.md §3.3, in that order.
    pub fn verify(&self, policy: &OrderPolicy<'_>) -> Result<VerifiedOrder, OrderError> {
        if self.body.len() > MAX_ORDER_BODY {
            return Err(OrderError::TooLarge(self.body.len()));
        }
        if !policy
            .operators
            .iter()
            .any(|k| crate::ct_eq(k, &self.operator))
        {
            return Err(OrderError::UnknownOperator(hex(&self.operator)));
        }
        let key = VerifyingKey::from_bytes(&self.operator).map_err(|_| OrderError::BadSignature)?;
        let sig = Signature::from_slice(&self.sig).map_err(|_| OrderError::BadSignature)?;
        key.verify_strict(&signing_input(&self.body), &sig)
            .map_err(|_| OrderError::BadSignature)?;
        // Only authenticated bytes reach the body parser.
        let body: OrderBody = self.dangerous_unverified_body()?;
        check_body(&body, policy)?;
        Ok(VerifiedOrder {
            body,
            signed: self.clone(),
        })
    }
}

fn signing_input(body: &[u8]) -> Vec<u8> {
    [ORDER_SIGNING_CONTEXT, body].concat()
}

fn check_body(body: &OrderBody, policy: &OrderPolicy<'_>) -> Result<(), OrderError> {
    if body.v != ORDER_VERSION {
        return Err(OrderError::UnsupportedVersion(body.v));
    }
    let window = body.not_after.saturating_sub(body.not_before);
    if body.not_after <= body.not_before || window > MAX_ORDER_LIFETIME {
        return Err(OrderError::BadWindow(window));
    }
    if policy.now.saturating_add(MAX_CLOCK_SKEW) < body.not_before {
        return Err(OrderError::NotYetValid {
            not_before: body.not_before,
            now: policy.now,
        });
    }
    if policy.now > body.not_after.saturating_add(MAX_CLOCK_SKEW) {
        return Err(OrderError::Expired {
            not_after: body.not_after,
            now: policy.now,
        });
    }
    check_limits(&body.limits)?;
    if body.source == body.destination {
        return Err(OrderError::SameAgent);
    }
    if body.destination_addr.is_empty() || body.destination_addr.len() > 255 {
        return Err(OrderError::Malformed(
            "destination_addr must be 1..=255 bytes".into(),
        ));
    }
    if body.vm.is_empty() || body.vm.len() > 255 {
        return Err(OrderError::Malformed(
            "vm name must be 1..=255 bytes".into(),
        ));
    }
    let named = match policy.role {
        Role::Source => &body.source,
        Role::Destination => &body.destination,
    };
    if !crate::ct_eq(named, &policy.me) {
        return Err(OrderError::WrongAgent {
            expected_role: policy.role,
            named: hex(named),
            me: hex(&policy.me),
        });
    }
    Ok(())
}

/// Range checks on limits. Verification applies them; signing tools (`trustmig order sign`)
/// call them before [`SignedOrder::sign`], which signs whatever it is given.
pub fn check_limits(l: &Limits) -> Result<(), OrderError> {
    if l.downtime_ms == 0 {
        return Err(OrderError::BadLimits("downtime_ms must be > 0".into()));
    }
    if l.max_rounds == 0 || l.max_rounds > MAX_ROUNDS_LIMIT {
        return Err(OrderError::BadLimits(format!(
            "max_rounds {} not in 1..={MAX_ROUNDS_LIMIT}",
            l.max_rounds
        )));
    }
    Ok(())
}

/// Records order ids so that each is used once. Implementations must make the record durable
/// (fsync) before returning `Ok`, and keep it at least until `not_after` + skew has passed.
/// spec: SPEC.md §3.4
pub trait OrderJournal {
    /// Record `order.order_id` as used; fails with [`OrderError::Replayed`] if it was used
    /// before. The whole (verified) body and the key of the operator who signed it are given so
    /// the journal can record what it was for and by whom.
    fn claim(&mut self, order: &OrderBody, operator: &[u8; 32]) -> Result<(), OrderError>;
}

/// An in-memory journal for tests and the fuzzer (not durable).
#[derive(Default, Debug)]
pub struct MemoryJournal {
    used: std::collections::HashSet<OrderId>,
}

impl OrderJournal for MemoryJournal {
    fn claim(&mut self, order: &OrderBody, _operator: &[u8; 32]) -> Result<(), OrderError> {
        if self.used.insert(order.order_id) {
            Ok(())
        } else {
            Err(OrderError::Replayed(hex(&order.order_id)))
        }
    }
}
