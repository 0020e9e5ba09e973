//! Enrollment: proving that an AK lives in the same TPM as a certified EK, with
//! TPM2_MakeCredential / TPM2_ActivateCredential. spec: attestation.md §7
//!
//! 1. Agent: [`EnrollRequest`] (agent identity, EK certificate, EK and AK public areas).
//! 2. Verifier: [`Enroller::challenge`] checks the EK certificate chain, that the certificate
//!    certifies exactly this EK, and that the AK is a restricted signing key; then wraps a
//!    fresh 32-byte secret to (EK, AK name) with MakeCredential.
//! 3. Agent: TPM2_ActivateCredential returns the secret only if the AK with that exact name is
//!    loaded in the TPM that holds the EK's private key -> [`EnrollResponse`].
//! 4. Verifier: [`PendingEnrollment::finish`] compares in constant time and yields the
//!    [`TrustedAk`] trust-store entry.

use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use trustmig_protocol::codec::{self, CodecError};
use trustmig_protocol::{ct_eq, AgentId};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::policy::TrustedAk;
use crate::public::{AkPublic, EkPublic, PublicError};
use crate::x509::{pem_certificates, verify_chain, CertError, Certificate};

/// Agent -> verifier: what to enroll.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The agent identity the AK will speak for.
    #[serde(with = "serde_bytes")]
    pub agent: AgentId,
    /// The EK certificate (DER), as read from the TPM's NV index.
    #[serde(with = "serde_bytes")]
    pub ek_cert: Vec<u8>,
    /// The EK's marshalled `TPMT_PUBLIC`.
    #[serde(with = "serde_bytes")]
    pub ek_public: Vec<u8>,
    /// The AK's marshalled `TPMT_PUBLIC`.
    #[serde(with = "serde_bytes")]
    pub ak_public: Vec<u8>,
}

/// Verifier -> agent: the credential wrapped to the EK and bound to the AK's name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollChallenge {
    /// `TPM2B_ID_OBJECT` contents (credentialBlob).
    #[serde(with = "serde_bytes")]
    pub id_object: Vec<u8>,
    /// `TPM2B_ENCRYPTED_SECRET` contents.
    #[serde(with = "serde_bytes")]
    pub encrypted_secret: Vec<u8>,
}

/// Agent -> verifier: the activated secret.
#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
#[serde(deny_unknown_fields)]
pub struct EnrollResponse {
    /// The secret TPM2_ActivateCredential returned.
    #[serde(with = "serde_bytes")]
    pub secret: Vec<u8>,
}

macro_rules! cbor_io {
    ($t:ty) => {
        impl $t {
            /// Encode as CBOR.
            pub fn to_cbor(&self) -> Vec<u8> {
                codec::encode(self)
            }
            /// Decode from CBOR.
            pub fn from_cbor(bytes: &[u8]) -> Result<Self, CodecError> {
                codec::decode(bytes)
            }
        }
    };
}
cbor_io!(EnrollRequest);
cbor_io!(EnrollChallenge);
cbor_io!(EnrollResponse);

/// Enrollment failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnrollError {
    /// A trust anchor could not be parsed.
    #[error("trust anchor: {0}")]
    Anchor(CertError),
    /// The EK certificate could not be parsed.
    #[error("EK certificate: {0}")]
    EkCertMalformed(CertError),
    /// The EK certificate does not chain to a trusted CA (or is expired).
    #[error("EK certificate is not trusted: {0}")]
    EkCertUntrusted(CertError),
    /// The EK public area is not an EK.
    #[error("EK public area: {0}")]
    EkPublic(PublicError),
    /// The certificate certifies another key than the EK public area sent.
    #[error("EK certificate's public key is not the EK's public key")]
    EkMismatch,
    /// The AK public area is not an acceptable AK.
    #[error("AK public area: {0}")]
    AkPublic(PublicError),
    /// MakeCredential failed.
    #[error("MakeCredential failed: {0}")]
    MakeCredential(String),
    /// The system RNG failed.
    #[error("system random number generator failed")]
    Random,
    /// The agent's response is not the secret: the AK is not in the EK's TPM.
    #[error("activated secret is wrong: the AK does not live in the TPM of the certified EK")]
    WrongSecret,
}

/// Something that can run TPM2_MakeCredential: any TPM (the `tpm` feature implements this for
/// [`crate::tpm::Tpm`]), or a pure-software implementation.
pub trait CredentialMaker {
    /// Wrap `secret` to the EK with public area `ek_public`, for the object named `ak_name`.
    /// Returns (`credentialBlob`, `secret`) contents.
    fn make_credential(
        &mut self,
        ek_public: &[u8],
        ak_name: &[u8],
        secret: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>), String>;
}

/// The verifier side of enrollment: trusted EK CAs.
pub struct Enroller {
    anchors: Vec<Certificate>,
    intermediates: Vec<Certificate>,
}

