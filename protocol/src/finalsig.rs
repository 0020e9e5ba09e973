//! The source's final signature: the final digest signed in microseconds, while the guest is
//! stopped, by an ephemeral key the source's TPM vouched for at the handshake. spec: SPEC.md §8.7
//!
//! A hardware TPM signs in 100–600 ms; a TPM quote between the guest's stop and the
//! destination's `cont` adds that to every migration's downtime. So the source generates an
//! ed25519 key per session, binds its public half into the qualifying data of its handshake
//! quote (next to the destination's nonce, the TLS exporter, the order id and its identity),
//! and at switch-over signs the final digest with it. The TPM still quotes the final digest,
//! after `Resumed`, as evidence for the record; an order may ask for the quote before `Commit`
//! instead (strict mode).

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use crate::attestation::HANDSHAKE_LABEL;
use crate::error::PeerMisbehaved;
use crate::{sha256, AgentId, Digest};

/// Domain separation of the final signature.
pub const FINAL_SIGNATURE_LABEL: &[u8] = b"trustmig final signature v1";

/// The source's ephemeral signing key for one session; zeroized when dropped. Boxed, so that
/// moving it through the handshake's states moves a pointer, not copies of the secret.
pub struct FinalKey(Box<SigningKey>);

impl FinalKey {
    /// The key for `seed` (32 fresh random bytes, used once).
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self(Box::new(SigningKey::from_bytes(seed)))
    }

    /// Its public half, as the handshake carries it.
    pub fn public(&self) -> [u8; 32] {
        self.0.verifying_key().to_bytes()
    }

    /// Sign the final digest of this session for the destination's challenge.
    pub fn sign(&self, ctx: &FinalContext<'_>, digest: &Digest) -> [u8; 64] {
        self.0.sign(&signing_input(ctx, digest)).to_bytes()
    }
}

impl std::fmt::Debug for FinalKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FinalKey({})", crate::order::hex(&self.public()))
    }
}

/// What a final signature is bound to besides the digest: the destination's fresh challenge,
/// the TLS channel, the order and the handshake.
pub struct FinalContext<'a> {
    /// The destination's `FinalChallenge` nonce.
    pub nonce: &'a [u8; 32],
    /// The TLS exporter of the session.
    pub tls_exporter: &'a [u8; 32],
    /// The order.
    pub order_id: &'a [u8; 16],
    /// The handshake transcript hash.
    pub transcript_hash: &'a Digest,
}

/// `FINAL_SIGNATURE_LABEL || nonce || tls_exporter || order_id || transcript_hash || digest`,
/// wiped when dropped (it holds the session's exporter).
pub fn signing_input(ctx: &FinalContext<'_>, digest: &Digest) -> zeroize::Zeroizing<Vec<u8>> {
    zeroize::Zeroizing::new(
        [
            FINAL_SIGNATURE_LABEL,
            ctx.nonce,
            ctx.tls_exporter,
            ctx.order_id,
            ctx.transcript_hash,
            digest,
        ]
        .concat(),
    )
}

/// Check a final signature by the source's ephemeral key `public` (from its attested
/// handshake) over `digest`.
pub fn verify(
    public: &[u8; 32],
    signature: &[u8],
    ctx: &FinalContext<'_>,
    digest: &Digest,
) -> Result<(), PeerMisbehaved> {
    let bad = || PeerMisbehaved::BadFinalSignature;
    let key = VerifyingKey::from_bytes(public).map_err(|_| bad())?;
    let sig = Signature::from_slice(signature).map_err(|_| bad())?;
    key.verify_strict(&signing_input(ctx, digest), &sig)
        .map_err(|_| bad())
}

/// Qualifying data of the source's handshake quote: that of SPEC.md §6.1 with the public
/// final key appended, so the quote vouches for the key.
/// `SHA-256(HANDSHAKE_LABEL || nonce_d || tls_exporter || order_id || source_identity || final_key)`.
pub fn source_handshake_qualifying_data(
    nonce_d: &[u8; 32],
    tls_exporter: &[u8; 32],
    order_id: &[u8; 16],
    source: &AgentId,
    final_key: &[u8; 32],
) -> Digest {
    sha256(&[
        HANDSHAKE_LABEL,
        nonce_d,
        tls_exporter,
        order_id,
        source,
        final_key,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_binds_digest_challenge_channel_order_and_handshake() {
        let k = FinalKey::from_seed(&[7; 32]);
        let (n, x, o, t) = ([1; 32], [2; 32], [3; 16], [4; 32]);
        let ctx = FinalContext {
            nonce: &n,
            tls_exporter: &x,
            order_id: &o,
            transcript_hash: &t,
        };
        let sig = k.sign(&ctx, &[5; 32]);
        verify(&k.public(), &sig, &ctx, &[5; 32]).expect("verifies");
        // Another digest, another challenge (a replay), another key, a flipped bit: refused.
        assert!(verify(&k.public(), &sig, &ctx, &[6; 32]).is_err());
        let other = [9; 32];
        let replay = FinalContext {
            nonce: &other,
            ..ctx
        };
        let ctx = FinalContext {
            nonce: &n,
            tls_exporter: &x,
            order_id: &o,
            transcript_hash: &t,
        };
        assert!(verify(&k.public(), &sig, &replay, &[5; 32]).is_err());
        let wrong = FinalKey::from_seed(&[8; 32]);
        assert!(verify(&wrong.public(), &sig, &ctx, &[5; 32]).is_err());
        let mut flipped = sig;
        flipped[10] ^= 1;
        assert!(verify(&k.public(), &flipped, &ctx, &[5; 32]).is_err());
        assert!(verify(&k.public(), &sig[..63], &ctx, &[5; 32]).is_err());
        // The key stays out of Debug output: only its public half shows.
        assert!(!format!("{k:?}").contains(&crate::order::hex(&[7; 32])));
    }
}
