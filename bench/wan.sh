#!/usr/bin/env bash
# Seeds through an emulated WAN: the primary reaches the DR site through
# the chaos runner's user-space UDP proxy (`chaos-tests wan-proxy`), which
# caps the rate and adds the round trip (and loss) both ways. For each link
# and each image (the 1 GiB ext4 image of bench/snapshot.sh, and 1 GiB of
# random bytes), one seed per rep: time, wire bytes (the primary's UDP
# bytes both ways, QUIC and TLS included, retransmissions too), goodput
# (the UDP bytes the DR site received through the proxy, per second,
# against the link's rate) and logical rate (the image's data bytes per
# second, what a compressible image gains over the link); each with the
# congestion controllers in CCS (limits.congestion), alternating.
#
#   REPS=2 LINKS="100Mbit/50ms/0 100Mbit/50ms/0.1 1Gbit/20ms/0" IMAGES="ext4 random" \
#     CCS="bbr cubic" bash bench/wan.sh [WORKDIR]
#
# Needs: e2fsprogs (mke2fs), python3. Uses ~4 GiB of disk in WORKDIR.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ferry-target}"
cargo build --release --quiet --workspace
FERRY="$CARGO_TARGET_DIR/release/ferry"
PROXY="$CARGO_TARGET_DIR/release/chaos-tests"
W="${1:-$(mktemp -d /tmp/ferry-wan.XXXXXX)}"
REPS="${REPS:-2}"
LINKS="${LINKS:-100Mbit/50ms/0 100Mbit/50ms/0.1 1Gbit/20ms/0}"
IMAGES="${IMAGES:-ext4 random}"
CCS="${CCS:-bbr cubic}"
mkdir -p "$W"
source bench/lib.sh # kills the PIDS it started at exit
make_ext4_image "$W/ext4.img"
[[ -f "$W/random.img" ]] || head -c 1073741824 /dev/urandom >"$W/random.img"

# seed IMAGE RATE RTT LOSS CC: prints seconds wire_bytes data_bytes
# delivered_bytes zstd_level
seed() {
  local image="$1" rate="$2" rtt="$3" loss="$4" cc="$5" p d x t0 t1 addr
  rm -rf "$W/p" "$W/d"
  # The DR site on a port of its own; the primary learns the proxy's
  # address (in front of it) from the pairing token.
  local port; port=$(python3 -c 'import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "$FERRY" --dir "$W/p" init --site primary --listen 127.0.0.1:0 >/dev/null
  "$FERRY" --dir "$W/d" init --site dr --listen "127.0.0.1:$port" >/dev/null
  for site in p d; do set_config "$W/$site/ferry.toml" congestion "\"$cc\""; done
  coproc PX { exec "$PROXY" wan-proxy --to "127.0.0.1:$port" --rate "$rate" --rtt "$rtt" --loss "$loss" 2>>"$W/proxy.log"; }
  x=$PX_PID; PIDS+=("$x")
  read -r _ addr <&"${PX[0]}"
  "$FERRY" --dir "$W/d" serve 2>"$W/d.log" & d=$!
  "$FERRY" --dir "$W/p" serve 2>"$W/p.log" & p=$!
  PIDS+=("$p" "$d")
  for _ in $(seq 100); do [[ -S "$W/p/admin.sock" && -S "$W/d/admin.sock" ]] && break; sleep 0.1; done
  "$FERRY" --dir "$W/p" pair join "$("$FERRY" --dir "$W/d" pair token --address "$addr" 2>/dev/null)" >/dev/null
  for _ in $(seq 300); do
    "$FERRY" --dir "$W/p" status --json 2>/dev/null |
      python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)["link"]["up"] else 1)' && break
    sleep 0.1
  done
  cp --sparse=always "$image" "$W/disk.img"
  t0=$(date +%s.%N)
  "$FERRY" --dir "$W/p" volume add disk --path "$W/disk.img" --interval 24h >/dev/null
  until "$FERRY" --dir "$W/p" status disk --json | python3 -c 'import json,sys; v=json.load(sys.stdin)["volumes"][0]; sys.exit(0 if v["last_pass"] else 1)'; do sleep 0.1; done
  t1=$(date +%s.%N)
  # Delivered: what the DR site took in through the proxy since it started.
  local rx; rx=$("$FERRY" --dir "$W/d" status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["link"]["udp_rx_bytes"])')
  "$FERRY" --dir "$W/p" status disk --json | python3 -c "
import json, sys
r = json.load(sys.stdin)['volumes'][0]['last_pass']
print(f'{$t1 - $t0:.2f} {r[\"wire_bytes\"]} {r[\"bytes_read\"]} {$rx} {r.get(\"zstd_level\", \"-\")}')"
  kill "$p" "$d" "$x"; wait "$p" "$d" "$x" 2>/dev/null || true
}

echo "| link (rate, RTT, loss each way) | image | congestion | run | time | wire | goodput / link rate | data bytes / s / link rate | zstd level at the end |"
echo "|---|---|---|---|---|---|---|---|---|"
for link in $LINKS; do
  IFS=/ read -r rate rtt loss <<<"$link"
  bps=$(python3 -c "
import sys; s = sys.argv[1]
m = {'Kbit': 1e3, 'Mbit': 1e6, 'Gbit': 1e9}
print(next(float(s[:-len(k)]) * v / 8 for k, v in m.items() if s.endswith(k)))" "$rate")
  for rep in $(seq "$REPS"); do
    for img in $IMAGES; do
      for cc in $CCS; do
        seed "$W/$img.img" "$rate" "$rtt" "$loss" "$cc" >"$W/row"
        read -r s wire data rx level <"$W/row"
        python3 -c "
s, wire, data, rx, bps = $s, $wire, $data, $rx, $bps
print(f'| $rate, $rtt, $loss % | $img | $cc | $rep | {s:.1f} s | {wire / 1e6:.1f} MB | {rx / s / bps * 100:.0f} % | {data / s / bps * 100:.0f} % | $level |')"
      done
    done
  done
done
