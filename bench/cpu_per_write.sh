#!/usr/bin/env bash
# CPU per write of an async volume, two ferry builds side by side: for each
# build in turn (alternating, RUNS times), two fresh sites on loopback, then
# 80,000 4 KiB random writes at a steady 10,000 IOPS with a flush every 64
# (fio's nbd engine), then the DR side's next recovery point; the CPU time
# each daemon used (from /proc) per write. Steadier than throughput on a
# shared 2-core machine, where fio, both daemons and the link share the cores.
#
#   bash bench/cpu_per_write.sh OLD_FERRY NEW_FERRY [RUNS] [WORKDIR]
#
# Needs: fio (with its nbd engine), python3.
set -euo pipefail
shopt -s inherit_errexit # a failure inside one run ends the script
OLD="$1"; NEW="$2"; RUNS="${3:-3}"
W="${4:-$(mktemp -d /tmp/ferry-cpw.XXXXXX)}"
mkdir -p "$W"
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh" # PIDS, killed at exit; async_sites
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

one() { # $1 binary -> "primary_us dr_us"
  local F="$1"
  # This runs in a subshell: its daemons go with it, however it ends.
  trap 'kill "${P_PID:-}" "${D_PID:-}" 2>/dev/null || true' EXIT
  FERRY="$F" async_sites "$W"
  local P="$P_PID" D="$D_PID"
  sleep 11 # the point after the seed is not counted
  local p0 d0 p1 d1 hz
  p0=$(cpu_ticks "$P"); d0=$(cpu_ticks "$D")
  fio --name=c --ioengine=nbd --uri="nbd+unix:///a?socket=$W/p/nbd.sock" --rw=randwrite --bs=4k \
      --iodepth=8 --size=1G --rate_iops=10000 --number_ios=80000 --fsync=64 --output-format=json >/dev/null 2>&1
  FERRY="$F" settle_async "$W" a
  sleep 11 # the DR side's next point (point_interval 10 s) counts too
  p1=$(cpu_ticks "$P"); d1=$(cpu_ticks "$D")
  hz=$(getconf CLK_TCK)
  kill "$P" "$D"; wait "$P" "$D" 2>/dev/null || true
  PIDS=()
  echo "$(( (p1 - p0) * 1000000 / hz / 80000 )) $(( (d1 - d0) * 1000000 / hz / 80000 ))"
}

echo "| run | old: primary CPU per write | old: DR CPU per write | new: primary CPU per write | new: DR CPU per write |"
echo "|---|---|---|---|---|"
for i in $(seq "$RUNS"); do
  old=$(one "$OLD"); new=$(one "$NEW")
  read -r op od <<< "$old"
  read -r np nd <<< "$new"
  echo "| $i | $op µs | $od µs | $np µs | $nd µs |"
done
