//! The one place that knows the control-plane encoding is CBOR via `serde_cbor`.
//! spec: SPEC.md §4.1
//!
//! `serde_cbor` is unmaintained (RUSTSEC-2021-0127); every CBOR byte in trustmig passes through
//! [`encode`] and [`decode`], so swapping the library is a change to this file alone. Before the
//! library sees input, [`check_well_formed`] walks it with hard limits on size, nesting depth and
//! item counts, and refuses indefinite lengths, tags and trailing bytes.

use serde::{de::DeserializeOwned, Serialize};

/// Largest control message or CBOR document accepted, in bytes. spec: SPEC.md §9
pub const MAX_CBOR_SIZE: usize = 1 << 20;
/// Deepest nesting of arrays and maps accepted. spec: SPEC.md §9
pub const MAX_DEPTH: usize = 16;

/// A CBOR document that was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// Larger than [`MAX_CBOR_SIZE`].
    #[error("CBOR document of {0} bytes exceeds the {MAX_CBOR_SIZE}-byte limit")]
    TooLarge(usize),
    /// Nested deeper than [`MAX_DEPTH`].
    #[error("CBOR nesting deeper than {MAX_DEPTH}")]
    TooDeep,
    /// Ends in the middle of an item.
    #[error("CBOR document is truncated")]
    Truncated,
    /// Bytes follow the single top-level item.
    #[error("{0} trailing bytes after the CBOR item")]
    TrailingBytes(usize),
    /// A construct trustmig never emits (indefinite length, tag, reserved value).
    #[error("CBOR construct not allowed here: {0}")]
    Unsupported(&'static str),
    /// Well-formed CBOR that does not match the expected structure.
    #[error("CBOR does not match the expected message: {0}")]
    Schema(String),
}

/// Encode a value. Encoding our own types cannot fail; the `expect` states that invariant.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_cbor::to_vec(value).expect("trustmig types always serialize to CBOR")
}

/// Decode exactly one value from `bytes`, within the limits of this module.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    check_well_formed(bytes)?;
    serde_cbor::from_slice(bytes).map_err(|e| CodecError::Schema(e.to_string()))
}

/// Walk `bytes` as one CBOR item with size, depth and construct limits, without allocating.
pub fn check_well_formed(bytes: &[u8]) -> Result<(), CodecError> {
    if bytes.len() > MAX_CBOR_SIZE {
        return Err(CodecError::TooLarge(bytes.len()));
    }
    let end = skip_item(bytes, 0, 0)?;
    if end != bytes.len() {
        return Err(CodecError::TrailingBytes(bytes.len() - end));
    }
    Ok(())
}

/// Returns the offset just past the item starting at `pos`.
fn skip_item(b: &[u8], pos: usize, depth: usize) -> Result<usize, CodecError> {
    if depth > MAX_DEPTH {
        return Err(CodecError::TooDeep);
    }
    let (major, arg, mut pos) = read_head(b, pos)?;
    match major {
        0 | 1 => Ok(pos),
        2 | 3 => {
            let len = usize::try_from(arg).map_err(|_| CodecError::Truncated)?;
            let end = pos.checked_add(len).ok_or(CodecError::Truncated)?;
            if end > b.len() {
                return Err(CodecError::Truncated);
            }
            Ok(end)
        }
        4 | 5 => {
            let per_entry = if major == 5 { 2 } else { 1 };
            // Every item takes at least one byte: a count larger than what is left is a lie.
            let items = arg.checked_mul(per_entry).ok_or(CodecError::Truncated)?;
            if items > (b.len() - pos) as u64 {
                return Err(CodecError::Truncated);
            }
            for _ in 0..items {
                pos = skip_item(b, pos, depth + 1)?;
            }
            Ok(pos)
        }
        6 => Err(CodecError::Unsupported("tag")),
        _ => Ok(pos), // major 7: simple values and floats, length handled by read_head
    }
}

/// Reads an item head: (major type, argument, offset after head).
fn read_head(b: &[u8], pos: usize) -> Result<(u8, u64, usize), CodecError> {
    let first = *b.get(pos).ok_or(CodecError::Truncated)?;
    let major = first >> 5;
    let info = first & 0x1f;
    let pos = pos + 1;
    let width = match info {
        0..=23 => return Ok((major, u64::from(info), pos)),
        24 => 1,
        25 => 2,
        26 => 4,
        27 => 8,
        31 => return Err(CodecError::Unsupported("indefinite length")),
        _ => return Err(CodecError::Unsupported("reserved additional information")),
    };
    let bytes = b.get(pos..pos + width).ok_or(CodecError::Truncated)?;
    let arg = bytes.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x));
    Ok((major, arg, pos + width))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_trailing_bytes() {
        let mut v = encode(&7u32);
        v.push(0);
        assert_eq!(decode::<u32>(&v), Err(CodecError::TrailingBytes(1)));
    }

    #[test]
    fn rejects_deep_nesting() {
        let v: Vec<u8> = std::iter::repeat_n(0x81u8, MAX_DEPTH + 2)
            .chain([0])
            .collect();
        assert_eq!(check_well_formed(&v), Err(CodecError::TooDeep));
        let ok: Vec<u8> = std::iter::repeat_n(0x81u8, MAX_DEPTH).chain([0]).collect();
        assert_eq!(check_well_formed(&ok), Ok(()));
    }

    #[test]
    fn rejects_lying_lengths_indefinite_and_tags() {
        assert_eq!(
            check_well_formed(&[0x9b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            Err(CodecError::Truncated)
        );
        assert_eq!(
            check_well_formed(&[0x5a, 0, 0, 0, 9, 1]),
            Err(CodecError::Truncated)
        );
        assert_eq!(
            check_well_formed(&[0x9f, 0xff]),
            Err(CodecError::Unsupported("indefinite length"))
        );
        assert_eq!(
            check_well_formed(&[0xc1, 0x00]),
            Err(CodecError::Unsupported("tag"))
        );
        assert_eq!(check_well_formed(&[]), Err(CodecError::Truncated));
    }

    #[test]
    fn rejects_oversize() {
        let big = vec![0u8; MAX_CBOR_SIZE + 1];
        assert_eq!(
            check_well_formed(&big),
            Err(CodecError::TooLarge(MAX_CBOR_SIZE + 1))
        );
    }

    #[test]
    fn schema_mismatch_is_typed() {
        let v = encode(&"text");
        assert!(matches!(decode::<u32>(&v), Err(CodecError::Schema(_))));
    }
}
