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
source bench/lib.sh
make_ext4_image "$W/base.img"
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

cpu_ticks() { echo $(( $(awk '{print $14+$15}' "/proc/$PPID_F/stat") + $(awk '{print $14+$15}' "/proc/$DPID_F/stat") )); }

# Prints: seconds cpu_seconds wire_bytes changed_bytes chunks_full chunks_delta peak_rss_mib(primary+dr)
report() {
  python3 - "$W/pass.json" "$1" "$(( $(cpu_ticks) - $2 ))" "$PPID_F" "$DPID_F" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
rss = sum(int(l.split()[1]) for pid in sys.argv[4:6] for l in open(f"/proc/{pid}/status") if l.startswith("VmHWM"))
print(f"{float(sys.argv[2]):.2f} {int(sys.argv[3]) / 100:.2f} {r['wire_bytes']} {r['bytes_changed']} {r['chunks_sent_full']} {r['chunks_sent_delta']} {rss // 1024}")
PY
}

# The seed is the first pass, which `volume add` starts at once: time it from there.
seed_pass() {
  local c0 t0 t1
  c0=$(cpu_ticks); t0=$(date +%s.%N)
  "$FERRY" --dir "$W/p" volume add disk --path "$W/disk.img" --interval 24h >/dev/null
  until "$FERRY" --dir "$W/p" status disk --json | python3 -c 'import json,sys; v=json.load(sys.stdin)["volumes"][0]; sys.exit(0 if v["last_pass"] else 1)'; do sleep 0.05; done
  t1=$(date +%s.%N)
  "$FERRY" --dir "$W/p" status disk --json | python3 -c 'import json,sys; json.dump(json.load(sys.stdin)["volumes"][0]["last_pass"], sys.stdout)' > "$W/pass.json"
  report "$(python3 -c "print($t1 - $t0)")" "$c0"
}

pass() {
  local c0 t0 t1
  c0=$(cpu_ticks); t0=$(date +%s.%N)
  "$FERRY" --dir "$W/p" sync disk --wait --json > "$W/pass.json"
  t1=$(date +%s.%N)
  report "$(python3 -c "print($t1 - $t0)")" "$c0"
}

# 3. rsync daemon on loopback.
mkdir -p "$W/rsync-dst"
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
rsync_pass() { # $1: extra flags, $2: destination name; prints: seconds wire_bytes
  local t0 t1
  t0=$(date +%s.%N)
  rsync --inplace --no-whole-file --ignore-times --stats $1 "$W/disk.img" "rsync://127.0.0.1:$PORT/dst/$2" > "$W/rsync.out"
  t1=$(date +%s.%N)
  python3 - "$W/rsync.out" "$t0" "$t1" <<'PY'
import re, sys
t = open(sys.argv[1]).read()
sent = int(re.search(r"Total bytes sent: ([\d,]+)", t).group(1).replace(",", ""))
recv = int(re.search(r"Total bytes received: ([\d,]+)", t).group(1).replace(",", ""))
print(f"{float(sys.argv[3]) - float(sys.argv[2]):.2f} {sent + recv}")
PY
}

read -r F_SEED_S F_SEED_CPU F_SEED_WIRE _ _ _ F_SEED_RSS < <(seed_pass)
read -r R_SEED_S R_SEED_WIRE < <(rsync_pass "" plain.img)
read -r Z_SEED_S Z_SEED_WIRE < <(rsync_pass "-z" z.img)

# 4. Rewrite 1 % of the 4 KiB blocks with random data (same for all).
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
read -r F_INC_S F_INC_CPU F_INC_WIRE F_INC_CHANGED F_FULL F_DELTA F_INC_RSS < <(pass)
read -r R_INC_S R_INC_WIRE < <(rsync_pass "" plain.img)
read -r Z_INC_S Z_INC_WIRE < <(rsync_pass "-z" z.img)
"$FERRY" --dir "$W/p" verify disk >/dev/null && SYNCED=yes || SYNCED=NO
cmp -s "$W/disk.img" "$W/rsync-dst/plain.img" && RSYNCED=yes || RSYNCED=NO
cmp -s "$W/disk.img" "$W/rsync-dst/z.img" && ZSYNCED=yes || ZSYNCED=NO

mb() { python3 -c "print(f'{$1/1e6:.1f}')"; }
ratio() { python3 -c "print(f'{$1/$CHANGED:.2f}')"; }
echo "| 1 GiB ext4 image | seed time | seed wire | 1% pass time | 1% pass wire | wire / changed | replica equal |"
echo "|---|---|---|---|---|---|---|"
echo "| ferry (snapshot) | ${F_SEED_S} s (cpu ${F_SEED_CPU} s) | $(mb "$F_SEED_WIRE") MB | ${F_INC_S} s (cpu ${F_INC_CPU} s) | $(mb "$F_INC_WIRE") MB | $(ratio "$F_INC_WIRE")x | $SYNCED |"
echo "| rsync daemon | ${R_SEED_S} s | $(mb "$R_SEED_WIRE") MB | ${R_INC_S} s | $(mb "$R_INC_WIRE") MB | $(ratio "$R_INC_WIRE")x | $RSYNCED |"
echo "| rsync daemon -z | ${Z_SEED_S} s | $(mb "$Z_SEED_WIRE") MB | ${Z_INC_S} s | $(mb "$Z_INC_WIRE") MB | $(ratio "$Z_INC_WIRE")x | $ZSYNCED |"
echo
echo "changed: $(mb "$CHANGED") MB in $((CHANGED / 4096)) distinct 4 KiB blocks; ferry sent $F_FULL chunks whole and $F_DELTA as deltas; peak RSS of both daemons $F_SEED_RSS MiB"
echo
BENCH=$(ls -t "$CARGO_TARGET_DIR"/release/deps/primitives-* 2>/dev/null | grep -v '\.d$' | head -n1 || true)
[[ -n "$BENCH" ]] && "$BENCH" "$W/disk.img"
