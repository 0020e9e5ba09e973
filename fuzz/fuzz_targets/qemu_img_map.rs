#![no_main]
//! `qemu-img map --output=json` as the agent reads it for `verify = "full"` (qemu/src/img.rs):
//! any bytes and any virtual size (the first 8 bytes, BE) give a typed error or extents that
//! cover exactly the guest's view, contiguous from 0, each data extent with a file offset that
//! leaves room for its length. Never a panic.
use trustmig_qemu::img::{external_data_file, parse_map, Extent};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = external_data_file(data);
    let Some((size, json)) = data.split_first_chunk::<8>() else {
        return;
    };
    let size = u64::from_be_bytes(*size);
    if let Ok(extents) = parse_map(json, size) {
        let mut at = 0u64;
        for e in &extents {
            assert_eq!(e.start, at);
            at = at.checked_add(e.length).expect("coverage fits");
            if let Some(offset) = e.file_offset() {
                assert!(offset.checked_add(e.length).is_some());
            } else {
                assert!(!e.data || e.zero);
            }
        }
        assert_eq!(at, size);
        let _: Vec<Option<u64>> = extents.iter().map(Extent::file_offset).collect();
    }
});
