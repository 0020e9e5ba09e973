#!/usr/bin/env bash
# Install what trustmig needs on Debian 12, only what is missing. Idempotent; quiet when done.
set -euo pipefail
pkgs=(swtpm swtpm-tools libtss2-dev tpm2-tools pkg-config gcc binutils qemu-system-x86 qemu-utils socat openssl python3)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
