//! Agent identities (ed25519, PKCS#8 + self-signed certificate) and operator keys.
//!
//! Peers pin each other's identity *key*; the certificate only carries it through TLS.

use std::path::Path;
use std::sync::Arc;

use ring::signature::{Ed25519KeyPair, KeyPair};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use zeroize::Zeroizing;

use crate::error::AgentError;
use crate::home::{read_secret, write_atomic, write_secret, Home};
use trustmig_protocol::AgentId;

/// A loaded agent identity.
pub struct Identity {
    cert: Vec<u8>,
    id: AgentId,
    /// The certificate and its signing key for rustls, made once from the key where it lies:
    /// every TLS configuration (one per connection, for the trust store's changes to apply at
    /// once) shares it, instead of each taking a fresh copy of the private key that rustls
    /// frees unwiped.
    tls: Arc<rustls::sign::CertifiedKey>,
}

impl Identity {
    /// Generate a new identity in `home` (refuses to overwrite).
    pub fn create(home: &Home) -> Result<Self, AgentError> {
        if home.identity_key().exists() {
            return Err(AgentError::HomeExists(home.root().to_path_buf()));
        }
        let rng = ring::rand::SystemRandom::new();
        let doc = Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| AgentError::Tpm("OS RNG failed".into()))?;
        let pkcs8 = Zeroizing::new(doc.as_ref().to_vec());
        let cert = self_signed_cert(&pkcs8).map_err(|reason| AgentError::BadKey {
            path: home.identity_key(),
            kind: "ed25519 identity",
            reason,
        })?;
        write_secret(&home.identity_key(), &pkcs8)?;
        write_atomic(&home.identity_cert(), &cert)?;
        Self::from_parts(pkcs8, cert, &home.identity_key())
    }

    /// Load the identity of `home`, checking permissions and that key and cert match.
    pub fn load(home: &Home) -> Result<Self, AgentError> {
        let pkcs8 = read_secret(&home.identity_key())?;
        let cert =
            std::fs::read(home.identity_cert()).map_err(AgentError::io(home.identity_cert()))?;
        let me = Self::from_parts(pkcs8, cert, &home.identity_key())?;
        let in_cert = cert_identity(&me.cert).map_err(|reason| AgentError::BadKey {
            path: home.identity_cert(),
            kind: "identity certificate",
            reason,
        })?;
        if in_cert != me.id {
            return Err(AgentError::BadKey {
                path: home.identity_cert(),
                kind: "identity certificate",
                reason: "certificate does not carry identity.key's public key".into(),
            });
        }
        // What rustls checked when it was handed the key itself: the certificate parses as
        // webpki reads it, and carries the key.
        me.tls.keys_match().map_err(|e| AgentError::BadKey {
            path: home.identity_cert(),
            kind: "identity certificate",
            reason: format!("not usable for TLS with identity.key: {e}"),
        })?;
        Ok(me)
    }

    fn from_parts(
        pkcs8: Zeroizing<Vec<u8>>,
        cert: Vec<u8>,
        path: &Path,
    ) -> Result<Self, AgentError> {
        let kp =
            Ed25519KeyPair::from_pkcs8_maybe_unchecked(&pkcs8).map_err(|e| AgentError::BadKey {
                path: path.to_path_buf(),
                kind: "ed25519 PKCS#8 identity",
                reason: e.to_string(),
            })?;
        let id: AgentId = kp
            .public_key()
            .as_ref()
            .try_into()
            .map_err(|_| AgentError::BadKey {
                path: path.to_path_buf(),
                kind: "ed25519 PKCS#8 identity",
                reason: "public key is not 32 bytes".into(),
            })?;
        let signing =
            rustls::crypto::ring::sign::any_eddsa_type(&PrivatePkcs8KeyDer::from(&pkcs8[..]))
                .map_err(|e| AgentError::BadKey {
                    path: path.to_path_buf(),
                    kind: "ed25519 PKCS#8 identity",
                    reason: e.to_string(),
                })?;
        let tls = Arc::new(rustls::sign::CertifiedKey::new(
            vec![CertificateDer::from(cert.clone())],
            signing,
        ));
        // The PKCS#8 bytes are wiped as they go out of scope here: only ring's key, inside
        // `tls`, stays.
        Ok(Self { cert, id, tls })
    }

    /// The public identity.
    pub fn id(&self) -> AgentId {
        self.id
    }

    /// The certificate and key rustls presents, for a TLS configuration's resolver.
    pub fn tls_key(&self) -> Arc<rustls::sign::SingleCertAndKey> {
        Arc::new(rustls::sign::SingleCertAndKey::from(self.tls.clone()))
    }
}

fn self_signed_cert(pkcs8: &[u8]) -> Result<Vec<u8>, String> {
    let key = rcgen::KeyPair::try_from(pkcs8).map_err(|e| e.to_string())?;
    let mut params = rcgen::CertificateParams::new(vec!["trustmig-agent".to_string()])
        .map_err(|e| e.to_string())?;
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(4000, 1, 1);
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    Ok(cert.der().to_vec())
}

