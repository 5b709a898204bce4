#!/usr/bin/env bash
# A sparse VM image: 64 GiB of which 256 MiB hold data (256 extents of
# 1 MiB of random bytes at random places, the rest never written). The
# cost of its seed and of a pass with nothing changed should follow the
# data, not the size. Snapshot mode on loopback; rsync (daemon, --sparse)
# next to it; and, with FERRY_VS, another ferry build in the same run.
#
#   bash bench/sparse.sh [WORKDIR]
#   FERRY_VS=/path/to/older/ferry bash bench/sparse.sh [WORKDIR]
#
# Needs: rsync, python3. Uses ~600 MB of disk in WORKDIR.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ferry-target}"
cargo build --release --quiet
FERRY="$CARGO_TARGET_DIR/release/ferry"
W="${1:-$(mktemp -d /tmp/ferry-sparse.XXXXXX)}"
SIZE_GIB="${SIZE_GIB:-64}"
mkdir -p "$W"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [[ -f "$W/rsyncd.pid" ]] && kill "$(cat "$W/rsyncd.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT

rm -f "$W/disk.img"
python3 - "$W/disk.img" "$SIZE_GIB" <<'PY'
import os, random, sys
path, gib = sys.argv[1], int(sys.argv[2])
size = gib << 30
rnd = random.Random(7)
with open(path, "wb") as f:
    f.truncate(size)
    for _ in range(256):
        off = rnd.randrange(0, size >> 20) << 20
        f.seek(off)
        f.write(os.urandom(1 << 20))
PY
sync

# Prints: seed_s seed_cpu_s unchanged_s unchanged_cpu_s bytes_read_unchanged
run_ferry() { # $1: binary, $2: tag
  local F="$1" T="$2" p d c0 t0 t1 s_time s_cpu u_time u_cpu
  rm -rf "$W/p-$T" "$W/d-$T"
  "$F" --dir "$W/p-$T" init --site primary --listen 127.0.0.1:0 >/dev/null
  "$F" --dir "$W/d-$T" init --site dr --listen 127.0.0.1:0 >/dev/null
  "$F" --dir "$W/p-$T" serve 2>"$W/p-$T.log" & p=$!
  "$F" --dir "$W/d-$T" serve 2>"$W/d-$T.log" & d=$!
  PIDS+=("$p" "$d")
  for _ in $(seq 100); do [[ -S "$W/p-$T/admin.sock" && -S "$W/d-$T/admin.sock" ]] && break; sleep 0.1; done
  "$F" --dir "$W/p-$T" pair join "$("$F" --dir "$W/d-$T" pair token 2>/dev/null)" >/dev/null
  sleep 1
  ticks() { echo $(( $(awk '{print $14+$15}' "/proc/$p/stat") + $(awk '{print $14+$15}' "/proc/$d/stat") )); }
  c0=$(ticks); t0=$(date +%s.%N)
  "$F" --dir "$W/p-$T" volume add disk --path "$W/disk.img" --interval 24h >/dev/null
  until "$F" --dir "$W/p-$T" status disk --json | python3 -c 'import json,sys; v=json.load(sys.stdin)["volumes"][0]; sys.exit(0 if v["last_pass"] else 1)'; do sleep 0.05; done
  t1=$(date +%s.%N)
  s_time=$(python3 -c "print(f'{$t1 - $t0:.2f}')"); s_cpu=$(python3 -c "print(($(ticks) - $c0) / 100)")
  c0=$(ticks); t0=$(date +%s.%N)
  "$F" --dir "$W/p-$T" sync disk --wait --json > "$W/pass-$T.json"
  t1=$(date +%s.%N)
  u_time=$(python3 -c "print(f'{$t1 - $t0:.2f}')"); u_cpu=$(python3 -c "print(($(ticks) - $c0) / 100)")
  read_bytes=$(python3 -c "import json; print(json.load(open('$W/pass-$T.json')).get('bytes_read', '?'))")
  kill "$p" "$d"; wait "$p" "$d" 2>/dev/null || true
  rm -rf "$W/p-$T" "$W/d-$T"
  echo "$s_time $s_cpu $u_time $u_cpu $read_bytes"
}

rsync_run() {
  local port t0 t1 a b
  mkdir -p "$W/rsync-dst"; rm -f "$W/rsync-dst/disk.img"
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  printf 'pid file = %s\nuse chroot = no\nuid = %s\ngid = %s\n[dst]\npath = %s\nread only = no\n' \
    "$W/rsyncd.pid" "$(id -u)" "$(id -g)" "$W/rsync-dst" > "$W/rsyncd.conf"
  rsync --daemon --config="$W/rsyncd.conf" --port="$port" --address=127.0.0.1
  sleep 0.5
  t0=$(date +%s.%N)
  rsync --sparse "$W/disk.img" "rsync://127.0.0.1:$port/dst/disk.img"
  t1=$(date +%s.%N); a=$(python3 -c "print(f'{$t1 - $t0:.2f}')")
  t0=$(date +%s.%N)
  rsync --sparse --ignore-times --no-whole-file "$W/disk.img" "rsync://127.0.0.1:$port/dst/disk.img"
  t1=$(date +%s.%N); b=$(python3 -c "print(f'{$t1 - $t0:.2f}')")
  kill "$(cat "$W/rsyncd.pid")"; rm -f "$W/rsyncd.pid" "$W/rsync-dst/disk.img"
  echo "$a $b"
}

echo "| ${SIZE_GIB} GiB sparse image, 256 MiB of data | seed | seed CPU (both daemons) | pass, nothing changed | its CPU | bytes read by that pass |"
echo "|---|---|---|---|---|---|"
row() { read -r a b c d e <<<"$2"; echo "| $1 | $a s | $b s | $c s | $d s | $e |"; }
row "ferry (this build)" "$(run_ferry "$FERRY" new)"
if [[ -n "${FERRY_VS:-}" ]]; then
  row "ferry ($(basename "$FERRY_VS"))" "$(run_ferry "$FERRY_VS" old)"
fi
read -r ra rb <<<"$(rsync_run)"
echo "| rsync daemon --sparse | $ra s | | $rb s (--ignore-times --no-whole-file: reads both files) | | |"
