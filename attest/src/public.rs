//! `TPMT_PUBLIC` parsing for the two keys trustmig uses (ECC P-256 AK, RSA EK), object names and
//! qualified names. spec: attestation.md §4

use ring::digest;

use crate::quote::TPM_ALG_SHA256;
use crate::wire::{Reader, WireError};

/// `TPM_ALG_RSA`.
pub const TPM_ALG_RSA: u16 = 0x0001;
/// `TPM_ALG_ECC`.
pub const TPM_ALG_ECC: u16 = 0x0023;
/// `TPM_ALG_NULL`.
pub const TPM_ALG_NULL: u16 = 0x0010;
/// `TPM_ALG_ECDSA`.
pub const TPM_ALG_ECDSA: u16 = 0x0018;
/// `TPM_ALG_AES`.
pub const TPM_ALG_AES: u16 = 0x0006;
/// `TPM_ALG_CFB`.
pub const TPM_ALG_CFB: u16 = 0x0043;
/// `TPM_ECC_NIST_P256`.
pub const TPM_ECC_NIST_P256: u16 = 0x0003;
/// `TPM_RH_ENDORSEMENT`: the endorsement hierarchy handle, root of the AK's qualified name.
pub const TPM_RH_ENDORSEMENT: u32 = 0x4000_000b;

/// `TPMA_OBJECT` bits.
pub mod attr {
    /// fixedTPM
    pub const FIXED_TPM: u32 = 1 << 1;
    /// fixedParent
    pub const FIXED_PARENT: u32 = 1 << 4;
    /// sensitiveDataOrigin
    pub const SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
    /// userWithAuth
    pub const USER_WITH_AUTH: u32 = 1 << 6;
    /// adminWithPolicy
    pub const ADMIN_WITH_POLICY: u32 = 1 << 7;
    /// restricted
    pub const RESTRICTED: u32 = 1 << 16;
    /// decrypt
    pub const DECRYPT: u32 = 1 << 17;
    /// sign
    pub const SIGN: u32 = 1 << 18;
}

/// Attributes an AK must have: a restricted signing key that never leaves its TPM.
pub const AK_REQUIRED: u32 = attr::FIXED_TPM
    | attr::FIXED_PARENT
    | attr::SENSITIVE_DATA_ORIGIN
    | attr::RESTRICTED
    | attr::SIGN;
/// Attributes an EK must have: a restricted decryption key that never leaves its TPM.
pub const EK_REQUIRED: u32 = attr::FIXED_TPM
    | attr::FIXED_PARENT
    | attr::SENSITIVE_DATA_ORIGIN
    | attr::RESTRICTED
    | attr::DECRYPT;

/// A public area that is not an acceptable key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PublicError {
    /// Some field has a value trustmig does not accept.
    #[error("{field} is {value:#x}, expected {expected}")]
    Unexpected {
        /// Field name.
        field: &'static str,
        /// Its value.
        value: u32,
        /// What was required.
        expected: &'static str,
    },
    /// The point is not on P-256.
    #[error("AK public point is not a valid P-256 point")]
    BadPoint,
    /// Framing error.
    #[error(transparent)]
    Wire(#[from] WireError),
}

fn expect(
    field: &'static str,
    value: u32,
    want: u32,
    expected: &'static str,
) -> Result<(), PublicError> {
    if value == want {
        Ok(())
    } else {
        Err(PublicError::Unexpected {
            field,
            value,
            expected,
        })
    }
}

/// A parsed attestation key: ECC P-256, ECDSA SHA-256, restricted signing, nameAlg SHA-256.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AkPublic {
    bytes: Vec<u8>,
    point: [u8; 65],
}

impl AkPublic {
    /// Parse and check a marshalled `TPMT_PUBLIC` (no TPM2B size prefix).
    pub fn parse(bytes: &[u8]) -> Result<Self, PublicError> {
        let mut r = Reader::new(bytes);
        expect(
            "type",
            r.u16("type")?.into(),
            TPM_ALG_ECC.into(),
            "TPM_ALG_ECC",
        )?;
        expect(
            "nameAlg",
            r.u16("nameAlg")?.into(),
            TPM_ALG_SHA256.into(),
            "TPM_ALG_SHA256",
        )?;
        let attrs = r.u32("objectAttributes")?;
        expect(
            "objectAttributes",
            attrs & (AK_REQUIRED | attr::DECRYPT),
            AK_REQUIRED,
            "fixedTPM|fixedParent|sensitiveDataOrigin|restricted|sign and not decrypt",
        )?;
        r.tpm2b(64, "authPolicy")?;
        expect(
            "symmetric",
            r.u16("symmetric")?.into(),
            TPM_ALG_NULL.into(),
            "TPM_ALG_NULL",
        )?;
        expect(
            "scheme",
            r.u16("scheme")?.into(),
            TPM_ALG_ECDSA.into(),
            "TPM_ALG_ECDSA",
        )?;
        expect(
            "scheme.hashAlg",
            r.u16("scheme.hashAlg")?.into(),
            TPM_ALG_SHA256.into(),
            "TPM_ALG_SHA256",
        )?;
        expect(
            "curveID",
            r.u16("curveID")?.into(),
            TPM_ECC_NIST_P256.into(),
            "TPM_ECC_NIST_P256",
        )?;
        expect(
            "kdf",
            r.u16("kdf")?.into(),
            TPM_ALG_NULL.into(),
            "TPM_ALG_NULL",
        )?;
        let x = r.tpm2b(32, "unique.x")?;
        let y = r.tpm2b(32, "unique.y")?;
        r.finish("TPMT_PUBLIC")?;
        if x.len() != 32 || y.len() != 32 {
            return Err(PublicError::BadPoint);
        }
        let mut point = [0u8; 65];
        point[0] = 4;
        point[1..33].copy_from_slice(x);
        point[33..].copy_from_slice(y);
        Ok(Self {
            bytes: bytes.to_vec(),
            point,
        })
    }

