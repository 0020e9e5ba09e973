//! What `qemu-img` says about an image, for `verify = "full"` (spec/qemu.md §5): which ranges of
//! the guest's view hold data and where in the file (`qemu-img map --output=json`), and whether
//! a qcow2 keeps its data in another file (`qemu-img info --output=json`). The agent runs the
//! program; this parses and checks its answer, so a fuzz target can link it alone.

use serde::Deserialize;

/// One extent of `qemu-img map --output=json`, checked by [`parse_map`].
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Extent {
    /// First guest byte.
    pub start: u64,
    /// Bytes.
    pub length: u64,
    /// The range holds data (otherwise it reads as zeros).
    pub data: bool,
    /// The range reads as zeros (a zero cluster, a hole).
    pub zero: bool,
    /// Where its data lies in the file; absent for compressed or encrypted clusters and for
    /// unallocated ranges.
    #[serde(default)]
    pub offset: Option<u64>,
}

impl Extent {
    /// Where the guest reads this extent from: `Some(file offset)`, or `None` for zeros.
    pub fn file_offset(&self) -> Option<u64> {
        if self.data && !self.zero {
            self.offset
        } else {
            None
        }
    }
}

/// Why an answer of `qemu-img` cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImgError {
    /// Not the JSON expected.
    #[error("unreadable output: {0}")]
    Unreadable(String),
    /// Extents that leave a gap or overlap.
    #[error("extent at {at} where {expected} was expected")]
    NotContiguous {
        /// The extent's start.
        at: u64,
        /// Where the previous one ended.
        expected: u64,
    },
    /// Extents that do not cover exactly the guest's view.
    #[error("covers {covered} bytes, the disk's virtual size is {virtual_size}")]
    Coverage {
        /// Bytes covered (`u64::MAX` when the lengths overflow).
        covered: u64,
        /// The disk's virtual size.
        virtual_size: u64,
    },
    /// Data with no plain place in the file.
    #[error("guest bytes {start}..{end} are compressed or encrypted; verify = \"full\" reads plain clusters only")]
    NoFileOffset {
        /// First guest byte.
        start: u64,
        /// End.
        end: u64,
    },
    /// Data said to lie past the largest file offset.
    #[error("guest bytes from {start}: file offset {offset} + {length} bytes overflows")]
    OffsetOverflow {
        /// First guest byte.
        start: u64,
        /// The file offset.
        offset: u64,
        /// Bytes.
        length: u64,
    },
}

/// Parse and check `qemu-img map --output=json` of an image whose guest view is
/// `virtual_size` bytes: extents contiguous from 0 to exactly `virtual_size` (a gap or an
/// overlap would hash something other than what the guest reads), and every data extent
/// readable from the file (an offset, and room for its length after it).
pub fn parse_map(json: &[u8], virtual_size: u64) -> Result<Vec<Extent>, ImgError> {
    let extents: Vec<Extent> =
        serde_json::from_slice(json).map_err(|e| ImgError::Unreadable(e.to_string()))?;
    let mut at = 0u64;
    for e in &extents {
        if e.start != at {
            return Err(ImgError::NotContiguous {
                at: e.start,
                expected: at,
            });
        }
        at = at.checked_add(e.length).ok_or(ImgError::Coverage {
            covered: u64::MAX,
            virtual_size,
        })?;
        if e.data && !e.zero {
            let offset = e.offset.ok_or(ImgError::NoFileOffset {
                start: e.start,
                end: at,
            })?;
            if offset.checked_add(e.length).is_none() {
                return Err(ImgError::OffsetOverflow {
                    start: e.start,
                    offset,
                    length: e.length,
                });
            }
        }
    }
    if at != virtual_size {
        return Err(ImgError::Coverage {
            covered: at,
            virtual_size,
        });
    }
    Ok(extents)
}

/// From `qemu-img info --output=json` of a qcow2: its external data file, if it has one.
pub fn external_data_file(json: &[u8]) -> Result<Option<String>, ImgError> {
    let info: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| ImgError::Unreadable(e.to_string()))?;
    Ok(info
        .pointer("/format-specific/data/data-file")
        .map(|f| f.as_str().map_or_else(|| f.to_string(), String::from)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As QEMU 7.2 prints it: a data extent, a hole, a zero cluster (data and zero, with an
    /// offset), an unallocated range.
    const MAP: &str = r#"[{ "start": 0, "length": 4096, "depth": 0, "present": true, "zero": false, "data": true, "offset": 327680},
{ "start": 4096, "length": 61440, "depth": 0, "present": false, "zero": true, "data": false},
{ "start": 65536, "length": 65536, "depth": 0, "present": true, "zero": true, "data": true, "offset": 393216},
{ "start": 131072, "length": 131072, "depth": 0, "present": false, "zero": true, "data": false}]"#;

    #[test]
    fn a_map_is_read_where_the_guest_reads() {
        let m = parse_map(MAP.as_bytes(), 262144).unwrap();
        let from: Vec<_> = m.iter().map(Extent::file_offset).collect();
        assert_eq!(from, [Some(327680), None, None, None]);
    }

    #[test]
    fn a_map_that_is_not_the_guests_view_is_refused_by_name() {
        let e = parse_map(MAP.as_bytes(), 1 << 20).unwrap_err();
        assert_eq!(
            e,
            ImgError::Coverage {
                covered: 262144,
                virtual_size: 1 << 20
            }
        );
        let gap = MAP.replace(r#""start": 4096"#, r#""start": 4097"#);
        assert!(matches!(
            parse_map(gap.as_bytes(), 262144),
            Err(ImgError::NotContiguous {
                at: 4097,
                expected: 4096
            })
        ));
        let packed = MAP.replace(r#", "offset": 327680"#, "");
        let e = parse_map(packed.as_bytes(), 262144).unwrap_err();
        assert!(e.to_string().contains("compressed or encrypted"), "{e}");
        let far = MAP.replace("327680", &u64::MAX.to_string());
        assert!(matches!(
            parse_map(far.as_bytes(), 262144),
            Err(ImgError::OffsetOverflow { .. })
        ));
        let e = parse_map(b"qemu-img: Could not open", 0).unwrap_err();
        assert!(e.to_string().starts_with("unreadable output"), "{e}");
    }

    #[test]
    fn an_external_data_file_is_found() {
        let info = br#"{"format": "qcow2", "format-specific": {"type": "qcow2", "data": {"data-file": "/i/d.raw", "compat": "1.1"}}}"#;
        assert_eq!(
            external_data_file(info).unwrap().as_deref(),
            Some("/i/d.raw")
        );
        let plain = br#"{"format": "qcow2", "format-specific": {"type": "qcow2", "data": {"compat": "1.1"}}}"#;
        assert_eq!(external_data_file(plain).unwrap(), None);
        assert!(external_data_file(b"[").is_err());
    }
}
