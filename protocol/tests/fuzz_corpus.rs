//! The committed fuzz corpus as a regression suite: every seed runs through its harness in the
//! ordinary test run. `TRUSTMIG_WRITE_SEEDS=1` (re)writes the seeds made here from real
//! messages, so the fuzzer starts from inputs that reach deep states.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use trustmig_protocol::fuzzing;
use trustmig_protocol::keys::TrafficSecret;
use trustmig_protocol::messages::{ClientHello, Message, TransferMode};
use trustmig_protocol::order::SignedOrder;
use trustmig_protocol::record::{RecordType, Sealer};

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

fn prefixed(msgs: &[Vec<u8>]) -> Vec<u8> {
    msgs.iter()
        .flat_map(|m| {
            (m.len() as u16)
                .to_be_bytes()
                .into_iter()
                .chain(m.iter().copied())
        })
        .collect()
}

fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut body = order_body(1);
    body.source = [2; 32];
    body.destination = [1; 32];
    let signed = SignedOrder::sign(&body, &op());
    let hello = Message::ClientHello(ClientHello {
        versions: vec![1],
        nonce: [1; 32],
        order: signed.clone(),
        mode: TransferMode::Precopy {
            page_size: 4096,
            page_count: 256,
        },
        streams: 2,
    })
    .encode();
    let mut rec = Vec::new();
    let mut s = Sealer::new(TrafficSecret::dangerous_from_bytes([3; 32], [4; 12]), 0);
    s.seal(RecordType::Pages, b"seed payload", &mut rec)
        .unwrap();
    let mut batch = 2u32.to_be_bytes().to_vec();
    batch.extend_from_slice(&0u64.to_be_bytes());
    batch.push(1);
    batch.extend_from_slice(&[0x5A; 512]);
    batch.extend_from_slice(&1u64.to_be_bytes());
    batch.push(0);
    vec![
        ("control_message", "client_hello", hello.clone()),
        ("control_message", "ready", Message::Ready.encode()),
        (
            "control_message",
            "switch_over",
            Message::SwitchOver {
                stream_records: vec![3, 4],
                paused: true,
            }
            .encode(),
        ),
        (
            "control_message",
            "settle_query",
            Message::SettleQuery { order_id: [7; 16] }.encode(),
        ),
        (
            "control_message",
            "settle_answer",
            Message::SettleAnswer {
                order_id: [7; 16],
                committed: false,
            }
            .encode(),
        ),
        ("order_verify", "signed_order", signed.to_cbor()),
        (
            "record_open",
            "pages_record",
            [vec![rec.len() as u8], rec].concat(),
        ),
        ("responder_handshake", "client_hello", prefixed(&[hello])),
        (
            "precopy_dest",
            "two_pages",
            prefixed(&[batch, [&[0xDEu8][..], b"device"].concat()]),
        ),
    ]
}

#[test]
fn committed_corpus_runs_clean() {
    if std::env::var_os("TRUSTMIG_WRITE_SEEDS").is_some() {
        for (target, name, data) in seeds() {
            std::fs::create_dir_all(corpus(target)).unwrap();
            std::fs::write(corpus(target).join(name), data).unwrap();
        }
    }
    type Harness = (&'static str, fn(&[u8]));
    let harnesses: [Harness; 5] = [
        ("control_message", fuzzing::control_message),
        ("order_verify", fuzzing::order_verify),
        ("record_open", fuzzing::record_open),
        ("responder_handshake", fuzzing::responder_handshake),
        ("precopy_dest", fuzzing::precopy_dest),
    ];
    for (target, f) in harnesses {
        let dir = corpus(target);
        let entries: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .collect();
        assert!(!entries.is_empty(), "{target} has a seed corpus");
        for e in entries {
            let data = std::fs::read(e.unwrap().path()).unwrap();
            f(&data);
        }
    }
}
