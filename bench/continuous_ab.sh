#!/usr/bin/env bash
# Two ferry builds side by side on the continuous modes, alternating, RUNS
# times: for each build, two fresh sites on loopback with an async and a
# sync volume (1 GiB each), then through fio's nbd engine
#   - 4 KiB random writes at queue depth 32, a flush every 32 writes (async);
#   - the same without flushes, and what the DR side still lacked when fio
#     ended (lag bytes), the journal's size then, and how long until the
#     DR side had everything (a primary that runs ahead shows here);
#   - 4 KiB write + flush at queue depth 1: flush latency p50/p99, async
#     and sync.
#
#   bash bench/continuous_ab.sh OLD_FERRY NEW_FERRY [RUNS] [WORKDIR] [SECONDS]
#
# Needs: fio (with its nbd engine), python3.
set -euo pipefail
OLD="$1"; NEW="$2"; RUNS="${3:-2}"
W="${4:-$(mktemp -d /tmp/ferry-cab.XXXXXX)}"
T="${5:-10}"
mkdir -p "$W"
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh" # PIDS, killed at exit; pair_sites

one() { # $1 binary -> one Markdown row
  local F="$1"
  rm -f "$W"/*.img
  for v in async sync; do fallocate -l 1G "$W/$v.img"; done
  FERRY="$F" pair_sites "$W"
  local P="$P_PID" D="$D_PID"
  "$F" --dir "$W/p" volume add async --path "$W/async.img" --mode async >/dev/null
  "$F" --dir "$W/p" volume add sync --path "$W/sync.img" --mode sync >/dev/null
  stream() { # $1 volume -> "lag_bytes resync_needed journal_bytes"
    "$F" --dir "$W/p" status "$1" --json |
      python3 -c 'import json,sys; s=json.load(sys.stdin)["volumes"][0]["stream"]; print(s["lag_bytes"], int(s["resync_needed"]), s["journal_bytes"])'
  }
  settle() {
    for _ in $(seq 1200); do
      read -r a ra _ < <(stream async); read -r s rs _ < <(stream sync)
      [[ "$a $ra $s $rs" == "0 0 0 0" ]] && return
      sleep 0.1
    done
    echo "the volumes did not settle" >&2; exit 1
  }
  settle
  local U="nbd+unix:///async?socket=$W/p/nbd.sock"
  iops() { python3 -c 'import json,sys; t=sys.stdin.read(); print("%.0f" % json.loads(t[t.index("{"):])["jobs"][0]["write"]["iops"])'; }
  local flushed plain lag t0 t1 lat=""
  flushed=$(fio --name=b --ioengine=nbd --uri="$U" --rw=randwrite --bs=4k --iodepth=32 --size=1G \
    --time_based --runtime="$T" --fsync=32 --output-format=json 2>/dev/null | iops)
  settle
  plain=$(fio --name=b --ioengine=nbd --uri="$U" --rw=randwrite --bs=4k --iodepth=32 --size=1G \
    --time_based --runtime="$T" --output-format=json 2>/dev/null | iops)
  read -r lag _ journal < <(stream async)
  t0=$(date +%s%N); settle; t1=$(date +%s%N)
  for v in async sync; do
    lat="$lat | $(fio --name=f --ioengine=nbd --uri="nbd+unix:///$v?socket=$W/p/nbd.sock" --rw=randwrite \
      --bs=4k --iodepth=1 --size=1G --fsync=1 --time_based --runtime=8 --output-format=json 2>/dev/null |
      python3 -c '
import json,sys
t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]["sync"]["lat_ns"]["percentile"]
print("%.2f / %.2f ms" % (j["50.000000"]/1e6, j["99.000000"]/1e6))')"
    settle
  done
  kill "$P" "$D"; wait "$P" "$D" 2>/dev/null || true
  PIDS=()
  echo "| $(basename "$F") | $flushed | $plain | $((lag / 1000000)) MB, journal $((journal / 1000000)) MB, level after $(( (t1 - t0) / 1000000 )) ms$lat |"
}

echo "| build | async 4 KiB QD32, flush every 32: IOPS | async 4 KiB QD32, no flush: IOPS | DR side lacking when fio ended | async flush p50 / p99 | sync flush p50 / p99 |"
echo "|---|---|---|---|---|---|"
for _ in $(seq "$RUNS"); do
  one "$OLD"
  one "$NEW"
done
