#!/usr/bin/env bash
# The zstd level of a seed: fixed at 3 (ferry's old default) against the
# automatic choice (limits.zstd_level = 0), on loopback as it is and with
# the link capped at 100 Mbit/s (`ferry link limit`), for the 1 GiB ext4
# image of bench/snapshot.sh. The configurations alternate, REPS times
# each; every row is one seed.
#
#   REPS=2 bash bench/compression.sh [WORKDIR]
#
# Needs: e2fsprogs (mke2fs), python3. Uses ~3 GiB of disk in WORKDIR.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ferry-target}"
cargo build --release --quiet
FERRY="$CARGO_TARGET_DIR/release/ferry"
W="${1:-$(mktemp -d /tmp/ferry-zstd.XXXXXX)}"
REPS="${REPS:-2}"
mkdir -p "$W"
source bench/lib.sh # kills the PIDS it started at exit
make_ext4_image "$W/base.img"

# seed LEVEL RATE: prints seconds cpu_seconds wire_MB final_level
seed() {
  local level="$1" rate="$2" p d c0 t0 t1
  rm -rf "$W/p" "$W/d"
  "$FERRY" --dir "$W/p" init --site primary --listen 127.0.0.1:0 >/dev/null
  "$FERRY" --dir "$W/d" init --site dr --listen 127.0.0.1:0 >/dev/null
  set_config "$W/p/ferry.toml" zstd_level "$level"
  "$FERRY" --dir "$W/p" serve 2>"$W/p.log" & p=$!
  "$FERRY" --dir "$W/d" serve 2>"$W/d.log" & d=$!
  PIDS+=("$p" "$d")
  for _ in $(seq 100); do [[ -S "$W/p/admin.sock" && -S "$W/d/admin.sock" ]] && break; sleep 0.1; done
  "$FERRY" --dir "$W/p" pair join "$("$FERRY" --dir "$W/d" pair token 2>/dev/null)" >/dev/null
  sleep 1
  "$FERRY" --dir "$W/p" link limit "$rate" >/dev/null
  cp --sparse=always "$W/base.img" "$W/disk.img"
  ticks() { echo $(( $(awk '{print $14+$15}' "/proc/$p/stat") + $(awk '{print $14+$15}' "/proc/$d/stat") )); }
  c0=$(ticks); t0=$(date +%s.%N)
  "$FERRY" --dir "$W/p" volume add disk --path "$W/disk.img" --interval 24h >/dev/null
  until "$FERRY" --dir "$W/p" status disk --json | python3 -c 'import json,sys; v=json.load(sys.stdin)["volumes"][0]; sys.exit(0 if v["last_pass"] else 1)'; do sleep 0.05; done
  t1=$(date +%s.%N)
  local cpu; cpu=$(( $(ticks) - c0 ))
  "$FERRY" --dir "$W/p" status disk --json | python3 -c "
import json, sys
r = json.load(sys.stdin)['volumes'][0]['last_pass']
print(f'{$t1 - $t0:.2f} {$cpu / 100:.2f} {r[\"wire_bytes\"] / 1e6:.1f} {r.get(\"zstd_level\", \"?\")}')"
  kill "$p" "$d"; wait "$p" "$d" 2>/dev/null || true
}

echo "| 1 GiB ext4 image, seed | link | zstd level | time | CPU (both daemons) | wire | level at the end |"
echo "|---|---|---|---|---|---|---|"
for rep in $(seq "$REPS"); do
  for rate in off 100Mbit; do
    for level in 3 0; do
      read -r s c w l < <(seed "$level" "$rate")
      name=$([[ $level == 0 ]] && echo auto || echo "$level")
      echo "| run $rep | $rate | $name | $s s | $c s | $w MB | $l |"
    done
  done
done
