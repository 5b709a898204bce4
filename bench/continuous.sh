#!/usr/bin/env bash
# Continuous replication: fio through ferry's export with replication off
# (snapshot volume), async and sync, next to nbdkit's file plugin (an
# unreplicated NBD server); replication lag at a sustained write rate; sync
# flush latency. Two sites on loopback. Prints Markdown tables.
#
#   bash bench/continuous.sh [WORKDIR] [SECONDS]
#
# Needs: fio (with its nbd engine), nbdkit, python3. Uses ~6 GiB of disk.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ferry-target}"
cargo build --release --quiet
FERRY="$CARGO_TARGET_DIR/release/ferry"
W="${1:-$(mktemp -d /tmp/ferry-cont-bench.XXXXXX)}"
T="${2:-20}"
mkdir -p "$W"
cleanup() {
  for p in "${PPID_:-}" "${DPID:-}" "${KPID:-}"; do [[ -n "$p" ]] && kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

rm -rf "$W"/pri "$W"/dr "$W"/*.img "$W"/nbdkit.sock
for v in off async sync nbdkit; do fallocate -l 1G "$W/$v.img"; done
"$FERRY" --dir "$W/pri" init --site primary --listen 127.0.0.1:0 >/dev/null
"$FERRY" --dir "$W/dr" init --site dr --listen 127.0.0.1:0 >/dev/null
"$FERRY" --dir "$W/pri" serve 2>"$W/pri.log" & PPID_=$!
"$FERRY" --dir "$W/dr" serve 2>"$W/dr.log" & DPID=$!
for d in pri dr; do for _ in $(seq 100); do [[ -S "$W/$d/admin.sock" ]] && break; sleep 0.1; done; done
"$FERRY" --dir "$W/pri" pair join "$("$FERRY" --dir "$W/dr" pair token)" >/dev/null
"$FERRY" --dir "$W/pri" volume add off --path "$W/off.img" --interval 24h >/dev/null
"$FERRY" --dir "$W/pri" volume add async --path "$W/async.img" --mode async >/dev/null
"$FERRY" --dir "$W/pri" volume add sync --path "$W/sync.img" --mode sync >/dev/null
nbdkit -U "$W/nbdkit.sock" -f file "$W/nbdkit.img" 2>"$W/nbdkit.log" & KPID=$!
for _ in $(seq 100); do [[ -S "$W/nbdkit.sock" ]] && break; sleep 0.1; done

lag() { # $1 volume: seconds and bytes not yet durable at DR
  "$FERRY" --dir "$W/pri" status "$1" --json |
    python3 -c 'import json,sys; s=json.load(sys.stdin)["volumes"][0]["stream"]; print(s["lag_seconds"], s["lag_bytes"], int(s["resync_needed"]))'
}
settle() { # wait until both continuous volumes have no lag
  for _ in $(seq 600); do
    read -r a _ ra < <(lag async); read -r s _ rs < <(lag sync)
    [[ "$a" == "0.0" && "$s" == "0.0" && "$ra" == 0 && "$rs" == 0 ]] && return
    sleep 0.2
  done
  echo "continuous volumes did not settle" >&2
}
settle

run() { # $1 uri, $2 rw, $3 bs, $4 iodepth, [$5 extra] -> "iops MB/s"
  fio --name=b --ioengine=nbd --uri="$1" --rw="$2" --bs="$3" --iodepth="$4" --size=1G \
      --time_based --runtime="$T" ${5:-} --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]["write"]; print("%.0f %.0f" % (j["iops"], j["bw"] * 1024 / 1e6))'
}
uri() { echo "nbd+unix:///$1?socket=$W/pri/nbd.sock"; }
K="nbd+unix:///?socket=$W/nbdkit.sock"

echo "| server | 4 KiB random write, iodepth 32 | 1 MiB sequential write, iodepth 8 | 4 KiB random write + flush every 32 writes |"
echo "|---|---|---|---|"
row() { # $1 label, $2 uri
  read -r I _ < <(run "$2" randwrite 4k 32); settle
  read -r _ B < <(run "$2" write 1M 8); settle
  read -r FI _ < <(run "$2" randwrite 4k 32 "--fsync=32"); settle
  echo "| $1 | $I IOPS | $B MB/s | $FI IOPS |"
}
row "ferry, replication off (snapshot volume)" "$(uri off)"
row "ferry async" "$(uri async)"
row "ferry sync" "$(uri sync)"
row "nbdkit file (unreplicated)" "$K"
grep -q "falling back to a resync" "$W/pri.log" && echo && echo "note: a journal filled during the runs (see $W/pri.log): resyncs happened"

# Lag at a sustained rate: 64 KiB random writes at 40 MB/s on the async
# volume, flushed every 16 writes; the lag sampled every 100 ms.
echo
fio --name=lag --ioengine=nbd --uri="$(uri async)" --rw=randwrite --bs=64k --iodepth=4 --size=1G \
    --rate=40m --fsync=16 --time_based --runtime="$T" --output-format=json >/dev/null 2>&1 & FIO=$!
sleep 2
: > "$W/lag.txt"
while kill -0 "$FIO" 2>/dev/null; do lag async >> "$W/lag.txt"; sleep 0.1; done
python3 - "$W/lag.txt" <<'EOF'
import sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
s = sorted(float(r[0]) for r in rows); b = sorted(int(r[1]) for r in rows)
p = lambda v, q: v[min(len(v) - 1, int(q * len(v)))]
print("| async lag at 40 MB/s (64 KiB writes, flush every 16) | p50 | p99 | max | samples |")
print("|---|---|---|---|---|")
print("| seconds | %.3f | %.3f | %.3f | %d |" % (p(s, .5), p(s, .99), s[-1], len(s)))
print("| bytes | %d | %d | %d | |" % (p(b, .5), p(b, .99), b[-1]))
EOF
settle

# Writes that never flush, at a set rate below and above what the stream
# carries: the DR side applies at the primary's own flush records (every
# 64 MiB unflushed) and trims its redo log at points due once it is half
# full; a resync means a journal filled anyway.
echo
echo "| async, 1 MiB sequential writes, no flush, for ${T} s | written MB/s | lag bytes max | resync |"
echo "|---|---|---|---|"
for rate in 100 200 400; do
  before=$(grep -c "falling back to a resync" "$W/pri.log" || true)
  fio --name=nf --ioengine=nbd --uri="$(uri async)" --rw=write --bs=1M --iodepth=4 --size=1G \
      --rate="${rate}m" --time_based --runtime="$T" --output-format=json > "$W/nf.json" 2>/dev/null & FIO=$!
  : > "$W/nf-lag.txt"
  while kill -0 "$FIO" 2>/dev/null; do lag async >> "$W/nf-lag.txt"; sleep 0.2; done
  wait "$FIO" || true
  after=$(grep -c "falling back to a resync" "$W/pri.log" || true)
  bw=$(python3 -c 'import json,sys; t=open(sys.argv[1]).read(); print("%.0f" % (json.loads(t[t.index("{"):])["jobs"][0]["write"]["bw"] * 1024 / 1e6))' "$W/nf.json")
  maxlag=$(awk 'BEGIN { m = 0 } $2 > m { m = $2 } END { print m }' "$W/nf-lag.txt")
  echo "| at ${rate} MB/s | $bw | $maxlag | $([[ $after -gt $before ]] && echo yes || echo no) |"
  settle
done

# Flush latency: 4 KiB writes at iodepth 1, each followed by a flush.
echo
echo "| flush latency (4 KiB write + flush, iodepth 1) | p50 | p99 |"
echo "|---|---|---|"
for v in off async sync nbdkit; do
  u=$([[ $v == nbdkit ]] && echo "$K" || uri "$v")
  fio --name=f --ioengine=nbd --uri="$u" --rw=randwrite --bs=4k --iodepth=1 --size=1G \
      --fsync=1 --time_based --runtime=10 --output-format=json 2>/dev/null |
    python3 -c '
import json,sys
t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]["sync"]["lat_ns"]["percentile"]
print("| %s | %.2f ms | %.2f ms |" % (sys.argv[1], j["50.000000"]/1e6, j["99.000000"]/1e6))' "$v"
  [[ $v == nbdkit ]] || settle
done

# CPU per write: 80,000 4 KiB random writes at a steady 10,000 IOPS (a
# flush every 64) on the async volume; the CPU time both daemons used,
# from /proc, per write, including the DR side's recovery point after it.
# Steadier than throughput on a shared 2-core box.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
echo
echo "| async, 4 KiB random writes at 10k IOPS, flush every 64 | primary CPU per write | DR CPU per write |"
echo "|---|---|---|"
for i in 1 2 3; do
  settle
  p0=$(cpu_ticks "$PPID_"); d0=$(cpu_ticks "$DPID")
  fio --name=c --ioengine=nbd --uri="$(uri async)" --rw=randwrite --bs=4k --iodepth=8 --size=1G \
      --rate_iops=10000 --number_ios=80000 --fsync=64 --output-format=json >/dev/null 2>&1
  settle
  sleep 11 # the DR side's next point (point_interval 10 s) counts too
  p1=$(cpu_ticks "$PPID_"); d1=$(cpu_ticks "$DPID")
  hz=$(getconf CLK_TCK)
  echo "| run $i | $(( (p1 - p0) * 1000000 / hz / 80000 )) µs | $(( (d1 - d0) * 1000000 / hz / 80000 )) µs |"
done
