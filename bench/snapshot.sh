#!/usr/bin/env bash
# Snapshot-mode benchmark: seed and 1 % incremental pass of a 1 GiB ext4 image
# of real files, ferry next to rsync (over its daemon on loopback), plus the
# raw cost of blake3 and zstd on the same bytes. Prints a Markdown table.
#
#   bash bench/snapshot.sh [WORKDIR]
#
# Needs: e2fsprogs (mke2fs), rsync, python3. Uses ~4 GiB of disk in WORKDIR.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ferry-target}"
cargo build --release --quiet
cargo build --release --quiet --bench primitives 2>/dev/null || true
FERRY="$CARGO_TARGET_DIR/release/ferry"
W="${1:-$(mktemp -d /tmp/ferry-bench.XXXXXX)}"
mkdir -p "$W"
cleanup() {
  [[ -n "${PPID_F:-}" ]] && kill "$PPID_F" 2>/dev/null || true
  [[ -n "${DPID_F:-}" ]] && kill "$DPID_F" 2>/dev/null || true
  [[ -f "$W/rsyncd.pid" ]] && kill "$(cat "$W/rsyncd.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT

# 1. A 1 GiB ext4 image of real files (about 600 MiB of /usr), free space as zeros.
if [[ ! -f "$W/base.img" ]]; then
  mkdir -p "$W/files"
  budget=$((600 * 1024 * 1024))
  for d in /usr/lib /usr/share /usr/bin; do
    used=$(du -sb "$W/files" | cut -f1)
    (( used >= budget )) && break
    cp -a --parents "$d" "$W/files/" 2>/dev/null || true
  done
  # Trim to fit a 1 GiB file system.
  while (( $(du -sb "$W/files" | cut -f1) > 700 * 1024 * 1024 )); do
    victim=$(find "$W/files" -type f -size +1M | head -n 200)
    [[ -z "$victim" ]] && break
    echo "$victim" | xargs rm -f
  done
  mke2fs -q -t ext4 -d "$W/files" "$W/base.img" 1G
fi
cp --sparse=always "$W/base.img" "$W/disk.img"

# 2. Two ferry sites on loopback.
rm -rf "$W/p" "$W/d" "$W/rsync-dst"
"$FERRY" --dir "$W/p" init --site primary --listen 127.0.0.1:0 >/dev/null
"$FERRY" --dir "$W/d" init --site dr --listen 127.0.0.1:0 >/dev/null
"$FERRY" --dir "$W/p" serve 2>"$W/p.log" & PPID_F=$!
"$FERRY" --dir "$W/d" serve 2>"$W/d.log" & DPID_F=$!
for _ in $(seq 100); do [[ -S "$W/p/admin.sock" && -S "$W/d/admin.sock" ]] && break; sleep 0.1; done
TOKEN=$("$FERRY" --dir "$W/d" pair token)
"$FERRY" --dir "$W/p" pair join "$TOKEN" >/dev/null
sleep 1
"$FERRY" --dir "$W/p" volume add disk --path "$W/disk.img" --interval 24h >/dev/null
sleep 0.5

pass() { # prints: seconds cpu_seconds wire_bytes changed_bytes chunks_full chunks_delta
  local t0 t1 c0 c1
  c0=$(awk '{print $14+$15}' "/proc/$PPID_F/stat"); c0d=$(awk '{print $14+$15}' "/proc/$DPID_F/stat")
  t0=$(date +%s.%N)
  "$FERRY" --dir "$W/p" sync disk --wait --json > "$W/pass.json"
  t1=$(date +%s.%N)
  c1=$(awk '{print $14+$15}' "/proc/$PPID_F/stat"); c1d=$(awk '{print $14+$15}' "/proc/$DPID_F/stat")
  python3 - "$W/pass.json" "$t0" "$t1" "$((c1 - c0 + c1d - c0d))" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
tick = 100.0
print(f"{float(sys.argv[3]) - float(sys.argv[2]):.2f} {int(sys.argv[4]) / tick:.2f} {r['wire_bytes']} {r['bytes_changed']} {r['chunks_sent_full']} {r['chunks_sent_delta']}")
PY
}

# 3. rsync daemon on loopback.
mkdir -p "$W/rsync-dst"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$W/rsyncd.conf" <<CONF
pid file = $W/rsyncd.pid
use chroot = no
[dst]
path = $W/rsync-dst
read only = no
CONF
rsync --daemon --config="$W/rsyncd.conf" --port="$PORT" --address=127.0.0.1
sleep 0.5
rsync_pass() { # prints: seconds wire_bytes
  local t0 t1
  t0=$(date +%s.%N)
  rsync --inplace --no-whole-file --sparse --stats "$W/disk.img" "rsync://127.0.0.1:$PORT/dst/" > "$W/rsync.out"
  t1=$(date +%s.%N)
  python3 - "$W/rsync.out" "$t0" "$t1" <<'PY'
import re, sys
t = open(sys.argv[1]).read()
sent = int(re.search(r"Total bytes sent: ([\d,]+)", t).group(1).replace(",", ""))
recv = int(re.search(r"Total bytes received: ([\d,]+)", t).group(1).replace(",", ""))
print(f"{float(sys.argv[3]) - float(sys.argv[2]):.2f} {sent + recv}")
PY
}

read -r F_SEED_S F_SEED_CPU F_SEED_WIRE _ _ _ < <(pass)
read -r R_SEED_S R_SEED_WIRE < <(rsync_pass)

# 4. Rewrite 1 % of the 4 KiB blocks with random data (same for both).
CHANGED=$(python3 - "$W/disk.img" <<'PY'
import os, random, sys
f = sys.argv[1]; size = os.path.getsize(f); blocks = size // 4096
rnd = random.Random(7); picked = set()
with open(f, "r+b") as fh:
    for _ in range(blocks // 100):
        b = rnd.randrange(blocks); picked.add(b)
        fh.seek(b * 4096); fh.write(os.urandom(4096))
print(len(picked) * 4096)
PY
)
read -r F_INC_S F_INC_CPU F_INC_WIRE F_INC_CHANGED F_FULL F_DELTA < <(pass)
read -r R_INC_S R_INC_WIRE < <(rsync_pass)
"$FERRY" --dir "$W/p" verify disk >/dev/null && SYNCED=yes || SYNCED=NO
cmp -s "$W/disk.img" "$W/rsync-dst/disk.img" && RSYNCED=yes || RSYNCED=NO

mb() { python3 -c "print(f'{$1/1e6:.1f}')"; }
echo "| | seed time | seed wire | 1% pass time | 1% pass wire | wire / changed | replica equal |"
echo "|---|---|---|---|---|---|---|"
echo "| ferry | ${F_SEED_S} s (cpu ${F_SEED_CPU} s) | $(mb "$F_SEED_WIRE") MB | ${F_INC_S} s (cpu ${F_INC_CPU} s) | $(mb "$F_INC_WIRE") MB | $(python3 -c "print(f'{$F_INC_WIRE/$CHANGED:.2f}')")x | $SYNCED |"
echo "| rsync daemon | ${R_SEED_S} s | $(mb "$R_SEED_WIRE") MB | ${R_INC_S} s | $(mb "$R_INC_WIRE") MB | $(python3 -c "print(f'{$R_INC_WIRE/$CHANGED:.2f}')")x | $RSYNCED |"
echo
echo "changed: $(mb "$CHANGED") MB in $((CHANGED / 4096)) distinct 4 KiB blocks; ferry sent $F_FULL chunks whole and $F_DELTA as deltas"
echo
BENCH=$(ls -t "$CARGO_TARGET_DIR"/release/deps/primitives-* 2>/dev/null | grep -v '\.d$' | head -n1 || true)
[[ -n "$BENCH" ]] && "$BENCH" "$W/disk.img"