/// Parse a hex-encoded 32-byte key, naming the file on error. Decoded straight into a wiped
/// array (no intermediate heap buffer): a secret seed passes through here.
pub fn parse_hex32(text: &str, what: &'static str, path: &Path) -> Result<[u8; 32], AgentError> {
    let bad = |reason: String| AgentError::BadKey {
        path: path.to_path_buf(),
        kind: what,
        reason,
    };
    let text = text.trim();
    // Wiped here whatever happens (a bad character leaves part of a seed decoded); the caller
    // gets a copy, which it wraps.
    let mut key = Zeroizing::new([0u8; 32]);
    match hex::decode_to_slice(text, &mut *key) {
        Ok(()) => Ok(*key),
        Err(hex::FromHexError::InvalidStringLength) if text.len() % 2 == 0 => {
            Err(bad(format!("{} bytes, expected 32", text.len() / 2)))
        }
        Err(e) => Err(bad(format!("not hex: {e}"))),
    }
}

/// Generate an operator signing key: secret seed (hex, 0600) at `path`, public key at `path.pub`.
pub fn operator_keygen(path: &Path) -> Result<[u8; 32], AgentError> {
    let mut seed = Zeroizing::new([0u8; 32]);
    crate::fill_random(&mut *seed);
    let key = ed25519_dalek::SigningKey::from_bytes(&seed);
    let public = key.verifying_key().to_bytes();
    write_secret(
        path,
        Zeroizing::new(hex::encode(seed.as_slice())).as_bytes(),
    )?;
    let pub_path = path.with_extension("pub");
    write_atomic(&pub_path, format!("{}\n", hex::encode(public)).as_bytes())?;
    Ok(public)
}

/// Load an operator signing key.
pub fn operator_load(path: &Path) -> Result<ed25519_dalek::SigningKey, AgentError> {
    // Its public half is 32 hex bytes too: signed with, it would make orders no agent trusts,
    // and the refusal would point at the trust store, not at the file.
    if path.extension().is_some_and(|e| e == "pub") {
        return Err(AgentError::BadKey {
            path: path.to_path_buf(),
            kind: "operator key",
            reason: "this is a public key (`trustmig operator keygen` writes it beside the secret one); sign with the secret key file".into(),
        });
    }
    let text = read_secret(path)?;
    let text = std::str::from_utf8(&text).map_err(|_| AgentError::BadKey {
        path: path.to_path_buf(),
        kind: "operator key",
        reason: "not text".into(),
    })?;
    let seed = Zeroizing::new(parse_hex32(text, "operator key", path)?);
    Ok(ed25519_dalek::SigningKey::from_bytes(&seed))
}

/// Whether `text`, read from `path` as a public key, is instead the secret seed whose public
/// key is in the `.pub` file beside it (the layout `operator_keygen` writes): trusting it would
/// copy a secret into the trust store, and trust a key nobody signs with.
pub fn is_secret_beside_its_public(path: &Path, key: &[u8; 32]) -> bool {
    let public = path.with_extension("pub");
    if public == path {
        return false;
    }
    let Ok(text) = std::fs::read_to_string(&public) else {
        return false;
    };
    let derived = ed25519_dalek::SigningKey::from_bytes(key).verifying_key();
    hex::decode(text.trim()).is_ok_and(|p| p == derived.as_bytes())
}

/// The ed25519 identity key inside a certificate (strict X.509 parse; Ed25519 SPKI only).
pub fn cert_identity(der: &[u8]) -> Result<AgentId, String> {
    let (rest, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| format!("bad certificate: {e}"))?;
    if !rest.is_empty() {
        return Err("trailing bytes after certificate".into());
    }
    let spki = cert.public_key();
    if spki.algorithm.algorithm != x509_parser::oid_registry::OID_SIG_ED25519 {
        return Err(format!(
            "certificate key is {}, not Ed25519",
            spki.algorithm.algorithm
        ));
    }
    spki.subject_public_key
        .data
        .as_ref()
        .try_into()
        .map_err(|_| "Ed25519 key is not 32 bytes".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A home whose certificate is another identity's (files mixed up by hand) is refused when
    /// loaded, naming the certificate; each home's own loads.
    #[test]
    fn an_identity_whose_certificate_is_anothers_is_refused() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, b) = (Home::at(a.path().join("h")), Home::at(b.path().join("h")));
        for h in [&a, &b] {
            std::fs::create_dir_all(h.root()).unwrap();
            Identity::create(h).expect("create");
            Identity::load(h).expect("its own certificate");
        }
        std::fs::copy(b.identity_cert(), a.identity_cert()).unwrap();
        let e = Identity::load(&a).err().expect("refused").to_string();
        assert!(
            e.contains(&a.identity_cert().display().to_string()) && e.contains("does not carry"),
            "{e}"
        );
    }
}
