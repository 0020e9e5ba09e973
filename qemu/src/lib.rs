//! trustmig-qemu: what trustmig needs of QEMU's interfaces and nothing of the agent — an async
//! QMP client with typed replies and errors (`qmp`, the block layer's in `block`), the
//! destination's command line derived from the source's (`cmdline`), and what `qemu-img` says
//! about an image (`img`). No TPM, no protocol: the fuzz targets for QMP lines and
//! command lines link this crate alone. spec: spec/qemu.md
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![warn(unreachable_pub)]

pub mod block;
pub mod cmdline;
pub mod img;
pub mod qmp;
