#!/usr/bin/env bash
# A resync after the journal filled, two ferry builds side by side: for
# each build in turn (alternating, RUNS times), two fresh sites on loopback
# and an async volume of SIZE with DATA of random data at its start, seeded;
# then the DR daemon is killed while fio writes 128 MiB sequentially and
# 2,000 random 4 KiB writes into the volume (the primary's 64 MiB journal
# fills and the volume falls back to a resync); the page cache is dropped
# (so that the scan reads the disk, as on a host whose memory holds other
# things than this image); the DR daemon starts again. Prints the resync's
# time from the DR restart until the DR copy is level, the bytes its scan
# read, its scan phase and the primary's CPU.
#
#   bash bench/resync.sh OLD_FERRY NEW_FERRY [RUNS] [WORKDIR] [SIZE_GIB] [DATA_GIB]
#
# With RESTART_PRIMARY=1, the primary daemon is also stopped cleanly
# (SIGTERM) and started again while the DR site is away, before the page
# cache is dropped: an upgrade of the primary during an outage of the link.
#
# Needs: fio (with its nbd engine), python3, root (to drop the page cache).
set -euo pipefail
OLD="$1"; NEW="$2"; RUNS="${3:-2}"
W="${4:-$(mktemp -d /tmp/ferry-resync.XXXXXX)}"
SIZE="${5:-8}"; DATA="${6:-4}"
mkdir -p "$W"
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh" # PIDS, killed at exit
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

if [[ ! -f "$W/base.img" ]]; then
  truncate -s "${SIZE}G" "$W/base.img"
  dd if=/dev/urandom of="$W/base.img" bs=16M count=$((DATA * 64)) conv=notrunc status=none
fi

one() { # $1 binary -> one Markdown row
  local F="$1"
  rm -f "$W/disk.img"
  cp --sparse=always "$W/base.img" "$W/disk.img"
  rm -rf "$W/p" "$W/d"
  "$F" --dir "$W/p" init --site primary --listen 127.0.0.1:0 >/dev/null
  "$F" --dir "$W/d" init --site dr --listen 127.0.0.1:0 >/dev/null
  sed -i 's/^journal_bytes_max = .*/journal_bytes_max = "64MiB"/' "$W/p/ferry.toml"
  "$F" --dir "$W/d" serve 2>"$W/d.log" & D_PID=$!
  "$F" --dir "$W/p" serve 2>"$W/p.log" & P_PID=$!
  PIDS+=("$P_PID" "$D_PID")
  for _ in $(seq 100); do [[ -S "$W/p/admin.sock" && -S "$W/d/admin.sock" ]] && break; sleep 0.1; done
  "$F" --dir "$W/p" pair join "$("$F" --dir "$W/d" pair token 2>/dev/null)" >/dev/null
  local P="$P_PID"
  "$F" --dir "$W/p" volume add disk --path "$W/disk.img" --mode async >/dev/null
  stream() { # -> "lag_bytes resync_needed resync_running"
    "$F" --dir "$W/p" status disk --json |
      python3 -c 'import json,sys; s=json.load(sys.stdin)["volumes"][0]["stream"]; print(s["lag_bytes"], int(s["resync_needed"]), int(s["resync_running"]))'
  }
  level() {
    for _ in $(seq 6000); do
      read -r l n r < <(stream)
      [[ "$l $n $r" == "0 0 0" ]] && return
      sleep 0.1
    done
    echo "the volume did not get level" >&2; exit 1
  }
  level
  kill -9 "$D_PID"; wait "$D_PID" 2>/dev/null || true
  local uri="nbd+unix:///disk?socket=$W/p/nbd.sock"
  fio --name=seq --ioengine=nbd --uri="$uri" --rw=write --bs=1M --iodepth=4 --size=128M \
      --offset=$(( (DATA * 1024 + 512) ))M --output-format=json >/dev/null 2>&1
  fio --name=rnd --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k --iodepth=8 --size="${SIZE}G" \
      --number_ios=2000 --output-format=json >/dev/null 2>&1
  read -r _ n _ < <(stream)
  [[ "$n" == 1 ]] || { echo "the journal did not fill" >&2; exit 1; }
  if [[ "${RESTART_PRIMARY:-0}" == 1 ]]; then
    kill "$P_PID"; wait "$P_PID" 2>/dev/null || true
    "$F" --dir "$W/p" serve 2>>"$W/p.log" & P_PID=$!; PIDS+=("$P_PID"); P="$P_PID"
    for _ in $(seq 100); do [[ -S "$W/p/admin.sock" ]] && break; sleep 0.1; done
    n=
    for _ in $(seq 100); do
      read -r _ n _ < <(stream 2>/dev/null || echo "- - -")
      [[ "$n" == 1 ]] && break
      sleep 0.1
    done
    [[ "$n" == 1 ]] || { echo "no resync pending after the primary's restart" >&2; exit 1; }
  fi
  sync; echo 3 > /proc/sys/vm/drop_caches
  local p0 t0 t1 p1
  p0=$(cpu_ticks "$P"); t0=$(date +%s.%N)
  "$F" --dir "$W/d" serve 2>>"$W/d.log" & D_PID=$!; PIDS+=("$D_PID")
  level
  t1=$(date +%s.%N); p1=$(cpu_ticks "$P")
  "$F" --dir "$W/p" status disk --json | python3 -c '
import json,sys
r=json.load(sys.stdin)["volumes"][0]["last_pass"]
print("| %s | %.2f s | %.0f MB | %d ms | %.2f s |" % (sys.argv[1], float(sys.argv[2]), r["bytes_read"]/1e6, r["phase_ms"]["scan"], float(sys.argv[3])))
' "$(basename "$F")" "$(echo "$t1 - $t0" | bc)" "$(echo "($p1 - $p0) / 100" | bc -l)"
  kill "$P_PID" "$D_PID" 2>/dev/null || true
  wait "$P_PID" "$D_PID" 2>/dev/null || true
}

echo "| build | resync (DR restart to level) | scan read | scan phase | primary CPU |"
echo "|---|---|---|---|---|"
for _ in $(seq "$RUNS"); do one "$OLD"; one "$NEW"; done
