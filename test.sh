#!/usr/bin/env bash
# Every test: unit, property, vectors (Rust and an independent Python recomputation),
# TPM (swtpm), system tests with two agents, QEMU sidecar tests. Installs what is missing.
set -euo pipefail
cd "$(dirname "$0")"
scripts/install-deps.sh test
python3 spec/vectors/check_independent.py
cargo test --workspace "$@"
