#!/usr/bin/env bash
# Idle cost of many continuous volumes: N async volumes on one pair of sites
# on loopback, seeded, then left alone; the CPU time each daemon used over
# the measurement window (from /proc/PID/stat), its threads and memory.
# A DR center protects hundreds of VMs: an idle volume should cost nothing.
#
#   bash bench/idle.sh [VOLUMES] [SECONDS] [WORKDIR]
#   FERRY=/path/to/another/ferry bash bench/idle.sh ...   # the same with another build
#
# Needs: python3. Uses VOLUMES x 1 MiB of sparse images.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ferry-target}"
if [[ -z "${FERRY:-}" ]]; then
  cargo build --release --quiet
  FERRY="$CARGO_TARGET_DIR/release/ferry"
fi
N="${1:-500}"
T="${2:-60}"
W="${3:-$(mktemp -d /tmp/ferry-idle-bench.XXXXXX)}"
mkdir -p "$W"
cleanup() {
  for p in "${PPID_:-}" "${DPID:-}"; do [[ -n "$p" ]] && kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

rm -rf "$W"/pri "$W"/dr "$W"/img
mkdir -p "$W/img"
"$FERRY" --dir "$W/pri" init --site primary --listen 127.0.0.1:0 >/dev/null
"$FERRY" --dir "$W/dr" init --site dr --listen 127.0.0.1:0 >/dev/null
"$FERRY" --dir "$W/pri" serve 2>"$W/pri.log" & PPID_=$!
"$FERRY" --dir "$W/dr" serve 2>"$W/dr.log" & DPID=$!
for d in pri dr; do for _ in $(seq 100); do [[ -S "$W/$d/admin.sock" ]] && break; sleep 0.1; done; done
"$FERRY" --dir "$W/pri" pair join "$("$FERRY" --dir "$W/dr" pair token)" >/dev/null

t0=$(date +%s)
for i in $(seq -w 1 "$N"); do
  truncate -s 1M "$W/img/v$i.img"
  "$FERRY" --dir "$W/pri" volume add "v$i" --path "$W/img/v$i.img" --mode async >/dev/null
done
# Every volume seeded: consistent at DR, nothing to stream at the primary.
seeded() {
  "$FERRY" --dir "$W/dr" status --json | python3 -c '
import json, sys
s = json.load(sys.stdin)
print(sum(1 for v in s["volumes"] if v["consistency"] == "consistent" and v["last_point"]))'
}
for _ in $(seq 3000); do
  [[ "$(seeded)" == "$N" ]] && break
  sleep 0.2
done
[[ "$(seeded)" == "$N" ]] || { echo "only $(seeded) of $N volumes seeded" >&2; exit 1; }
t1=$(date +%s)
# Past the scheduled point after the seed, then quiet.
sleep 15

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
threads() { awk '/^Threads:/ {print $2}' "/proc/$1/status"; }
rss() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
hz=$(getconf CLK_TCK)
p0=$(ticks "$PPID_"); d0=$(ticks "$DPID"); s0=$(date +%s.%N)
sleep "$T"
p1=$(ticks "$PPID_"); d1=$(ticks "$DPID"); s1=$(date +%s.%N)

pct() { python3 -c "print('%.2f' % (100.0 * ($2 - $1) / $hz / ($s1 - $s0)))"; }
echo "$N async volumes, seeded in $((t1 - t0)) s, then idle for $T s ($(nproc) cores, $(uname -r))"
echo
echo "| site | CPU over the window, % of one core | threads | resident memory |"
echo "|---|---|---|---|"
echo "| primary | $(pct "$p0" "$p1") | $(threads "$PPID_") | $(( $(rss "$PPID_") / 1024 )) MiB |"
echo "| DR | $(pct "$d0" "$d1") | $(threads "$DPID") | $(( $(rss "$DPID") / 1024 )) MiB |"
