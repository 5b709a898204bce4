#!/usr/bin/env bash
# Recovery numbers on one pair of sites on loopback:
#  - drill ready time: `ferry drill start` on a 64 MiB and a 4 GiB volume
#    (RUNS times each, median), the daemon's own measure and the command's;
#  - forced failover: an async volume under a steady qemu-io write load, the
#    primary killed with -9; the time until the DR site sees the link down,
#    the `ferry failover --force` command, and the first write acknowledged by
#    the promoted export;
#  - failback by difference: 1 % of the volume rewritten in random 4 KiB
#    writes at the promoted site, the old primary restarted: the chunks and
#    wire bytes of its resync, beside rsync --no-whole-file (through its
#    daemon) bringing the same old image level with the same new one;
#  - planned switchover under load: fio writing 4 KiB random writes with a
#    flush every 16, at 2,000 IOPS, through the primary's export, then
#    `ferry failover disk --planned --disconnect-clients` (RUNS times, each
#    run back the other way): the downtime the command reports (writes
#    stopped at the old primary until the new one's export is writable) and
#    the whole command's time.
#
#   bash bench/failover.sh [RUNS] [WORKDIR]
#
# Needs: qemu-io (qemu-utils), rsync, fio (with its nbd engine), python3. Uses ~3 GiB of disk in WORKDIR.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ferry-target}"
if [[ -z "${FERRY:-}" ]]; then
  cargo build --release --quiet
  FERRY="$CARGO_TARGET_DIR/release/ferry"
fi
RUNS="${1:-3}"
W="${2:-$(mktemp -d /tmp/ferry-failover-bench.XXXXXX)}"
mkdir -p "$W"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  [[ -f "$W/rsyncd.pid" ]] && kill "$(cat "$W/rsyncd.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT

now() { date +%s.%N; }
ms() { python3 -c "print('%.0f' % (1000 * ($2 - $1)))"; }
median() { python3 -c "import statistics,sys; print('%.2f' % statistics.median(float(x) for x in sys.argv[1:]))" "$@"; }
jget() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1], {}, {'d': d}))" "$1"; }
serve() { "$FERRY" --dir "$W/$1" serve 2>>"$W/$1.log" & PIDS+=($!); echo $! > "$W/$1.pid"
  for _ in $(seq 100); do [[ -S "$W/$1/admin.sock" ]] && return; sleep 0.1; done; echo "no daemon at $1" >&2; exit 1; }
f() { local d=$1; shift; "$FERRY" --dir "$W/$d" "$@"; }
consistent() { f "$1" status "$2" --json | jget "d['volumes'][0]['consistency'] == 'consistent' and d['volumes'][0]['role'] == '$3'"; }
wait_for() { # $1: seconds, then a command that prints True
  local t=$1; shift
  for _ in $(seq $((t * 10))); do [[ "$("$@" 2>/dev/null)" == "True" ]] && return; sleep 0.1; done
  echo "timed out waiting for: $*" >&2; exit 1
}

