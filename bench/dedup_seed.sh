#!/usr/bin/env bash
# The seed of a volume whose bytes the DR store already holds: two ferry
# builds alternating, RUNS times each. For each, two fresh sites on
# loopback; volume `a` is seeded from IMAGE, then volume `b`, a copy of the
# same image: nothing travels (every chunk is deduplicated), and the DR
# side's commit writes b's replica from the store. Prints b's pass time
# and phases.
#
#   bash bench/dedup_seed.sh OLD_FERRY NEW_FERRY IMAGE [RUNS] [WORKDIR]
set -euo pipefail
OLD="$1"; NEW="$2"; IMG="$3"; RUNS="${4:-2}"
W="${5:-$(mktemp -d /tmp/ferry-dedup.XXXXXX)}"
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh" # PIDS, killed at exit; pair_sites
one() { # $1 binary
  local F="$1"
  rm -rf "${W:?}"/*
  cp --sparse=always "$IMG" "$W/a.img"
  cp --sparse=always "$IMG" "$W/b.img"
  FERRY="$F" pair_sites "$W"
  for v in a b; do
    "$F" --dir "$W/p" volume add "$v" --path "$W/$v.img" --interval 24h >/dev/null
    until "$F" --dir "$W/p" status "$v" --json | python3 -c 'import json,sys; v=json.load(sys.stdin)["volumes"][0]; sys.exit(0 if v["last_pass"] else 1)'; do
      sleep 0.05
    done
  done
  "$F" --dir "$W/p" status b --json | python3 -c 'import json,sys; r=json.load(sys.stdin)["volumes"][0]["last_pass"]; print(sys.argv[1], "b:", r["duration_ms"], "ms", r["phase_ms"], "deduplicated", r["chunks_deduped"], "sent", r["chunks_sent_full"] + r["chunks_sent_delta"])' "$(basename "$F")"
  kill "$P_PID" "$D_PID" 2>/dev/null || true
  wait "$P_PID" "$D_PID" 2>/dev/null || true
}
for _ in $(seq "$RUNS"); do
  one "$OLD"
  one "$NEW"
done