    /// The marshalled `TPMT_PUBLIC`.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Uncompressed SEC1 point `04 || x || y`.
    pub fn point(&self) -> &[u8; 65] {
        &self.point
    }

    /// The object's name: `nameAlg || SHA-256(TPMT_PUBLIC)`.
    pub fn name(&self) -> Vec<u8> {
        object_name(&self.bytes)
    }

    /// Qualified name of this key as a primary object of the endorsement hierarchy.
    pub fn qualified_name(&self) -> Vec<u8> {
        qualified_name(&TPM_RH_ENDORSEMENT.to_be_bytes(), &self.name())
    }
}

/// A parsed endorsement key: RSA 2048 restricted decryption key, as in the TCG EK templates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EkPublic {
    bytes: Vec<u8>,
    modulus: Vec<u8>,
    exponent: u32,
}

impl EkPublic {
    /// Parse and check a marshalled RSA `TPMT_PUBLIC`.
    pub fn parse(bytes: &[u8]) -> Result<Self, PublicError> {
        let mut r = Reader::new(bytes);
        expect(
            "type",
            r.u16("type")?.into(),
            TPM_ALG_RSA.into(),
            "TPM_ALG_RSA",
        )?;
        expect(
            "nameAlg",
            r.u16("nameAlg")?.into(),
            TPM_ALG_SHA256.into(),
            "TPM_ALG_SHA256",
        )?;
        let attrs = r.u32("objectAttributes")?;
        expect(
            "objectAttributes",
            attrs & (EK_REQUIRED | attr::SIGN),
            EK_REQUIRED,
            "fixedTPM|fixedParent|sensitiveDataOrigin|restricted|decrypt and not sign",
        )?;
        r.tpm2b(64, "authPolicy")?;
        expect(
            "symmetric",
            r.u16("symmetric")?.into(),
            TPM_ALG_AES.into(),
            "TPM_ALG_AES",
        )?;
        expect(
            "symmetric.keyBits",
            r.u16("symmetric.keyBits")?.into(),
            128,
            "128",
        )?;
        expect(
            "symmetric.mode",
            r.u16("symmetric.mode")?.into(),
            TPM_ALG_CFB.into(),
            "TPM_ALG_CFB",
        )?;
        expect(
            "scheme",
            r.u16("scheme")?.into(),
            TPM_ALG_NULL.into(),
            "TPM_ALG_NULL",
        )?;
        expect("keyBits", r.u16("keyBits")?.into(), 2048, "2048")?;
        let exponent = match r.u32("exponent")? {
            0 => 65537,
            e => e,
        };
        let modulus = r.tpm2b(512, "unique.rsa")?.to_vec();
        r.finish("TPMT_PUBLIC")?;
        expect("unique.rsa size", modulus.len() as u32, 256, "256 bytes")?;
        Ok(Self {
            bytes: bytes.to_vec(),
            modulus,
            exponent,
        })
    }

    /// The marshalled `TPMT_PUBLIC`.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// RSA modulus, big-endian, 256 bytes.
    pub fn modulus(&self) -> &[u8] {
        &self.modulus
    }

    /// RSA public exponent (0 in the public area means 65537).
    pub fn exponent(&self) -> u32 {
        self.exponent
    }

    /// The object's name.
    pub fn name(&self) -> Vec<u8> {
        object_name(&self.bytes)
    }
}

/// `nameAlg || SHA-256(public)` for a SHA-256 object.
pub fn object_name(public: &[u8]) -> Vec<u8> {
    let mut n = TPM_ALG_SHA256.to_be_bytes().to_vec();
    n.extend_from_slice(digest::digest(&digest::SHA256, public).as_ref());
    n
}

/// `QN(child) = nameAlg || SHA-256(QN(parent) || name(child))`; a hierarchy's QN is its handle.
pub fn qualified_name(parent_qn: &[u8], name: &[u8]) -> Vec<u8> {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(parent_qn);
    ctx.update(name);
    let mut n = TPM_ALG_SHA256.to_be_bytes().to_vec();
    n.extend_from_slice(ctx.finish().as_ref());
    n
}
