#!/usr/bin/env bash
# Reading a sparse volume out through NBD, as a restore, a drill's copy
# or a migration does: a 16 GiB image holding 512 MiB of random data in
# 1 MiB extents, copied to nowhere (`nbdcopy ... null:`) through
#   - ferry's export of the volume at the primary,
#   - ferry's drill clone of the same data at the DR site (chunks read
#     from the store, verified),
#   - nbdkit's file plugin (the unreplicated floor).
# Each ferry row twice: as clients use it now (block status lets them skip
# holes, multi-conn lets nbdcopy open 4 connections), and with
# `--no-extents --connections=1`, which is what they could do before ferry
# offered `base:allocation` and multi-conn. Median of REPS runs.
#
#   REPS=3 bash bench/nbd-sparse.sh [WORKDIR]
#
# Needs: nbdcopy (libnbd-bin), nbdkit, python3. Uses ~1.5 GiB of disk.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ferry-target}"
cargo build --release --quiet
FERRY="$CARGO_TARGET_DIR/release/ferry"
W="${1:-$(mktemp -d /tmp/ferry-nbd-sparse.XXXXXX)}"
REPS="${REPS:-3}"
mkdir -p "$W"
source bench/lib.sh # kills the PIDS it started at exit

rm -f "$W/nbdkit.sock"
python3 - "$W/disk.img" <<'PY'
import os, random, sys
path, size, extent, n = sys.argv[1], 16 << 30, 1 << 20, 512
random.seed(11)
with open(path, "wb") as f:
    f.truncate(size)
    for at in sorted(random.sample(range(size // extent), n)):
        f.seek(at * extent)
        f.write(os.urandom(extent))
PY
pair_sites "$W"
"$FERRY" --dir "$W/p" volume add disk --path "$W/disk.img" --interval 24h >/dev/null
"$FERRY" --dir "$W/p" sync disk --wait >/dev/null 2>&1
"$FERRY" --dir "$W/d" drill start disk >/dev/null
nbdkit -U "$W/nbdkit.sock" -f file "$W/disk.img" 2>"$W/nbdkit.log" & PIDS+=($!)
for _ in $(seq 100); do [[ -S "$W/nbdkit.sock" ]] && break; sleep 0.1; done

VOL="nbd+unix:///disk?socket=$W/p/nbd.sock"
DRILL="nbd+unix:///disk@drill?socket=$W/d/nbd.sock"
KIT="nbd+unix:///?socket=$W/nbdkit.sock"
# copy URI [nbdcopy options]: seconds of one copy to nowhere
copy() {
  local uri="$1"; shift
  local t0 t1
  t0=$(date +%s.%N)
  nbdcopy "$@" "$uri" null:
  t1=$(date +%s.%N)
  python3 -c "print(f'{$t1 - $t0:.3f}')"
}
median() { python3 -c 'import statistics, sys; print(f"{statistics.median(map(float, sys.argv[1:])):.2f}")' "$@"; }

declare -A T
ROWS=("ferry volume export|$VOL|" "ferry volume export|$VOL|--no-extents --connections=1"
      "ferry drill clone (DR store)|$DRILL|" "ferry drill clone (DR store)|$DRILL|--no-extents --connections=1"
      "nbdkit file|$KIT|")
for rep in $(seq "$REPS"); do
  for row in "${ROWS[@]}"; do
    IFS='|' read -r _ uri opts <<<"$row"
    # shellcheck disable=SC2086
    T[$row]+="$(copy "$uri" $opts) "
  done
done
echo "| 16 GiB sparse image, 512 MiB of data, nbdcopy to null: | options | time (median of $REPS) | each |"
echo "|---|---|---|---|"
for row in "${ROWS[@]}"; do
  IFS='|' read -r name _ opts <<<"$row"
  # shellcheck disable=SC2086
  echo "| $name | ${opts:-(default: extents, multi-conn)} | $(median ${T[$row]}) s | ${T[$row]% } |"
done
"$FERRY" --dir "$W/d" drill stop disk >/dev/null
