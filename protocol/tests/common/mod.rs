//! Shared set-up: a signed order and a full handshake between test-double agents.
#![allow(dead_code)]

use ed25519_dalek::SigningKey;
use trustmig_protocol::error::Error;
use trustmig_protocol::handshake::*;
use trustmig_protocol::manifest::ImageManifest;
use trustmig_protocol::messages::TransferMode;
use trustmig_protocol::order::*;
use trustmig_protocol::testing::{SoftAttester, SoftVerifier};

pub const NOW: u64 = 1_800_000_000;
pub const SRC: [u8; 32] = [1; 32];
pub const DST: [u8; 32] = [2; 32];
pub const EXE: [u8; 32] = [8; 32];

pub fn op() -> SigningKey {
    SigningKey::from_bytes(&[42; 32])
}

pub fn order_body(id: u8) -> OrderBody {
    OrderBody {
        v: ORDER_VERSION,
        order_id: [id; 16],
        vm: "vm-1".into(),
        source: SRC,
        destination: DST,
        destination_addr: "127.0.0.1:7443".into(),
        limits: Limits {
            downtime_ms: 300,
            bandwidth_bps: 0,
            max_rounds: 30,
            on_nonconvergence: NonConvergence::Force,
        },
        not_before: NOW - 10,
        not_after: NOW + 600,
        strict_final_quote: false,
    }
}

pub fn manifest() -> ImageManifest {
    ImageManifest {
        vm: "vm-1".into(),
        config_digest: [3; 32],
        chunk_size: 1 << 20,
        disks: vec![],
        mirrors: vec![],
    }
}

/// Everything one handshake needs; each field can be bent by a test.
pub struct Setup {
    pub signed: SignedOrder,
    pub src_exporter: [u8; 32],
    pub dst_exporter: [u8; 32],
    pub src_sees_peer: [u8; 32],
    pub dst_sees_peer: [u8; 32],
    pub src_exe: [u8; 32],
    pub dst_exe: [u8; 32],
    /// The destination's fresh nonce (its `ServerHello`).
    pub dst_nonce: [u8; 32],
    pub tamper_s2d: Box<dyn FnMut(usize, Vec<u8>) -> Vec<u8>>,
    pub tamper_d2s: Box<dyn FnMut(usize, Vec<u8>) -> Vec<u8>>,
    /// What the source attests and sends as its image manifest.
    pub manifest: ImageManifest,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            signed: SignedOrder::sign(&order_body(1), &op()),
            src_exporter: [5; 32],
            dst_exporter: [5; 32],
            src_sees_peer: DST,
            dst_sees_peer: SRC,
            src_exe: EXE,
            dst_exe: EXE,
            dst_nonce: [0xBB; 32],
            tamper_s2d: Box::new(|_, m| m),
            tamper_d2s: Box::new(|_, m| m),
            manifest: manifest(),
        }
    }
}

/// Which side failed and how.
#[derive(Debug)]
pub enum Failed {
    /// The source refused.
    Source(Error),
    /// The destination refused.
    Destination(Error),
}

pub fn run(
    mut s: Setup,
    journal: &mut MemoryJournal,
) -> Result<(Established, Established), Failed> {
    let verified = s
        .signed
        .verify(&OrderPolicy {
            operators: &[op().verifying_key().to_bytes()],
            me: SRC,
            role: Role::Source,
            now: NOW,
        })
        .map_err(|e| Failed::Source(e.into()))?;
    let mode = TransferMode::Precopy {
        page_size: 4096,
        page_count: 256,
    };
    let src_chan = ChannelBinding {
        tls_exporter: s.src_exporter,
        local: SRC,
        peer: s.src_sees_peer,
    };
    let (mut src, hello) = SourceHandshake::start(
        verified,
        src_chan,
        ([0xAA; 32], &[0xAB; 32]),
        mode,
        2,
        &s.manifest,
    )
    .map_err(Failed::Source)?;
    let mut dst = DestinationHandshake::new(
        DestinationConfig {
            operators: vec![op().verifying_key().to_bytes()],
            now: NOW,
        },
        ChannelBinding {
            tls_exporter: s.dst_exporter,
            local: DST,
            peer: s.dst_sees_peer,
        },
        s.dst_nonce,
    );
    let mut src_att = SoftAttester::new(b"k", SRC, s.src_exe);
    let mut dst_att = SoftAttester::new(b"k", DST, s.dst_exe);
    let ver = SoftVerifier {
        key: b"k".to_vec(),
        allowed_exe: vec![EXE],
    };
    let mut to_dst = vec![hello];
    let (mut n_s2d, mut n_d2s) = (0, 0);
    while !(src.is_done() && dst.is_done()) {
        let mut to_src = Vec::new();
        for m in to_dst.drain(..) {
            let m = (s.tamper_s2d)(n_s2d, m);
            n_s2d += 1;
            to_src.extend(
                dst.handle(&m, &mut dst_att, &ver, journal)
                    .map_err(Failed::Destination)?,
            );
        }
        for m in to_src {
            let m = (s.tamper_d2s)(n_d2s, m);
            n_d2s += 1;
            to_dst.extend(src.handle(&m, &mut src_att, &ver).map_err(Failed::Source)?);
        }
        if to_dst.is_empty() && !(src.is_done() && dst.is_done()) {
            panic!("handshake stalled");
        }
    }
    Ok((
        src.into_established().unwrap(),
        dst.into_established().unwrap(),
    ))
}
