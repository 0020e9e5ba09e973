//! Key schedule: everything the session's keys come from. spec: SPEC.md §6.4
//!
//! `PRK = HMAC-SHA256(salt = transcript_hash, ikm = tls_exporter)` (HKDF-Extract), then
//! `HKDF-Expand(PRK, "trustmig v1 " || label || context, L)` for each key. The TLS exporter binds
//! every key to the mutually authenticated TLS session; the transcript hash binds it to both
//! nonces, the order and both attestations. Secrets are private, not `Debug`, not `Clone`, and
//! zeroized on drop (ring's own key schedules for AES/HMAC are out of our reach).

use ring::{hkdf, hmac};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::order::Role;
use crate::Digest;

/// Label prefix of every expansion.
pub const LABEL_PREFIX: &[u8] = b"trustmig v1 ";
/// The TLS exporter label both agents use (RFC 8446 §7.5), with an empty context.
pub const TLS_EXPORTER_LABEL: &[u8] = b"EXPORTER-trustmig-v1";

/// Direction of a data stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Source to destination (pages, device state).
    SourceToDestination = 0,
    /// Destination to source (unused by pre-copy today; reserved, keys still distinct).
    DestinationToSource = 1,
}

/// The session's root secret.
#[derive(ZeroizeOnDrop)]
pub struct KeySchedule {
    prk: [u8; 32],
}

/// A record-layer key and IV for one direction of one stream.
#[derive(ZeroizeOnDrop)]
pub struct TrafficSecret {
    key: [u8; 32],
    iv: [u8; 12],
}

struct Len(usize);
impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn expand(prk: &[u8; 32], label: &[u8], context: &[u8], out: &mut [u8]) {
    let prk = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, prk);
    let info = [LABEL_PREFIX, label, context];
    prk.expand(&info, Len(out.len()))
        .and_then(|okm| okm.fill(out))
        .expect("HKDF-Expand output is at most 32 bytes, far under 255*32");
}

impl KeySchedule {
    /// HKDF-Extract from the TLS exporter, salted with the handshake transcript hash.
    pub fn new(tls_exporter: &[u8; 32], transcript_hash: &Digest) -> Self {
        let salt = hmac::Key::new(hmac::HMAC_SHA256, transcript_hash);
        let tag = hmac::sign(&salt, tls_exporter);
        let mut prk = [0u8; 32];
        prk.copy_from_slice(tag.as_ref());
        Self { prk }
    }

    /// The HMAC key for `role`'s key-confirmation (`Finished`) message.
    pub fn confirm_key(&self, role: Role) -> Zeroizing<[u8; 32]> {
        let mut k = Zeroizing::new([0u8; 32]);
        let label: &[u8] = match role {
            Role::Source => b"confirm source",
            Role::Destination => b"confirm destination",
        };
        expand(&self.prk, label, &[], k.as_mut());
        k
    }

    /// Public session identifier that data streams present when they connect.
    pub fn session_id(&self) -> [u8; 16] {
        let mut id = [0u8; 16];
        expand(&self.prk, b"session id", &[], &mut id);
        id
    }

    /// Key and IV for data stream `stream` in direction `dir`.
    /// Context = direction byte || stream index (u16 big-endian).
    pub fn stream_secret(&self, dir: Direction, stream: u16) -> TrafficSecret {
        let ctx = [dir as u8, (stream >> 8) as u8, stream as u8];
        let mut s = TrafficSecret {
            key: [0; 32],
            iv: [0; 12],
        };
        expand(&self.prk, b"stream key", &ctx, &mut s.key);
        expand(&self.prk, b"stream iv", &ctx, &mut s.iv);
        s
    }

    /// `Finished` MAC for `role` over the transcript hash.
    pub fn finished_mac(&self, role: Role, transcript_hash: &Digest) -> [u8; 32] {
        let key = self.confirm_key(role);
        let key = hmac::Key::new(hmac::HMAC_SHA256, key.as_ref());
        let tag = hmac::sign(
            &key,
            &[b"trustmig finished".as_slice(), transcript_hash].concat(),
        );
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }
}

impl TrafficSecret {
    /// The next epoch's secret: key' = Expand(key, "key update"), iv' = Expand(key, "iv update").
    pub fn update(&self) -> TrafficSecret {
        let mut next = TrafficSecret {
            key: [0; 32],
            iv: [0; 12],
        };
        expand(&self.key, b"key update", &[], &mut next.key);
        expand(&self.key, b"iv update", &[], &mut next.iv);
        next
    }

    pub(crate) fn key(&self) -> &[u8; 32] {
        &self.key
    }

    pub(crate) fn iv(&self) -> &[u8; 12] {
        &self.iv
    }

    /// The raw key and IV, for test vectors only. Named `dangerous_` because it exports a secret.
    #[cfg(feature = "testing")]
    pub fn dangerous_export(&self) -> ([u8; 32], [u8; 12]) {
        (self.key, self.iv)
    }

    /// Build a secret from raw bytes, for test vectors and benchmarks only.
    #[cfg(feature = "testing")]
    pub fn dangerous_from_bytes(key: [u8; 32], iv: [u8; 12]) -> Self {
        Self { key, iv }
    }
}

impl KeySchedule {
    /// The PRK, for test vectors only.
    #[cfg(feature = "testing")]
    pub fn dangerous_prk(&self) -> [u8; 32] {
        self.prk
    }
}

// Explicit so that a future field cannot silently escape zeroization.
impl Zeroize for TrafficSecret {
    fn zeroize(&mut self) {
        self.key.zeroize();
        self.iv.zeroize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_differ_by_direction_stream_and_epoch() {
        let ks = KeySchedule::new(&[1; 32], &[2; 32]);
        let a = ks
            .stream_secret(Direction::SourceToDestination, 0)
            .dangerous_export();
        let b = ks
            .stream_secret(Direction::DestinationToSource, 0)
            .dangerous_export();
        let c = ks
            .stream_secret(Direction::SourceToDestination, 1)
            .dangerous_export();
        let d = ks
            .stream_secret(Direction::SourceToDestination, 0)
            .update()
            .dangerous_export();
        assert_ne!(a.0, b.0);
        assert_ne!(a.0, c.0);
        assert_ne!(a.0, d.0);
        assert_ne!(
            ks.confirm_key(Role::Source)[..],
            ks.confirm_key(Role::Destination)[..]
        );
    }

    #[test]
    fn bound_to_exporter_and_transcript() {
        let base = KeySchedule::new(&[1; 32], &[2; 32]).dangerous_prk();
        assert_ne!(base, KeySchedule::new(&[9; 32], &[2; 32]).dangerous_prk());
        assert_ne!(base, KeySchedule::new(&[1; 32], &[9; 32]).dangerous_prk());
    }
}
