#!/usr/bin/env bash
# The tail of an async volume's write latency under load, two ferry builds
# side by side: for each build in turn (alternating, RUNS times), two fresh
# sites on loopback with a 1 GiB async volume, then 4 KiB random writes at
# queue depth 32 without flushes for SECONDS (fio's nbd engine): IOPS, the
# CPU time each daemon used per write while fio ran (from /proc: what the
# DR side did in that time, a point included, and not what it did after),
# and the completion latency's p50, p99, p99.9 and maximum. A
# stall of the volume's write path (a lock held across slow I/O) shows in
# the p99.9 and the maximum long before it moves the IOPS.
#
#   bash bench/write_tail.sh OLD_FERRY NEW_FERRY [RUNS] [WORKDIR] [SECONDS]
#
# Needs: fio (with its nbd engine), python3.
set -euo pipefail
shopt -s inherit_errexit # a failure inside one run ends the script
OLD="$1"; NEW="$2"; RUNS="${3:-3}"
W="${4:-$(mktemp -d /tmp/ferry-tail.XXXXXX)}"
T="${5:-10}"
mkdir -p "$W"
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh" # PIDS, killed at exit; async_sites
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

one() { # $1 binary -> the row's cells
  local F="$1"
  # This runs in a subshell: its daemons go with it, however it ends.
  trap 'kill "${P_PID:-}" "${D_PID:-}" 2>/dev/null || true' EXIT
  FERRY="$F" async_sites "$W"
  local P="$P_PID" D="$D_PID"
  sleep 2
  local p0 d0 p1 d1
  p0=$(cpu_ticks "$P"); d0=$(cpu_ticks "$D")
  fio --name=t --ioengine=nbd --uri="nbd+unix:///a?socket=$W/p/nbd.sock" --rw=randwrite --bs=4k \
      --iodepth=32 --size=1G --time_based --runtime="$T" --output-format=json 2>/dev/null |
    sed -n '/^{/,$p' > "$W/fio.json"
  p1=$(cpu_ticks "$P"); d1=$(cpu_ticks "$D")
  kill "$P" "$D"; wait "$P" "$D" 2>/dev/null || true
  PIDS=()
  python3 - "$W/fio.json" $((p1 - p0)) $((d1 - d0)) "$(getconf CLK_TCK)" <<'PY'
import json, sys
w = json.load(open(sys.argv[1]))["jobs"][0]["write"]
n, hz = w["total_ios"], int(sys.argv[4])
us = lambda ticks: int(sys.argv[ticks]) * 1e6 / hz / n
c = w["clat_ns"]["percentile"]
ms = lambda ns: f"{ns / 1e6:.1f} ms"
print(f"{w['iops']:.0f} | {us(2):.0f} µs | {us(3):.0f} µs | {ms(c['50.000000'])} | "
      f"{ms(c['99.000000'])} | {ms(c['99.900000'])} | {ms(w['clat_ns']['max'])}")
PY
}

echo "| build | IOPS | primary CPU per write | DR CPU per write | p50 | p99 | p99.9 | max |"
echo "|---|---|---|---|---|---|---|---|"
for _ in $(seq "$RUNS"); do
  for b in "$OLD" "$NEW"; do
    row=$(one "$b")
    echo "| $(basename "$b") | $row |"
  done
done
