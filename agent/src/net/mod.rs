//! The network below the protocol: TLS 1.3 with pinned ed25519 identities (`tls`), and the
//! framing of control messages and data-stream records on TCP (`wire`), and how a data stream
//! opens and is bound to its session (`stream_init`).

pub mod stream_init;
pub mod tls;
pub mod wire;
