//! Strict parser and encoder of `TPMS_ATTEST` for quotes. spec: attestation.md §3
//!
//! TPM 2.0 Part 2 §10.12.12. Only `TPM_ST_ATTEST_QUOTE` is accepted; every length is bounded
//! and trailing bytes are refused, so [`QuoteInfo::to_bytes`] reproduces the parsed input
//! exactly (the fuzzer checks this).

use crate::wire::{put_tpm2b, Reader, WireError};

/// `TPM_GENERATED_VALUE`: the magic that only the TPM puts at the start of data it signs.
pub const TPM_GENERATED_VALUE: u32 = 0xff54_4347;
/// `TPM_ST_ATTEST_QUOTE`.
pub const TPM_ST_ATTEST_QUOTE: u16 = 0x8018;
/// `TPM_ALG_SHA256`.
pub const TPM_ALG_SHA256: u16 = 0x000b;
/// Largest `TPM2B_NAME` (`sizeof(TPMU_NAME)` with SHA-512 as the biggest digest).
pub const MAX_NAME: usize = 2 + 64;
/// Largest `TPM2B_DATA` (`sizeof(TPMT_HA)`).
pub const MAX_DATA: usize = 2 + 64;
/// Largest `TPM2B_DIGEST`.
pub const MAX_DIGEST: usize = 64;
/// Most PCR banks in one selection (`HASH_COUNT` bound).
pub const MAX_BANKS: u32 = 16;
/// Largest `sizeofSelect` (`PCR_SELECT_MAX` for up to 32 PCRs).
pub const MAX_SELECT: u8 = 4;

/// Errors of the `TPMS_ATTEST` parser.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QuoteParseError {
    /// `magic` is not `TPM_GENERATED_VALUE`.
    #[error("TPMS_ATTEST magic is {0:#010x}, not TPM_GENERATED_VALUE")]
    BadMagic(u32),
    /// `type` is not `TPM_ST_ATTEST_QUOTE`.
    #[error("TPMS_ATTEST type is {0:#06x}, not TPM_ST_ATTEST_QUOTE")]
    BadType(u16),
    /// `clockInfo.safe` is neither YES nor NO.
    #[error("clockInfo.safe is {0}, not a TPMI_YES_NO")]
    BadSafe(u8),
    /// Too many PCR banks or a selection bitmap of a bad size.
    #[error("PCR selection malformed: {0}")]
    BadSelection(&'static str),
    /// Framing error.
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// One `TPMS_PCR_SELECTION`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PcrSelection {
    /// Hash algorithm of the bank.
    pub hash: u16,
    /// Selection bitmap (`pcrSelect[sizeofSelect]`).
    pub select: Vec<u8>,
}

/// A parsed quote `TPMS_ATTEST`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuoteInfo {
    /// `qualifiedSigner`: the signing key's qualified name.
    pub qualified_signer: Vec<u8>,
    /// `extraData`: the qualifying data the quote was asked for.
    pub extra_data: Vec<u8>,
    /// `clockInfo.clock`.
    pub clock: u64,
    /// `clockInfo.resetCount`.
    pub reset_count: u32,
    /// `clockInfo.restartCount`.
    pub restart_count: u32,
    /// `clockInfo.safe`.
    pub safe: bool,
    /// `firmwareVersion`.
    pub firmware_version: u64,
    /// `attested.quote.pcrSelect`.
    pub pcr_select: Vec<PcrSelection>,
    /// `attested.quote.pcrDigest`: hash of the selected PCR values.
    pub pcr_digest: Vec<u8>,
}

impl QuoteInfo {
    /// Parse exactly one quote `TPMS_ATTEST`; magic and type are checked first.
    pub fn parse(bytes: &[u8]) -> Result<Self, QuoteParseError> {
        let mut r = Reader::new(bytes);
        let magic = r.u32("magic")?;
        if magic != TPM_GENERATED_VALUE {
            return Err(QuoteParseError::BadMagic(magic));
        }
        let ty = r.u16("type")?;
        if ty != TPM_ST_ATTEST_QUOTE {
            return Err(QuoteParseError::BadType(ty));
        }
        let qualified_signer = r.tpm2b(MAX_NAME, "qualifiedSigner")?.to_vec();
        let extra_data = r.tpm2b(MAX_DATA, "extraData")?.to_vec();
        let clock = r.u64("clockInfo.clock")?;
        let reset_count = r.u32("clockInfo.resetCount")?;
        let restart_count = r.u32("clockInfo.restartCount")?;
        let safe = match r.u8("clockInfo.safe")? {
            0 => false,
            1 => true,
            v => return Err(QuoteParseError::BadSafe(v)),
        };
        let firmware_version = r.u64("firmwareVersion")?;
        let count = r.u32("pcrSelect.count")?;
        if count > MAX_BANKS {
            return Err(QuoteParseError::BadSelection("more banks than HASH_COUNT"));
        }
        let mut pcr_select = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let hash = r.u16("pcrSelections.hash")?;
            let size = r.u8("pcrSelections.sizeofSelect")?;
            if size > MAX_SELECT {
                return Err(QuoteParseError::BadSelection(
                    "sizeofSelect above PCR_SELECT_MAX",
                ));
            }
            let select = r
                .take(usize::from(size), "pcrSelections.pcrSelect")?
                .to_vec();
            pcr_select.push(PcrSelection { hash, select });
        }
        let pcr_digest = r.tpm2b(MAX_DIGEST, "pcrDigest")?.to_vec();
        r.finish("TPMS_ATTEST")?;
        Ok(Self {
            qualified_signer,
            extra_data,
            clock,
            reset_count,
            restart_count,
            safe,
            firmware_version,
            pcr_select,
            pcr_digest,
        })
    }

    /// Marshal back to `TPMS_ATTEST` bytes (inverse of [`QuoteInfo::parse`]).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(&TPM_GENERATED_VALUE.to_be_bytes());
        out.extend_from_slice(&TPM_ST_ATTEST_QUOTE.to_be_bytes());
        put_tpm2b(&mut out, &self.qualified_signer);
        put_tpm2b(&mut out, &self.extra_data);
        out.extend_from_slice(&self.clock.to_be_bytes());
        out.extend_from_slice(&self.reset_count.to_be_bytes());
        out.extend_from_slice(&self.restart_count.to_be_bytes());
        out.push(u8::from(self.safe));
        out.extend_from_slice(&self.firmware_version.to_be_bytes());
        let count = u32::try_from(self.pcr_select.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&count.to_be_bytes());
        for s in &self.pcr_select {
            out.extend_from_slice(&s.hash.to_be_bytes());
            out.push(u8::try_from(s.select.len()).unwrap_or(u8::MAX));
            out.extend_from_slice(&s.select);
        }
        put_tpm2b(&mut out, &self.pcr_digest);
        out
    }

    /// Whether the selection is exactly PCR `pcr` of the SHA-256 bank with a 3-byte bitmap.
    pub fn selects_only(&self, pcr: u8) -> bool {
        let mut want = [0u8; 3];
        match want.get_mut(usize::from(pcr / 8)) {
            Some(b) => *b = 1 << (pcr % 8),
            None => return false,
        }
        matches!(self.pcr_select.as_slice(),
            [one] if one.hash == TPM_ALG_SHA256 && one.select == want)
    }
}
