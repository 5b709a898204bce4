# Shared by the benchmark scripts (sourced).

# The daemons and helpers a script starts; killed when it exits.
PIDS=()
kill_started() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap kill_started EXIT

# set_config FILE KEY VALUE: sets `KEY = VALUE` (VALUE as TOML writes it)
# in a ferry.toml that `ferry init` wrote; fails if the key is not there.
set_config() {
  python3 - "$1" "$2" "$3" <<'PY'
import re, sys
path, key, value = sys.argv[1:4]
t = open(path).read()
t, n = re.subn(rf"(?m)^{re.escape(key)} = .*$", lambda _: f"{key} = {value}", t)
assert n == 1, f"ferry init wrote no {key} in {path}"
open(path, "w").write(t)
PY
}

# make_ext4_image OUT: a 1 GiB ext4 image of about 600 MB of real files
# from /usr (libraries, binaries, documentation, locales), the free space
# zeros; made once, kept for the next runs.
make_ext4_image() {
  local out="$1" files="$1.files"
  [[ -f "$out" ]] && return 0
  mkdir -p "$files"
  python3 - "$files" <<'PY'
import os, shutil, sys
dst, budget, used = sys.argv[1], 600 * 10**6, 0
for top in ("/usr/lib", "/usr/share", "/usr/bin"):
    for root, dirs, files in os.walk(top):
        dirs.sort()
        for f in sorted(files):
            src = os.path.join(root, f)
            if not os.path.isfile(src) or os.path.islink(src):
                continue
            size = os.path.getsize(src)
            if used + size > budget:
                continue
            out = os.path.join(dst, src.lstrip("/"))
            os.makedirs(os.path.dirname(out), exist_ok=True)
            try:
                shutil.copy2(src, out)
                used += size
            except OSError:
                pass
PY
  mke2fs -q -t ext4 -d "$files" "$out" 1G
}

# pair_sites W: inits the sites W/p (primary) and W/d (dr), starts both
# daemons (logs in W/p.log, W/d.log; pids in P_PID and D_PID, added to
# PIDS for the caller's cleanup) and pairs them. Needs FERRY.
pair_sites() {
  local w="$1"
  rm -rf "$w/p" "$w/d"
  "$FERRY" --dir "$w/p" init --site primary --listen 127.0.0.1:0 >/dev/null
  "$FERRY" --dir "$w/d" init --site dr --listen 127.0.0.1:0 >/dev/null
  "$FERRY" --dir "$w/d" serve 2>"$w/d.log" & D_PID=$!
  "$FERRY" --dir "$w/p" serve 2>"$w/p.log" & P_PID=$!
  PIDS+=("$P_PID" "$D_PID")
  for _ in $(seq 100); do [[ -S "$w/p/admin.sock" && -S "$w/d/admin.sock" ]] && break; sleep 0.1; done
  "$FERRY" --dir "$w/p" pair join "$("$FERRY" --dir "$w/d" pair token 2>/dev/null)" >/dev/null
}

# settle_async W VOLUME: waits until the async volume has nothing the DR
# side lacks and no resync due (two minutes at most, else exits). Needs FERRY.
settle_async() {
  local s=""
  for _ in $(seq 600); do
    s=$("$FERRY" --dir "$1/p" status "$2" --json |
      python3 -c 'import json,sys; s=json.load(sys.stdin)["volumes"][0]["stream"]; print(s["lag_bytes"], int(s["resync_needed"]))')
    [[ "$s" == "0 0" ]] && return
    sleep 0.2
  done
  echo "the async volume $2 did not settle" >&2; exit 1
}

# async_sites W: pair_sites, then a fresh 1 GiB async volume "a" (image
# W/a.img), settled. Needs FERRY.
async_sites() {
  rm -f "$1/a.img"
  fallocate -l 1G "$1/a.img"
  pair_sites "$1"
  "$FERRY" --dir "$1/p" volume add a --path "$1/a.img" --mode async >/dev/null
  settle_async "$1" a
}
