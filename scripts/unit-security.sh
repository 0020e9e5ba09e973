#!/usr/bin/env bash
# The exposure score of contrib/trustmig.service as systemd sees it, without a running systemd
# (systemd-analyze security --offline=true, systemd >= 252). Prints the table's worst lines and
# the overall level; fails unless the level is SAFE or OK.
set -euo pipefail
cd "$(dirname "$0")/../contrib"
command -v systemd-analyze >/dev/null || { echo "systemd-analyze is not installed (apt install systemd)" >&2; exit 2; }
out=$(systemd-analyze security --offline=true trustmig.service 2>&1)
echo "$out" | grep -E '^✗' | head -12 || true
line=$(echo "$out" | grep 'Overall exposure level')
echo "$line"
echo "$line" | grep -qE ': [0-9.]+ (SAFE|OK)' || { echo "exposure above OK" >&2; exit 1; }
