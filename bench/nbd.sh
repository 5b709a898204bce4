#!/usr/bin/env bash
# NBD export throughput: fio through ferry's export next to nbdkit's file
# plugin serving the same kind of image over a Unix socket (an unreplicated
# NBD server). Prints a Markdown table.
#
#   bash bench/nbd.sh [WORKDIR] [SECONDS]
#
# Needs: fio (with its nbd engine), nbdkit. Uses 2 GiB of disk in WORKDIR.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ferry-target}"
cargo build --release --quiet
FERRY="$CARGO_TARGET_DIR/release/ferry"
W="${1:-$(mktemp -d /tmp/ferry-nbd-bench.XXXXXX)}"
T="${2:-20}"
mkdir -p "$W"
cleanup() {
  [[ -n "${FPID:-}" ]] && kill "$FPID" 2>/dev/null || true
  [[ -n "${KPID:-}" ]] && kill "$KPID" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT

rm -rf "$W/site" "$W/ferry.img" "$W/nbdkit.img" "$W/nbdkit.sock"
# Fully allocated images, so that neither server pays for block allocation.
fallocate -l 1G "$W/ferry.img"
fallocate -l 1G "$W/nbdkit.img"
"$FERRY" --dir "$W/site" init --site bench --listen 127.0.0.1:0 >/dev/null
"$FERRY" --dir "$W/site" serve 2>"$W/site.log" & FPID=$!
for _ in $(seq 100); do [[ -S "$W/site/admin.sock" ]] && break; sleep 0.1; done
"$FERRY" --dir "$W/site" volume add vol --path "$W/ferry.img" --interval 24h >/dev/null
nbdkit -U "$W/nbdkit.sock" -f file "$W/nbdkit.img" 2>"$W/nbdkit.log" & KPID=$!
for _ in $(seq 100); do [[ -S "$W/nbdkit.sock" ]] && break; sleep 0.1; done

run() { # $1 uri, $2 rw, $3 bs, $4 iodepth -> "iops MB/s"
  fio --name=b --ioengine=nbd --uri="$1" --rw="$2" --bs="$3" --iodepth="$4" --size=1G \
      --time_based --runtime="$T" --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]["write"]; print("%.0f %.0f" % (j["iops"], j["bw"] * 1024 / 1e6))'
}
F="nbd+unix:///vol?socket=$W/site/nbd.sock"
K="nbd+unix:///?socket=$W/nbdkit.sock"
read -r FI _ < <(run "$F" randwrite 4k 32)
read -r KI _ < <(run "$K" randwrite 4k 32)
read -r _ FB < <(run "$F" write 1M 8)
read -r _ KB < <(run "$K" write 1M 8)
echo "| server | 4 KiB random write, iodepth 32 | 1 MiB sequential write, iodepth 8 |"
echo "|---|---|---|"
echo "| ferry export (snapshot mode: not in the write path) | $FI IOPS | $FB MB/s |"
echo "| nbdkit file (unreplicated) | $KI IOPS | $KB MB/s |"
