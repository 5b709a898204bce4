#!/usr/bin/env python3
"""The benchmark runner: ferry next to the tools an operator would use
instead, on the same data, in one run, alternating, REPS times each.

Workloads: the seed of an image, then increments of 0.1 %, 1 % and 10 %
random 4 KiB rewrites (the same blocks, the same bytes for every tool).
Data sets: a VM-like image (a real ext4 made with `mke2fs -d` from files of
/usr, some of them twice as template clones, the free space zeros) and a
random (incompressible) one.

Peers: rsync through its daemon (plain and -z; the increments with
--no-whole-file, rsync's delta), restic and borg into a local repository,
and, for the seed, nbdcopy into nbdkit's file plugin (the floor for moving
the bytes through NBD).

Per workload it prints one Markdown table: median and spread (min-max) of
wall time, CPU seconds of every process involved, bytes on the wire (for
restic and borg: what their repository grew by, what would cross a link to
a remote one), peak memory, and each peer's time over ferry's. With
--write-docs it also puts the tables into docs/benchmarks.md, between the
markers of this runner, with the machine and the command.

    python3 bench/run.py [--reps 3] [--size 1GiB] [--data vm,random]
                         [--tools ferry,rsync,rsync-z,restic,borg,nbdcopy]
                         [--workdir DIR] [--write-docs]

A tool `ferry@PATH` runs another ferry binary the same way (the tables name
it by its file name), to compare two builds in one run, alternating.

Needs: e2fsprogs, rsync, restic, borgbackup, nbdkit, libnbd-bin (nbdcopy).
Uses about 8x SIZE of disk in the work directory.
"""

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/ferry-target"))
FERRY = os.path.join(TARGET, "release", "ferry")
CLK = os.sysconf("SC_CLK_TCK")
WORKLOADS = [("seed", 0.0), ("0.1 %", 0.001), ("1 %", 0.01), ("10 %", 0.10)]
BEGIN = "<!-- bench/run.py: begin -->"
END = "<!-- bench/run.py: end -->"


