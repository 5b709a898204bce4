# Shared by the benchmark scripts (sourced).

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
