//! Big-endian TPM wire reading and writing (TPM 2.0 Part 2 marshalling rules), in pure Rust.

/// A wire structure that was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The input ended inside `what`.
    #[error("truncated while reading {what}")]
    Truncated {
        /// Field being read.
        what: &'static str,
    },
    /// A sized buffer is larger than its type allows.
    #[error("{what} is {len} bytes, more than the {max} allowed")]
    TooLong {
        /// Field being read.
        what: &'static str,
        /// Declared length.
        len: usize,
        /// Maximum length.
        max: usize,
    },
    /// Bytes follow the structure.
    #[error("{0} trailing bytes after {1}")]
    TrailingBytes(usize, &'static str),
}

/// A cursor over TPM wire bytes.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub(crate) fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or(WireError::Truncated { what })?;
        let out = self
            .buf
            .get(self.pos..end)
            .ok_or(WireError::Truncated { what })?;
        self.pos = end;
        Ok(out)
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.take(1, what)?[0])
    }

    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// A TPM2B: u16 size, then that many bytes, at most `max`.
    pub(crate) fn tpm2b(&mut self, max: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        let len = usize::from(self.u16(what)?);
        if len > max {
            return Err(WireError::TooLong { what, len, max });
        }
        self.take(len, what)
    }

    pub(crate) fn finish(self, what: &'static str) -> Result<(), WireError> {
        let rest = self.buf.len() - self.pos;
        if rest != 0 {
            return Err(WireError::TrailingBytes(rest, what));
        }
        Ok(())
    }
}

/// Append a TPM2B (u16 length prefix). Callers bound `data` below 64 KiB.
pub(crate) fn put_tpm2b(out: &mut Vec<u8>, data: &[u8]) {
    let len = u16::try_from(data.len()).expect("TPM2B contents are bounded by their parser");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
}
