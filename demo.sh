#!/usr/bin/env bash
# The main job: an attested live migration between two agents on this machine.
# Installs what is missing (swtpm, libtss2, ...), builds in release mode, runs `trustmig demo`.
# Extra arguments go to `trustmig demo` (try --help, --json, --size-mib 1024).
set -euo pipefail
cd "$(dirname "$0")"
scripts/install-deps.sh
cargo build --release --quiet -p trustmig-agent
exec target/release/trustmig demo "$@"