rm -rf "$W/pri" "$W/dr" "$W"/*.img "$W"/*.log
f pri init --site primary --listen 127.0.0.1:0 >/dev/null
f dr init --site dr --listen 127.0.0.1:0 >/dev/null
serve pri; serve dr
f pri pair join "$(f dr pair token 2>/dev/null)" >/dev/null

# 1. Drill ready time.
python3 - "$W" <<'PY'
import os, random, sys
w = sys.argv[1]
r = random.Random(7)
with open(f"{w}/small.img", "wb") as f:
    f.truncate(64 << 20)
    for at in range(0, 64 << 20, 4 << 20):
        f.seek(at); f.write(r.randbytes(1 << 20))
with open(f"{w}/big.img", "wb") as f:
    f.truncate(4 << 30)
    for at in range(0, 4 << 30, 256 << 20):
        f.seek(at); f.write(r.randbytes(1 << 20))
PY
f pri volume add small --path "$W/small.img" --mode async >/dev/null
f pri volume add big --path "$W/big.img" --mode async >/dev/null
has_point() { f dr status "$1" --json | jget "d['volumes'][0]['last_point'] is not None and d['volumes'][0]['consistency'] == 'consistent'"; }
wait_for 600 has_point small
wait_for 600 has_point big
declare -A READY CMD
for v in small big; do
  READY[$v]=""; CMD[$v]=""
  for _ in $(seq "$RUNS"); do
    t0=$(now)
    r=$(f dr drill start "$v" --json | jget "d['state']['ready_ms']")
    t1=$(now)
    f dr drill stop "$v" >/dev/null
    READY[$v]+=" $r"; CMD[$v]+=" $(ms "$t0" "$t1")"
  done
done

# 2. Forced failover under a write load (async; the load is qemu-io writing
# 64 KiB and flushing in a loop through the primary's export).
python3 - "$W" <<'PY'
import random, sys
r = random.Random(3)
with open(f"{sys.argv[1]}/disk.img", "wb") as f:
    f.truncate(256 << 20)
    for at in range(0, 256 << 20, 1 << 20):
        if r.random() < 0.5:
            f.seek(at); f.write(r.randbytes(1 << 20))
PY
f pri volume add disk --path "$W/disk.img" --mode async >/dev/null
wait_for 600 has_point disk
URI="nbd+unix:///disk?socket=$W/pri/nbd.sock"
( i=0; while true; do
    qemu-io -f raw "$URI" -c "write -P $((i % 250 + 1)) $(( (i * 7919 % 4000) * 65536 )) 64k" -c flush >/dev/null 2>&1 || exit 0
    i=$((i + 1))
  done ) & LOAD=$!
sleep 5
t_kill=$(now)
kill -9 "$(cat "$W/pri.pid")"
link_down() { f dr status --json | jget "not d['link']['up']"; }
wait_for 60 link_down
t_noticed=$(now)
f dr failover disk --force --json > "$W/forced.json"
t_promoted=$(now)
qemu-io -f raw "nbd+unix:///disk?socket=$W/dr/nbd.sock" -c "write -P 7 0 4k" -c flush >/dev/null
t_write=$(now)
kill "$LOAD" 2>/dev/null || true; wait "$LOAD" 2>/dev/null || true
STATE_AGE=$(jget "d['state_age_s']" < "$W/forced.json")

# 3. Failback by difference: 1 % of the volume rewritten at the new primary.
cp --sparse=always "$W/disk.img" "$W/old-at-return.img"
python3 - "$W" > "$W/writes.qio" <<'PY'
import random, sys
r = random.Random(11)
blocks = (256 << 20) // 4096
for b in r.sample(range(blocks), blocks // 100):
    print(f"write -P {r.randrange(1, 255)} {b * 4096} 4k")
print("flush")
PY
qemu-io -f raw "nbd+unix:///disk?socket=$W/dr/nbd.sock" < "$W/writes.qio" >/dev/null
serve pri
wait_for 300 consistent pri disk replica
level() { f dr status disk --json | jget "d['volumes'][0]['stream']['acked_seq'] + 1 >= d['volumes'][0]['stream']['next_seq'] and not d['volumes'][0]['stream']['resync_needed']"; }
wait_for 300 level
sleep 2
FB=$(f dr status disk --json | jget "(lambda p: f\"{p['chunks_sent_full'] + p['chunks_sent_delta']} {p['wire_bytes']} {p['bytes_changed']} {p['duration_ms']}\")(d['volumes'][0]['last_pass'])")
read -r FB_CHUNKS FB_WIRE FB_CHANGED FB_MS <<< "$FB"
cmp -s "$W/disk.img" "$W/dr/replicas/disk.img" && LEVEL=yes || LEVEL=NO
DIVERGENT=$(f pri points disk --json | jget "len([p for p in d if p.get('pinned') == 'divergent'])")

# rsync bringing the same old image level with the same new one.
mkdir -p "$W/rsync-dst"
cp --sparse=always "$W/old-at-return.img" "$W/rsync-dst/disk.img"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$W/rsyncd.conf" <<CONF
pid file = $W/rsyncd.pid
use chroot = no
uid = $(id -u)
gid = $(id -g)
[dst]
path = $W/rsync-dst
read only = no
CONF
rsync --daemon --config="$W/rsyncd.conf" --port="$PORT" --address=127.0.0.1
sleep 0.5
t0=$(now)
rsync --inplace --no-whole-file --ignore-times --stats "$W/dr/replicas/disk.img" "rsync://127.0.0.1:$PORT/dst/disk.img" > "$W/rsync.out"
t1=$(now)
RS_WIRE=$(python3 - "$W/rsync.out" <<'PY'
import re, sys
t = open(sys.argv[1]).read()
num = lambda k: int(re.search(k + r": ([\d,]+)", t).group(1).replace(",", ""))
print(num("Total bytes sent") + num("Total bytes received"))
PY
)

# 4. Planned switchover under fio load, back and forth.
SITES=(dr pri)
DOWN=""; WHOLE=""
for k in $(seq "$RUNS"); do
  at=${SITES[$(( (k - 1) % 2 ))]}
  fio --name=load --ioengine=nbd --uri="nbd+unix:///disk?socket=$W/$at/nbd.sock" --rw=randwrite \
    --bs=4k --iodepth=8 --size=256M --fsync=16 --rate_iops=2000 --time_based --runtime=120 \
    --thread >/dev/null 2>&1 & FIO=$!
  sleep 5
  t0=$(now)
  d=$(f "$at" failover disk --planned --disconnect-clients --json | jget "d['downtime_ms']")
  t1=$(now)
  # fio's nbd engine does not end when the server cuts it off: kill it.
  kill -9 "$FIO" 2>/dev/null || true; wait "$FIO" 2>/dev/null || true
  DOWN+=" $d"; WHOLE+=" $(ms "$t0" "$t1")"
  wait_for 120 consistent "$at" disk replica
done

echo "ferry failover numbers, one run, $(nproc) cores, $(uname -r)"
echo
echo "| drill ready (median of $RUNS) | daemon's measure | whole command |"
echo "|---|---|---|"
echo "| 64 MiB volume | $(median ${READY[small]}) ms | $(median ${CMD[small]}) ms |"
echo "| 4 GiB volume | $(median ${READY[big]}) ms | $(median ${CMD[big]}) ms |"
echo
echo "| forced failover, 256 MiB async volume under qemu-io load | |"
echo "|---|---|"
echo "| kill -9 of the primary to the DR site seeing the link down | $(ms "$t_kill" "$t_noticed") ms |"
echo "| \`ferry failover disk --force\` | $(ms "$t_noticed" "$t_promoted") ms |"
echo "| to the first write acknowledged by the promoted export (qemu-io, new process) | $(ms "$t_promoted" "$t_write") ms |"
echo "| age of the promoted state, as reported | ${STATE_AGE} s |"
echo
echo "| failback after 1 % divergence (2,621 random 4 KiB writes at the new primary) | ferry resync | rsync --no-whole-file (daemon) |"
echo "|---|---|---|"
echo "| wire bytes | $FB_WIRE | $RS_WIRE |"
echo "| chunks sent / bytes changed | $FB_CHUNKS / $FB_CHANGED | - |"
echo "| time | $FB_MS ms | $(ms "$t0" "$t1") ms |"
echo "| old primary level with the new one | $LEVEL (divergent points kept: $DIVERGENT) | - |"
echo
echo "| planned switchover under fio load (4 KiB random writes, flush every 16, 2,000 IOPS), median of $RUNS | |"
echo "|---|---|"
echo "| downtime the command reports (writes stopped until the new primary's export is writable) | $(median $DOWN) ms (each: $DOWN) |"
echo "| the whole \`ferry failover --planned --disconnect-clients\` command | $(median $WHOLE) ms (each: $WHOLE) |"
