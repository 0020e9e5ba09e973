#![no_main]
//! One line from QEMU's QMP socket, any bytes (a greeting, a reply, an event): a typed
//! `Malformed` error or a decoded line, never a panic (qemu/src/qmp.rs `handle_line`).
use trustmig_qemu::qmp::{handle_line, QmpError};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(e) = handle_line(data, "fuzz") {
        assert!(matches!(e, QmpError::Malformed { .. }), "{e:?}");
    }
});