impl Enroller {
    /// Trust EK certificates chaining to these CA certificates (DER). Intermediate CA
    /// certificates may be given as anchors too.
    pub fn new(anchors_der: &[Vec<u8>]) -> Result<Self, EnrollError> {
        let anchors = anchors_der
            .iter()
            .map(|d| Certificate::from_der(d))
            .collect::<Result<_, _>>()
            .map_err(EnrollError::Anchor)?;
        Ok(Self {
            anchors,
            intermediates: Vec::new(),
        })
    }

    /// Trust the CA certificates in a PEM text.
    pub fn from_pem(pem: &str) -> Result<Self, EnrollError> {
        Self::new(&pem_certificates(pem).map_err(EnrollError::Anchor)?)
    }

    /// Untrusted intermediate CA certificates (DER) that may link an EK certificate to an anchor.
    pub fn with_intermediates(mut self, der: &[Vec<u8>]) -> Result<Self, EnrollError> {
        for d in der {
            self.intermediates
                .push(Certificate::from_der(d).map_err(EnrollError::Anchor)?);
        }
        Ok(self)
    }

    /// Check `req` (at time `now`, Unix seconds) and issue a challenge.
    pub fn challenge(
        &self,
        req: &EnrollRequest,
        maker: &mut dyn CredentialMaker,
        now: i64,
    ) -> Result<(EnrollChallenge, PendingEnrollment), EnrollError> {
        let cert = Certificate::from_der(&req.ek_cert).map_err(EnrollError::EkCertMalformed)?;
        verify_chain(&cert, &self.intermediates, &self.anchors, now)
            .map_err(EnrollError::EkCertUntrusted)?;
        let ek = EkPublic::parse(&req.ek_public).map_err(EnrollError::EkPublic)?;
        let (n, e) = cert.rsa_public().ok_or(EnrollError::EkMismatch)?;
        let exp = ek.exponent().to_be_bytes();
        let exp: Vec<u8> = exp.iter().skip_while(|b| **b == 0).copied().collect();
        if !ct_eq(&n, ek.modulus()) || e != exp {
            return Err(EnrollError::EkMismatch);
        }
        let ak = AkPublic::parse(&req.ak_public).map_err(EnrollError::AkPublic)?;
        let ak_name = ak.name();
        let mut secret = Zeroizing::new([0u8; 32]);
        SystemRandom::new()
            .fill(&mut secret[..])
            .map_err(|_| EnrollError::Random)?;
        let (id_object, encrypted_secret) = maker
            .make_credential(ek.as_bytes(), &ak_name, &secret[..])
            .map_err(EnrollError::MakeCredential)?;
        Ok((
            EnrollChallenge {
                id_object,
                encrypted_secret,
            },
            PendingEnrollment {
                agent: req.agent,
                ak_name,
                secret,
            },
        ))
    }
}

/// A challenge in flight. Holds the secret; no `Debug`, no `Clone`, zeroized on drop.
pub struct PendingEnrollment {
    agent: AgentId,
    ak_name: Vec<u8>,
    secret: Zeroizing<[u8; 32]>,
}

/// The stored form of a pending enrollment (verifier side, between challenge and finish).
#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
#[serde(deny_unknown_fields)]
struct PendingFile {
    #[serde(with = "serde_bytes")]
    agent: AgentId,
    #[serde(with = "serde_bytes")]
    ak_name: Vec<u8>,
    #[serde(with = "serde_bytes")]
    secret: [u8; 32],
}

impl PendingEnrollment {
    /// Encode, secret included, for the verifier to keep (mode 0600) while the agent, possibly
    /// on another host, activates the credential. Named `dangerous_` because it exports it.
    pub fn dangerous_to_cbor(&self) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(codec::encode(&PendingFile {
            agent: self.agent,
            ak_name: self.ak_name.clone(),
            secret: *self.secret,
        }))
    }

    /// Decode what [`Self::dangerous_to_cbor`] wrote.
    pub fn from_cbor(bytes: &[u8]) -> Result<Self, CodecError> {
        let f: PendingFile = codec::decode(bytes)?;
        Ok(Self {
            agent: f.agent,
            ak_name: f.ak_name.clone(),
            secret: Zeroizing::new(f.secret),
        })
    }

    /// The agent this enrollment is for.
    pub fn agent(&self) -> &AgentId {
        &self.agent
    }

    /// Check the agent's response; on success the trust-store entry for the verifier's policy.
    pub fn finish(self, response: &EnrollResponse) -> Result<TrustedAk, EnrollError> {
        if !ct_eq(&response.secret, &self.secret[..]) {
            return Err(EnrollError::WrongSecret);
        }
        Ok(TrustedAk {
            agent: self.agent,
            ak_name: self.ak_name.clone(),
        })
    }
}