def sh(*cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def out(*cmd, env=None):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout


def parse_size(s):
    m = re.fullmatch(r"(\d+)\s*(GiB|MiB|G|M)?", s)
    if not m:
        sys.exit(f"bad size {s}")
    n = int(m.group(1))
    return n << (30 if (m.group(2) or "GiB").startswith("G") else 20)


def proc_cpu(pid, children=False):
    """CPU seconds of a process (and of its reaped children)."""
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    # fields after the name: state=0 ... utime=11 stime=12 cutime=13 cstime=14
    t = int(f[11]) + int(f[12])
    if children:
        t += int(f[13]) + int(f[14])
    return t / CLK


def proc_hwm_mib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return 0.0


def du(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def timed(cmd, env=None, stdout=None):
    """Runs a command; returns (seconds, cpu seconds, peak MiB) of it."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, env=env, stdout=stdout or subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    _, status, ru = os.wait4(p.pid, 0)
    secs = time.monotonic() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise subprocess.CalledProcessError(p.returncode, cmd)
    return secs, ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_for(cond, what, limit=120):
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > limit:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


# ---------------------------------------------------------------- data sets

def make_vm_image(path, size):
    """A real ext4 of files from /usr (about 55 % of the size), a tenth of
    them a second time (template clones), free space zeros."""
    if os.path.exists(path):
        return
    files = path + ".files"
    shutil.rmtree(files, ignore_errors=True)
    os.makedirs(files)
    budget, used, picked = int(size * 0.55), 0, []
    for top in ("/usr/lib", "/usr/share", "/usr/bin"):
        for root, dirs, names in os.walk(top):
            dirs.sort()
            for n in sorted(names):
                src = os.path.join(root, n)
                if not os.path.isfile(src) or os.path.islink(src):
                    continue
                sz = os.path.getsize(src)
                if used + sz > budget:
                    continue
                dst = os.path.join(files, "a", src.lstrip("/"))
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                try:
                    shutil.copy2(src, dst)
                except OSError:
                    continue
                used += sz
                picked.append(dst)
    rnd = random.Random(11)
    for src in rnd.sample(picked, len(picked) // 10):
        dst = os.path.join(files, "clone", os.path.relpath(src, files))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy2(src, dst)
    sh("mke2fs", "-q", "-F", "-t", "ext4", "-d", files, path, str(size // 1024) + "k")
    shutil.rmtree(files)


def make_random_image(path, size):
    if os.path.exists(path):
        return
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 16 << 20)
            f.write(os.urandom(n))
            left -= n


def rewrite(path, fraction, seed):
    """Rewrites `fraction` of the image's 4 KiB blocks with random bytes
    (seeded: every tool gets the same blocks and bytes); returns the
    distinct bytes changed."""
    size = os.path.getsize(path)
    blocks = size // 4096
    rnd = random.Random(seed)
    picked = set()
    with open(path, "r+b") as f:
        for _ in range(int(blocks * fraction)):
            b = rnd.randrange(blocks)
            picked.add(b)
            f.seek(b * 4096)
            f.write(rnd.randbytes(4096))
    return len(picked) * 4096


# ---------------------------------------------------------------- tools
# Each tool: setup(work) once per repetition, then step(image, first) per
# workload returning dict(secs, cpu, wire, mem), and teardown().


class Ferry:
    def __init__(self, w, binary=None):
        self.w = w
        self.procs = []
        # Another build (`ferry@PATH` in --tools), for an A/B in one run.
        self.bin = binary or FERRY
        self.name = f"ferry@{os.path.basename(binary)}" if binary else "ferry"

    def setup(self):
        for d in ("p", "d"):
            shutil.rmtree(os.path.join(self.w, d), ignore_errors=True)
        sh(self.bin, "--dir", f"{self.w}/p", "init", "--site", "primary", "--listen", "127.0.0.1:0",
           stdout=subprocess.DEVNULL)
        sh(self.bin, "--dir", f"{self.w}/d", "init", "--site", "dr", "--listen", "127.0.0.1:0",
           stdout=subprocess.DEVNULL)
        for d in ("p", "d"):
            log = open(f"{self.w}/{d}.log", "w")
            self.procs.append(subprocess.Popen([self.bin, "--dir", f"{self.w}/{d}", "serve"],
                                               stderr=log, stdout=subprocess.DEVNULL))
        for d in ("p", "d"):
            wait_for(lambda: os.path.exists(f"{self.w}/{d}/admin.sock"), "the daemons")
        token = out(self.bin, "--dir", f"{self.w}/d", "pair", "token").split()[-1]
        sh(self.bin, "--dir", f"{self.w}/p", "pair", "join", token, stdout=subprocess.DEVNULL)
        time.sleep(1)

    def cpu(self):
        return sum(proc_cpu(p.pid) for p in self.procs)

    def step(self, image, first):
        c0, t0 = self.cpu(), time.monotonic()
        p = f"{self.w}/p"
        if first:
            sh(self.bin, "--dir", p, "volume", "add", "disk", "--path", image, "--interval", "24h",
               stdout=subprocess.DEVNULL)

            def done():
                v = json.loads(out(self.bin, "--dir", p, "status", "disk", "--json"))["volumes"][0]
                return v["last_pass"] is not None
            wait_for(done, "the seed", limit=1800)
            rep = json.loads(out(self.bin, "--dir", p, "status", "disk", "--json"))["volumes"][0]["last_pass"]
        else:
            rep = json.loads(out(self.bin, "--dir", p, "sync", "disk", "--wait", "--json"))
        secs = time.monotonic() - t0
        return dict(secs=secs, cpu=self.cpu() - c0, wire=rep["wire_bytes"],
                    mem=sum(proc_hwm_mib(p.pid) for p in self.procs))

    def check(self, image):
        r = subprocess.run([self.bin, "--dir", f"{self.w}/p", "verify", "disk"],
                           capture_output=True)
        return r.returncode == 0

    def teardown(self):
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            p.wait()
        self.procs = []


class Rsync:
    def __init__(self, w, z):
        self.w, self.z = w, z
        self.name = "rsync -z" if z else "rsync"
        self.daemon = None

    def setup(self):
        dst = f"{self.w}/rsync-dst"
        shutil.rmtree(dst, ignore_errors=True)
        os.makedirs(dst)
        self.port = free_port()
        conf = f"{self.w}/rsyncd.conf"
        with open(conf, "w") as f:
            f.write(f"use chroot = no\nuid = {os.getuid()}\ngid = {os.getgid()}\n"
                    f"[dst]\npath = {dst}\nread only = no\n")
        self.daemon = subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--config={conf}",
                                        f"--port={self.port}", "--address=127.0.0.1"])

        def up():
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return True
            except OSError:
                return False
        wait_for(up, "rsync's daemon")

    def step(self, image, first):
        c0 = proc_cpu(self.daemon.pid, children=True)
        flags = ["--inplace", "--no-whole-file", "--ignore-times", "--stats"]
        if self.z:
            flags.append("-z")
        stats = f"{self.w}/rsync.out"
        with open(stats, "w") as so:
            secs, cpu, mem = timed(["rsync", *flags, image, f"rsync://127.0.0.1:{self.port}/dst/disk.img"],
                                   stdout=so)
        t = open(stats).read()
        num = lambda k: int(re.search(k + r": ([\d,]+)", t).group(1).replace(",", ""))
        # The daemon's child for this transfer has exited and been reaped.
        time.sleep(0.1)
        cpu += proc_cpu(self.daemon.pid, children=True) - c0
        return dict(secs=secs, cpu=cpu, wire=num("Total bytes sent") + num("Total bytes received"),
                    mem=mem)

    def check(self, image):
        return subprocess.run(["cmp", "-s", image, f"{self.w}/rsync-dst/disk.img"]).returncode == 0

    def teardown(self):
        self.daemon.terminate()
        self.daemon.wait()


class Restic:
    name = "restic"

    def __init__(self, w):
        self.w = w
        self.env = dict(os.environ, RESTIC_PASSWORD="bench", RESTIC_CACHE_DIR=f"{w}/restic-cache")

    def setup(self):
        self.repo = f"{self.w}/restic-repo"
        shutil.rmtree(self.repo, ignore_errors=True)
        shutil.rmtree(f"{self.w}/restic-cache", ignore_errors=True)
        sh("restic", "-q", "-r", self.repo, "init", env=self.env, stdout=subprocess.DEVNULL)
        self.n = 0

    def step(self, image, first):
        before = du(self.repo)
        secs, cpu, mem = timed(["restic", "-q", "-r", self.repo, "backup", image], env=self.env)
        self.n += 1
        return dict(secs=secs, cpu=cpu, wire=du(self.repo) - before, mem=mem)

    def check(self, image):
        dst = f"{self.w}/restic-restore"
        shutil.rmtree(dst, ignore_errors=True)
        sh("restic", "-q", "-r", self.repo, "restore", "latest", "--target", dst, env=self.env,
           stdout=subprocess.DEVNULL)
        ok = subprocess.run(["cmp", "-s", image, dst + image]).returncode == 0
        shutil.rmtree(dst, ignore_errors=True)
        return ok

    def teardown(self):
        pass


class Borg:
    name = "borg"

    def __init__(self, w):
        self.w = w
        self.env = dict(os.environ, BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
                        BORG_BASE_DIR=f"{w}/borg-base")

    def setup(self):
        self.repo = f"{self.w}/borg-repo"
        shutil.rmtree(self.repo, ignore_errors=True)
        shutil.rmtree(f"{self.w}/borg-base", ignore_errors=True)
        sh("borg", "init", "-e", "none", self.repo, env=self.env)
        self.n = 0

    def step(self, image, first):
        before = du(self.repo)
        self.n += 1
        # lz4, borg's default compression.
        secs, cpu, mem = timed(["borg", "create", f"{self.repo}::a{self.n}", image], env=self.env)
        return dict(secs=secs, cpu=cpu, wire=du(self.repo) - before, mem=mem)

    def check(self, image):
        dst = f"{self.w}/borg-restore"
        shutil.rmtree(dst, ignore_errors=True)
        os.makedirs(dst)
        subprocess.run(["borg", "extract", f"{self.repo}::a{self.n}"], cwd=dst, env=self.env,
                       check=True)
        ok = subprocess.run(["cmp", "-s", image, dst + image]).returncode == 0
        shutil.rmtree(dst, ignore_errors=True)
        return ok

    def teardown(self):
        pass


class NbdCopy:
    """The seed only: the image copied into nbdkit's file plugin."""
    name = "nbdcopy to nbdkit"

    def __init__(self, w):
        self.w = w
        self.kit = None

    def setup(self):
        pass

    def step(self, image, first):
        if not first:
            return None
        dst = f"{self.w}/nbdkit-dst.img"
        if os.path.exists(dst):
            os.remove(dst)
        with open(dst, "wb") as f:
            f.truncate(os.path.getsize(image))
        sock = f"{self.w}/nbdkit.sock"
        if os.path.exists(sock):
            os.remove(sock)
        self.kit = subprocess.Popen(["nbdkit", "-U", sock, "-f", "file", dst])
        wait_for(lambda: os.path.exists(sock), "nbdkit")
        c0 = proc_cpu(self.kit.pid)
        secs, cpu, mem = timed(["nbdcopy", image, f"nbd+unix:///?socket={sock}"])
        cpu += proc_cpu(self.kit.pid) - c0
        mem += proc_hwm_mib(self.kit.pid)
        self.kit.terminate()
        self.kit.wait()
        self.kit = None
        self.ok = subprocess.run(["cmp", "-s", image, dst]).returncode == 0
        return dict(secs=secs, cpu=cpu, wire=None, mem=mem)

    def check(self, image):
        return getattr(self, "ok", False)

    def teardown(self):
        if self.kit:
            self.kit.terminate()
            self.kit.wait()


def make_tool(name, w):
    if name.startswith("ferry@"):
        return Ferry(w, os.path.abspath(name[len("ferry@"):]))
    return {
        "ferry": lambda: Ferry(w),
        "rsync": lambda: Rsync(w, False),
        "rsync-z": lambda: Rsync(w, True),
        "restic": lambda: Restic(w),
        "borg": lambda: Borg(w),
        "nbdcopy": lambda: NbdCopy(w),
    }[name]()


# ---------------------------------------------------------------- runner

def run(args):
    w = args.workdir or tempfile.mkdtemp(prefix="ferry-bench.")
    os.makedirs(w, exist_ok=True)
    size = parse_size(args.size)
    results = {}  # (data, workload, tool) -> list of dicts
    changed = {}  # (data, workload) -> bytes
    checks = {}   # (data, tool) -> all replicas equal
    for data in args.data:
        base = f"{w}/{data}-{args.size}.img"
        print(f"building the {data} image ({args.size}) ...", file=sys.stderr)
        (make_vm_image if data == "vm" else make_random_image)(base, size)
        for rep in range(args.reps):
            for name in args.tools:
                tool = make_tool(name, w)
                image = f"{w}/disk.img"
                if os.path.exists(image):
                    os.remove(image)
                sh("cp", "--sparse=always", base, image)
                tool.setup()
                try:
                    for k, (wl, frac) in enumerate(WORKLOADS):
                        if frac:
                            changed[(data, wl)] = rewrite(image, frac, seed=1000 * k + 7)
                        r = tool.step(image, k == 0)
                        if r is None:
                            break
                        results.setdefault((data, wl, tool.name), []).append(r)
                        print(f"  {data} rep {rep + 1} {tool.name:18} {wl:6} {r['secs']:7.2f} s"
                              f" cpu {r['cpu']:6.2f} s wire {fmt_mb(r['wire'])}", file=sys.stderr)
                    ok = tool.check(image)
                    checks[(data, tool.name)] = checks.get((data, tool.name), True) and ok
                finally:
                    tool.teardown()
    return results, changed, checks


def fmt_mb(b):
    return "-" if b is None else f"{b / 1e6:.1f} MB"


def med(vals):
    return statistics.median(vals)


def tables(args, results, changed, checks):
    lines = []
    tools = [make_tool(t, "/nonexistent").name for t in args.tools]
    for data in args.data:
        for wl, _ in WORKLOADS:
            rows = [(t, results.get((data, wl, t))) for t in tools]
            rows = [(t, r) for t, r in rows if r]
            if not rows:
                continue
            what = "the VM-like ext4 image" if data == "vm" else "the random image"
            head = f"{wl} of {what} ({args.size})" if wl == "seed" else \
                f"increment of {wl} random 4 KiB rewrites of {what} ({args.size}; " \
                f"{changed[(data, wl)] / 1e6:.1f} MB changed)"
            lines.append(f"**{head[0].upper() + head[1:]}**, median of {args.reps} (min-max):")
            lines.append("")
            lines.append("| tool | time | CPU (all processes) | wire | peak memory | time / ferry's | copy equal |")
            lines.append("|---|---|---|---|---|---|---|")
            fmed = None
            for t, r in rows:
                if t == "ferry":
                    fmed = med([x["secs"] for x in r])
            for t, r in rows:
                secs = [x["secs"] for x in r]
                cpu = [x["cpu"] for x in r]
                wire = [x["wire"] for x in r if x["wire"] is not None]
                mem = max(x["mem"] for x in r)
                ratio = "" if fmed is None or t == "ferry" else f"{med(secs) / fmed:.2f}x"
                lines.append(
                    f"| {t} | {med(secs):.2f} s ({min(secs):.2f}-{max(secs):.2f}) "
                    f"| {med(cpu):.2f} s | {fmt_mb(med(wire)) if wire else '-'} "
                    f"| {mem:.0f} MiB | {ratio} | {'yes' if checks.get((data, t)) else 'NO'} |")
            lines.append("")
    return lines


def machine():
    cpu = "?"
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = int(open("/proc/meminfo").readline().split()[1]) // (1 << 20)
    return f"{os.cpu_count()} vCPU ({cpu}), {mem} GiB, Linux {platform.release()}"


def versions():
    v = []
    for cmd in (["rsync", "--version"], ["restic", "version"], ["borg", "--version"],
                ["nbdkit", "--version"]):
        try:
            v.append(out(*cmd).splitlines()[0].strip())
        except (OSError, subprocess.CalledProcessError):
            pass
    return "; ".join(v)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--data", default="vm,random")
    ap.add_argument("--tools", default="ferry,rsync,rsync-z,restic,borg,nbdcopy")
    ap.add_argument("--workdir")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    args.data = args.data.split(",")
    args.tools = args.tools.split(",")
    sh("cargo", "build", "--release", "--quiet", cwd=ROOT,
       env=dict(os.environ, CARGO_TARGET_DIR=TARGET))
    results, changed, checks = run(args)
    cmd = "python3 bench/run.py " + " ".join(sys.argv[1:])
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {machine()}; {versions()}.",
        f"Command: `{cmd.strip()}`. Every tool runs the whole sequence (seed, then the",
        "increments) in turn, the tools alternating, on a fresh copy of the image and",
        "a fresh destination; ferry over QUIC on loopback between two daemons,",
        "rsync through its daemon on loopback, restic and borg into local",
        "repositories (wire: what the repository grew by). CPU counts every process",
        "involved (both ferry daemons; rsync's client and daemon; nbdcopy and nbdkit).",
        "Peak memory: ferry's two daemons together (since their start), the others'",
        "largest process.",
        "",
    ] + tables(args, results, changed, checks)
    text = "\n".join(lines)
    print(text)
    if args.write_docs:
        p = os.path.join(ROOT, "docs", "benchmarks.md")
        doc = open(p).read()
        block = f"{BEGIN}\n{text}\n{END}"
        if BEGIN in doc and END in doc:
            doc = doc[:doc.index(BEGIN)] + block + doc[doc.index(END) + len(END):]
        else:
            doc = doc.rstrip("\n") + "\n\n## Side by side: seed and increments (bench/run.py)\n\n" + block + "\n"
        open(p, "w").write(doc)


if __name__ == "__main__":
    main()
