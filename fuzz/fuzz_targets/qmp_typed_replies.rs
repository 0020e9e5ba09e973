#![no_main]
//! A QMP command's `return` value, any JSON: read as each typed reply the agent asks QEMU for
//! (`query-status`, `query-migrate`, `query-jobs`, `query-named-block-nodes`), it is a typed
//! `Malformed` error naming the command, or a value whose readings do not panic
//! (qemu/src/qmp.rs `typed_reply`, qemu/src/block.rs).
use serde_json::Value;
use trustmig_qemu::block::{BlockNode, JobInfo};
use trustmig_qemu::qmp::{typed_reply, MigrationInfo, MigrationStatus, QmpError, StatusInfo};

fn read<T: serde::de::DeserializeOwned>(v: &Value, command: &str) -> Option<T> {
    match typed_reply::<T>(v.clone(), command) {
        Ok(t) => Some(t),
        Err(QmpError::Malformed { context, .. }) => {
            assert_eq!(context, command);
            None
        }
        Err(e) => panic!("{command}: not a Malformed error: {e:?}"),
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let _ = read::<StatusInfo>(&v, "query-status");
    if let Some(m) = read::<MigrationInfo>(&v, "query-migrate") {
        // Whatever QEMU calls its status, it reads back as itself.
        let s = m.status();
        assert_eq!(MigrationStatus::parse(s.as_str()), s);
        let _ = m.in_progress();
    }
    let _ = read::<Vec<JobInfo>>(&v, "query-jobs");
    let _ = read::<Vec<BlockNode>>(&v, "query-named-block-nodes");
});
