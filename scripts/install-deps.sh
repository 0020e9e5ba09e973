#!/usr/bin/env bash
# Install what trustmig needs on Debian 12, only what is missing. Idempotent; quiet when done.
# Usage: install-deps.sh [test]
set -euo pipefail
# libc6-dev: only a Recommends of gcc, which --no-install-recommends leaves out; without it
# nothing links (ring's and tss-esapi-sys's C code, every Rust binary).
# g++: libfuzzer-sys builds libFuzzer as C++ (the fuzz smoke run). procps: `kill`, which the
# tests and the harness run (a minimal image may leave it out).
pkgs=(swtpm swtpm-tools libtss2-dev tpm2-tools pkg-config gcc g++ libc6-dev binutils procps qemu-system-x86 qemu-utils socat openssl python3)
# `test` (from test.sh): what the tests need beyond the demo: systemd-analyze, which scores the
# service unit offline and expands its system call filter (a container may have no systemd);
# strace and libseccomp's python3 module, which run the agents under that filter.
[ "${1:-}" = test ] && pkgs+=(systemd strace python3-seccomp)
# Installed, whatever its selection: a package on hold (`hold ok installed`, a pinned
# backport, say) is there.
missing_pkgs() {
  missing=()
  for p in "${pkgs[@]}"; do
    # One line per architecture a Multi-Arch package is installed for.
    dpkg-query -W -f='${db:Status-Status}\n' "$p" 2>/dev/null | grep -qx installed || missing+=("$p")
  done
}
sudo=""
install_missing() {
  echo "installing: ${missing[*]}" >&2
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "missing packages (${missing[*]}): run this as root, or install sudo" >&2; exit 1; }
    sudo="sudo"
  fi
  # A fresh machine's apt-daily may hold dpkg's lock for a while: `install` waits for it;
  # `update` is tried again (the lists' lock is not waited for). A source that cannot be
  # reached (a third-party repository) fails `update` every time: the install goes on from
  # the lists there are, if there are any.
  local apt=($sudo env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600)
  local tries=0
  until "${apt[@]}" update -qq; do
    tries=$((tries + 1))
    if [ "$tries" -ge 3 ]; then
      compgen -G "/var/lib/apt/lists/*_Packages*" >/dev/null || {
        echo "apt-get update failed $tries times and there are no package lists" >&2; exit 1; }
      echo "apt-get update failed $tries times; installing from the package lists there are" >&2
      break
    fi
    sleep 20
  done
  "${apt[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
missing_pkgs
if [ ${#missing[@]} -gt 0 ]; then
  install_missing
  # An install may remove a package that was there: Debian 12's qemu-system-x86 (7.2) removes
  # a backported qemu-utils (10.x), and qemu-img with it (seen on a fresh machine). Once more,
  # for what went: now Debian's own version, which fits.
  missing_pkgs
  [ ${#missing[@]} -eq 0 ] || install_missing
  missing_pkgs
  [ ${#missing[@]} -eq 0 ] || { echo "still missing after install: ${missing[*]}" >&2; exit 1; }
fi
# rustup's cargo, for a shell that did not read ~/.profile (a CI runner's, say).
[ -d "${HOME:-/nonexistent}/.cargo/bin" ] && case ":$PATH:" in *":$HOME/.cargo/bin:"*) ;; *) PATH="$HOME/.cargo/bin:$PATH" ;; esac
command -v cargo >/dev/null || {
  echo "cargo not found: install Rust 1.85 or newer with rustup first, as the user who runs this:" >&2
  echo "  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y && . \"\$HOME/.cargo/env\"" >&2
  exit 1
}
# Debian 12's own cargo is 1.63; the workspace needs rust-version 1.85 (Cargo.toml).
cargo_minor=$(cargo --version | sed -n 's/^cargo 1\.\([0-9]*\).*/\1/p')
if [ -n "$cargo_minor" ] && [ "$cargo_minor" -lt 85 ]; then
  echo "$(cargo --version) is too old: trustmig needs Rust 1.85 or newer (rustup; Debian's cargo is 1.63)" >&2
  exit 1
fi
