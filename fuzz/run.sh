#!/usr/bin/env bash
# Run every fuzz target for SECONDS each (default 30) on the stable toolchain.
# cargo-fuzz needs nightly-only flags; RUSTC_BOOTSTRAP=1 enables them on stable (no nightly here).
set -euo pipefail
secs="${1:-30}"
cd "$(dirname "$0")"
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz --version 0.13.2
export RUSTC_BOOTSTRAP=1
targets=$(cargo fuzz list)
cargo fuzz build -O $targets >/dev/null 2>&1 || cargo fuzz build -O
for t in $targets; do
  mkdir -p "corpus/$t"
  # A scratch copy keeps the committed seed corpus small; new finds stay local.
  work=$(mktemp -d)
  cp -r "corpus/$t/." "$work/" 2>/dev/null || true
  echo "fuzz: $t for ${secs}s"
  # The fuzzer's own status decides (a finding exits non-zero); grep only trims its output.
  # (Before, `|| true` after the pipe made PIPESTATUS that of `true`: no finding failed CI.)
  set +e
  cargo fuzz run -O "$t" "$work" -- -max_total_time="$secs" -max_len=70000 -print_final_stats=1 2>&1 \
    | grep -E 'stat::number_of_executed_units|Done|ERROR|panicked|SUMMARY'
  status=${PIPESTATUS[0]}
  set -e
  rm -rf "$work"
  if [ "$status" -ne 0 ]; then echo "fuzz: $t FAILED (artifacts in fuzz/artifacts/$t)"; exit 1; fi
done
echo "fuzz: all targets ran ${secs}s without a finding"
