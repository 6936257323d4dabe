#!/usr/bin/python3
"""The benchmark harness behind bench/run: starts the peers, runs the fio jobs in
bench/fio/ and the other measurements, and writes one JSON file of raw results.

bench/report turns that JSON into the markdown tables (medians, spreads, ratios, targets);
the harness only measures. Needs /usr/bin/python3 with python3-libnbd (for the few writes
between snapshots), fio, qemu-nbd/qemu-img, nbdkit, nbdcopy and nbdinfo.

Phases, in order (each can be picked with --only):
  asfilled    tier "as filled" (the headline): 1 GiB exports filled through each server by
              nbdcopy (snapvol also by import), measured as they are (bench/tiers.py)
  bigger      tier "larger than memory": 4 GiB exports, servers in memory cgroups of 1/8 of
              the export, caches dropped before each measurement (bench/tiers.py)
  createload  snapshot create latency on a 4 GiB volume, idle and under random 64 KiB writes
  tls         NBD over TLS: snapvol --tls require vs nbdkit --tls=require (same certificates),
              and snapvol over plaintext TCP (bench/tiers.py)
The "settled" tier (an extra: every backing file re-read into 4 KiB page-cache folios
before each run, a state the harness makes and users never have):
  firstwrite  first write after a fresh snapshot (all peers, interleaved)
  matrix      steady workloads from bench/fio/*.fio (all peers, interleaved)
  rewrite     identical rewrite with nbdcopy (NBD peers)
  scaling     snapvol steady random writes with 1/10/100/1000 snapshots
  snapcreate  snapshot create latency, 1 TiB volume with 1000 snapshots vs 1 GiB with 1
  restore     snapvol restore after changing 10%, vs a plain sequential copy
  memory      snapvol peak RSS with N preserved chunks (4 KiB chunks)
"""

import argparse
import datetime
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
FIO_DIR = os.path.join(BENCH_DIR, "fio")

GIB = 1 << 30
MIB = 1 << 20
CHUNK = 64 << 10  # snapvol's default chunk size and qcow2's default cluster size

PHASES = ["asfilled", "bigger", "createload", "tls",
          "firstwrite", "matrix", "rewrite", "scaling", "snapcreate", "restore", "memory"]

# The steady workloads: fio job file (bench/fio/NAME.fio) and what it measures.
MATRIX_WORKLOADS = [
    "randwrite-4k-qd1",
    "randwrite-4k-qd16",
    "randwrite-4k-qd1-flush",
    "randread-4k-qd16",
    "seqwrite-1m-qd8",
    "seqread-1m-qd8",
]

T0 = time.monotonic()


def log(msg):
    el = time.monotonic() - T0
    print(f"[{int(el) // 60:3d}:{int(el) % 60:02d}] {msg}", file=sys.stderr, flush=True)


def run(cmd, check=True, capture=False, env=None, timeout=None):
    """Runs a command; returns CompletedProcess. Output is captured when asked."""
    r = subprocess.run(
        cmd,
        check=False,
        env=env,
        timeout=timeout,
        stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if check and r.returncode != 0:
        raise RuntimeError(f"command failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr}")
    return r


def fmt_size(n):
    for unit, m in (("T", 1 << 40), ("G", GIB), ("M", MIB), ("K", 1 << 10)):
        if n % m == 0:
            return f"{n // m}{unit}"
    return str(n)


def parse_size(text):
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": MIB, "G": GIB, "T": 1 << 40}
    if text and text[-1] in mult:
        return int(text[:-1]) * mult[text[-1]]
    return int(text)


# ----------------------------------------------------------------------------- /proc


def proc_cpu_s(pid):
    """utime+stime of a process (all its threads, live and exited), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime is field 14, stime field 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_io(pid):
    out = {}
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            k, v = line.split(":")
            out[k.strip()] = int(v)
    return out


def proc_status_kib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def loadavg():
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


class LoadSampler(threading.Thread):
    """Samples the 1-minute load average and the machine's busy CPU share every few
    seconds, so the report can say how loaded the machine was during each phase."""

    def __init__(self, period=5.0):
        super().__init__(daemon=True)
        self.period = period
        self.samples = []  # (elapsed_s, phase, load1, busy_fraction)
        self.phase = "setup"
        self.stop_event = threading.Event()

    @staticmethod
    def _cpu():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + v[4]
        return sum(v), idle

    def run(self):
        prev = self._cpu()
        while not self.stop_event.wait(self.period):
            cur = self._cpu()
            dt, di = cur[0] - prev[0], cur[1] - prev[1]
            busy = 1.0 - di / dt if dt > 0 else 0.0
            prev = cur
            self.samples.append(
                (round(time.monotonic() - T0, 1), self.phase, loadavg()[0], round(busy, 3))
            )

    def summary(self):
        out = {}
        for phase in dict.fromkeys(s[1] for s in self.samples):
            loads = [s[2] for s in self.samples if s[1] == phase]
            busy = [s[3] for s in self.samples if s[1] == phase]
            out[phase] = {
                "samples": len(loads),
                "load1_min": min(loads),
                "load1_median": statistics.median(loads),
                "load1_max": max(loads),
                "cpu_busy_median": statistics.median(busy),
            }
        return out


def top_processes(n=6):
    r = run(["ps", "-eo", "pcpu,comm", "--sort=-pcpu", "--no-headers"], capture=True, check=False)
    return [" ".join(line.split()) for line in r.stdout.splitlines()[:n]]


# ----------------------------------------------------------------------------- servers


SERVERS = {}  # pid -> Server, for telling a dead server from a busy one


class ServerDied(RuntimeError):
    pass


class Server:
    """A server process we started (never anything else): its pid for /proc sampling,
    and a clean stop (SIGTERM, then SIGKILL)."""

    def __init__(self, name, cmd, log_path):
        self.name = name
        self.cmd = cmd
        self.log_path = log_path
        self.proc = None

    def start(self, ready_uri=None, ready_path=None, timeout=30):
        if ready_path and os.path.exists(ready_path):
            os.unlink(ready_path)  # a stale socket of ours
        self.logf = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            self.cmd, stdin=subprocess.DEVNULL, stdout=self.logf, stderr=self.logf
        )
        SERVERS[self.proc.pid] = self
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self.logf.close()
                with open(self.log_path) as f:
                    tail = f.read()[-2000:]
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} at start: {tail}")
            if ready_path is None or os.path.exists(ready_path):
                if ready_uri is None:
                    break
                r = run(["nbdinfo", "--size", ready_uri], check=False, capture=True, timeout=10)
                if r.returncode == 0:
                    break
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not become ready; see {self.log_path}")
            time.sleep(0.05)

    @property
    def pid(self):
        return self.proc.pid

    def death(self):
        """None while running; else how it ended and the end of its log."""
        if self.proc is None or self.proc.poll() is None:
            return None
        self.logf.flush()
        with open(self.log_path) as f:
            tail = f.read()[-1500:]
        return f"{self.name} (pid {self.proc.pid}) exited with status {self.proc.returncode}; log: {tail.strip()}"

    def stop(self, timeout=120):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name}: no exit {timeout}s after SIGTERM, killing pid {self.proc.pid}")
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self.logf.close()


def ctl(data_dir, argv):
    """One request on snapvol's control socket (what the CLI does, without starting a
    process). Returns the reply dict."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(os.path.join(data_dir, "control.sock"))
    s.sendall((json.dumps({"argv": argv, "cwd": os.getcwd()}) + "\n").encode())
    s.shutdown(socket.SHUT_WR)
    buf = b""
    while True:
        b = s.recv(65536)
        if not b:
            break
        buf += b
    s.close()
    reply = json.loads(buf)
    if reply["exit"] != 0:
        raise RuntimeError(f"snapvol {' '.join(argv)}: {reply['stderr'].strip()}")
    return reply


class Snapvol:
    """A snapvol data directory and (once started) its daemon."""

    def __init__(self, h, name):
        self.h = h
        self.dir = os.path.join(h.work, name)
        self.sock = os.path.join(h.work, name + ".sock")
        self.server = None

    def cli(self, *args, capture=False):
        return run([self.h.snapvol, "--data-dir", self.dir, *args], capture=capture)

    def ctl(self, *argv):
        return ctl(self.dir, list(argv))

    def uri(self, export):
        return f"nbd+unix:///{export}?socket={self.sock}"

    def start(self, ready_export):
        self.server = Server(
            "snapvol",
            [self.h.snapvol, "--data-dir", self.dir, "serve", "--socket", self.sock],
            self.dir + ".log",
        )
        self.server.start(ready_uri=self.uri(ready_export), ready_path=self.sock)

    def stop(self):
        if self.server:
            t = time.monotonic()
            self.server.stop()
            self.server = None
            if time.monotonic() - t > 2:
                log(f"snapvol daemon of {os.path.basename(self.dir)} took {time.monotonic() - t:.1f}s to stop")

    def info(self, volume):
        return json.loads(self.ctl("volume", "info", volume, "--json")["stdout"])

    def remove(self):
        self.stop()
        t = time.monotonic()
        shutil.rmtree(self.dir, ignore_errors=True)
        if time.monotonic() - t > 2:
            log(f"removing {self.dir} took {time.monotonic() - t:.1f}s")


# ----------------------------------------------------------------------------- peers


class Peer:
    """One system under test in the main comparison. kind 'nbd' (a server on a unix
    socket) or 'file' (fio straight on the file)."""

    id = ""
    label = ""
    kind = "nbd"
    cow = False  # takes snapshots (snapvol, qcow2)

    def __init__(self, h):
        self.h = h
        self.sock = os.path.join(h.work, self.id + ".sock")
        self.server = None
        self.command = ""

    def uri(self):
        return f"nbd+unix:///?socket={self.sock}"

    def fio_env(self):
        return {"BENCH_IOENGINE": "nbd", "BENCH_TARGET": f"uri={self.uri()}"}

    def iolog_name(self):
        return "nbd"

    @property
    def pid(self):
        return self.server.pid if self.server else None

    def snapshot(self, name):
        raise NotImplementedError

    def backing_files(self):
        return [self.path]

    def stop(self):
        if self.server:
            self.server.stop()
            self.server = None

    def start_server(self, cmd):
        self.command = " ".join(cmd)
        self.server = Server(self.id, cmd, os.path.join(self.h.work, self.id + ".log"))
        self.server.start(ready_uri=self.uri(), ready_path=self.sock)

    def remove(self):
        self.stop()


class SnapvolPeer(Peer):
    id = "snapvol"
    label = "snapvol (live snapshots)"
    cow = True

    def setup(self):
        self.sv = Snapvol(self.h, "snapvol-main")
        self.sock = self.sv.sock
        sv, h = self.sv, self.h
        sv.cli("volume", "create", "v", "--size", fmt_size(h.size))
        sv.cli("import", "v", h.seeds[0])
        sv.cli("snapshot", "create", "v@base")
        self.start()
        self.setup_commands = [
            f"snapvol --data-dir D volume create v --size {fmt_size(h.size)}",
            "snapvol --data-dir D import v SEED",
            "snapvol --data-dir D snapshot create v@base",
        ]

    def start(self):
        self.sv.start("v")
        self.server = self.sv.server
        self.command = f"snapvol --data-dir D serve --socket {self.sock}"

    def uri(self):
        return self.sv.uri("v")

    def backing_files(self):
        return [os.path.join(self.sv.dir, "volumes", "v", "origin.raw")]

    def snapshot(self, name):
        # Through the daemon, as a user would.
        self.sv.cli("snapshot", "create", f"v@{name}")

    def counters(self):
        return self.sv.info("v")["counters"]

    def remove(self):
        self.sv.remove()
        self.server = None


class QemuPeer(Peer):
    def __init__(self, h, id, label, fmt, cache_args):
        self.id = id
        self.label = label
        super().__init__(h)
        self.fmt = fmt
        self.cache_args = cache_args
        self.cow = fmt == "qcow2"
        self.path = os.path.join(h.work, id + "." + fmt)

    def setup(self):
        h = self.h
        if self.fmt == "raw":
            shutil.copyfile(h.seeds[0], self.path)
            self.setup_commands = ["cp SEED F.raw"]
        else:
            run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", h.seeds[0], self.path])
            run(["qemu-img", "snapshot", "-c", "base", self.path])
            self.setup_commands = [
                "qemu-img convert -f raw -O qcow2 SEED F.qcow2",
                "qemu-img snapshot -c base F.qcow2",
            ]
        self.start()

    def start(self):
        cmd = ["qemu-nbd", "-f", self.fmt, "-t", "-e", "0", *self.cache_args, "-k", self.sock, self.path]
        self.start_server(cmd)

    def snapshot(self, name):
        # qemu-nbd cannot take an internal snapshot while it serves the image: stop, take
        # it offline, serve again (not timed).
        self.stop()
        run(["qemu-img", "snapshot", "-c", name, self.path])
        self.start()

    def remove(self):
        self.stop()
        if os.path.exists(self.path):
            os.unlink(self.path)


class NbdkitPeer(Peer):
    id = "nbdkit-file"
    label = "nbdkit file plugin"

    def setup(self):
        self.path = os.path.join(self.h.work, "nbdkit.raw")
        shutil.copyfile(self.h.seeds[0], self.path)
        self.setup_commands = ["cp SEED F.raw"]
        self.start()

    def start(self):
        self.start_server(["nbdkit", "-f", "-U", self.sock, "file", f"file={self.path}"])

    def remove(self):
        self.stop()
        if os.path.exists(self.path):
            os.unlink(self.path)


class FilePeer(Peer):
    id = "file"
    label = "fio on a file (libaio, buffered)"
    kind = "file"

    def setup(self):
        self.path = os.path.join(self.h.work, "file.raw")
        shutil.copyfile(self.h.seeds[0], self.path)
        self.setup_commands = ["cp SEED F.raw"]
        self.command = f"fio --ioengine=libaio --direct=0 --filename={self.path} (same bs/iodepth)"

    def fio_env(self):
        return {"BENCH_IOENGINE": "libaio", "BENCH_TARGET": f"filename={self.path}"}

    def iolog_name(self):
        return self.path

    def remove(self):
        if os.path.exists(self.path):
            os.unlink(self.path)


# ----------------------------------------------------------------------------- harness


class Harness:
    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.snapvol = os.path.join(args.workdir, "bin", "snapvol")
        self.work = args.workdir
        self.size = parse_size(args.size)
        self.reps = args.reps
        self.runtime = args.runtime
        self.results = []
        self.notes = []
        self.sampler = LoadSampler()
        self.out_path = args.out
        self.meta = {}
        self.peers = []
        self.peer_info = {}

    # ---- bookkeeping

    def record(self, **kw):
        kw.setdefault("load1", loadavg()[0])
        self.results.append(kw)

    def phase(self, name):
        self.sampler.phase = name
        log(f"=== phase {name} (load {loadavg()[0]:.2f})")

    def save(self, complete):
        data = {
            "schema": 1,
            "complete": complete,
            "meta": {**self.meta, "load": self.sampler.summary(), "notes": self.notes},
            "peers": self.peer_info,
            "results": self.results,
        }
        if complete:
            data["meta"]["finished"] = now_iso()
            data["meta"]["duration_s"] = round(time.monotonic() - T0, 1)
            data["meta"]["top_processes_end"] = top_processes()
        os.makedirs(os.path.dirname(os.path.abspath(self.out_path)), exist_ok=True)
        tmp = self.out_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, self.out_path)

    # ---- machine description

    def describe(self):
        def sh(cmd):
            r = run(cmd, capture=True, check=False)
            return r.stdout.strip()

        mem_kib = proc_status_kib_meminfo("MemTotal")
        dev = sh(["findmnt", "-n", "-o", "SOURCE", "--target", self.work])
        fstype = sh(["findmnt", "-n", "-o", "FSTYPE", "--target", self.work])
        mopts = sh(["findmnt", "-n", "-o", "OPTIONS", "--target", self.work])
        base = os.path.basename(dev)
        rot = read_first(f"/sys/block/{base}/queue/rotational")
        model = read_first(f"/sys/block/{base}/device/model") or ""
        cpu_model = ""
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
        git = sh(["git", "-C", REPO_DIR, "rev-parse", "--short", "HEAD"])
        dirty = sh(["git", "-C", REPO_DIR, "status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock"])
        with open(self.snapvol, "rb") as f:
            sha = hashlib.sha256(f.read()).hexdigest()[:16]
        damon = []
        kd = "/sys/kernel/mm/damon/admin/kdamonds"
        if os.path.isdir(kd):
            for k in sorted(os.listdir(kd)):
                if read_first(f"{kd}/{k}/state") != "on":
                    continue
                sd = f"{kd}/{k}/contexts/0/schemes"
                for sc in sorted(os.listdir(sd)) if os.path.isdir(sd) else []:
                    action = read_first(f"{sd}/{sc}/action")
                    age = read_first(f"{sd}/{sc}/access_pattern/age/min")
                    aggr = read_first(f"{kd}/{k}/contexts/0/monitoring_attrs/intervals/aggr_us")
                    if action and age and aggr:
                        damon.append(f"{action} of memory idle for {int(age) * int(aggr) / 1e6:.0f} s or more")
        if damon:
            self.notes.append(
                "the kernel's DAMON is active on this machine (" + "; ".join(damon) + "): page cache "
                "that no one touches for that long is paged out. The tiers measure each peer right after "
                "its own fill (within a minute or two); the settled tier puts every peer's backing files "
                "into the same page-cache state before each run (written back, fully cached in 4 KiB "
                "folios; see settle() in bench/harness.py)")
        self.meta.update(
            {
                "started": now_iso(),
                "mode": "quick" if self.quick else "full",
                "argv": sys.argv[1:],
                "reps": self.reps,
                "runtime_s": self.runtime,
                "perf": bool(self.args.perf),
                "export_bytes": self.size,
                "machine": {
                    "cores": os.cpu_count(),
                    "cpu": cpu_model,
                    "ram_gib": round(mem_kib / (1 << 20), 1) if mem_kib else None,
                    "kernel": os.uname().release,
                    "disk": f"{dev} ({fstype} {mopts}; queue/rotational={rot}"
                    + (f", {model}" if model else "")
                    + ")",
                    "workdir": self.work,
                    "load_at_start": loadavg(),
                },
                "top_processes_start": top_processes(),
                "versions": {
                    "snapvol": f"{sh([self.snapvol, '--version'])} ("
                    + (self.args.snapvol_source or f"git {git}{', src modified' if dirty else ''}")
                    + f"; binary sha256 {sha})",
                    "fio": sh(["fio", "--version"]),
                    "qemu-nbd": sh(["qemu-nbd", "--version"]).splitlines()[0],
                    "nbdkit": sh(["nbdkit", "--version"]),
                    "nbdcopy": sh(["nbdcopy", "--version"]).splitlines()[0],
                },
            }
        )

    # ---- fio

    def fio(self, job, peer_env, pid=None, extra_env=None, tag="", perf=None):
        """Runs bench/fio/JOB.fio and returns the metrics, with the server's CPU time and
        write_bytes over the run when pid is given. With perf (a path prefix), the server
        is profiled during the run (perf record -g) and a text summary is written."""
        prof = None
        if perf and pid and shutil.which("perf"):
            prof = subprocess.Popen(
                ["perf", "record", "-F", "499", "-g", "-p", str(pid), "-o", perf + ".data"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            time.sleep(0.3)
        try:
            return self._fio(job, peer_env, pid, extra_env, tag)
        finally:
            if prof:
                prof.send_signal(signal.SIGINT)
                prof.wait()
                with open(perf + ".txt", "w") as f:
                    for args in (["--children", "--sort=sym", "-g", "none"],
                                 ["--no-children", "--sort=dso,sym", "-g", "none"]):
                        r = run(["perf", "report", "-i", perf + ".data", "--stdio", *args],
                                capture=True, check=False)
                        lines = [ln for ln in r.stdout.splitlines() if "%" in ln and not ln.startswith("#")]
                        f.write("\n".join(lines[:80]) + "\n\n")

    def _fio(self, job, peer_env, pid, extra_env, tag):
        out = os.path.join(self.work, "fio-out.json")
        env = dict(os.environ)
        env.update(
            {
                "BENCH_SIZE": str(self.size),
                "BENCH_RUNTIME": str(self.runtime),
            }
        )
        env.update(peer_env)
        if extra_env:
            env.update(extra_env)
        for attempt in (1, 2):
            before = (proc_cpu_s(pid), proc_io(pid)) if pid else None
            t = time.monotonic()
            r = subprocess.run(
                ["fio", os.path.join(FIO_DIR, job + ".fio"), "--output-format=json", f"--output={out}"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            wall = time.monotonic() - t
            if r.returncode == 0:
                break
            srv = SERVERS.get(pid)
            death = srv.death() if srv else None
            if death:
                raise ServerDied(death)
            if attempt == 2 or "nbd_connect" not in r.stderr:
                raise RuntimeError(f"fio {job} {tag} failed: {r.stderr}")
            # A refused connection with the server still running: seen once under heavy
            # load; retry once and say so.
            self.notes.append(f"fio {job} on {tag} could not connect once ({r.stderr.strip()}); retried")
            log(f"fio {job} {tag}: connect failed, retrying: {r.stderr.strip()}")
            time.sleep(1)
        after = (proc_cpu_s(pid), proc_io(pid)) if pid else None
        with open(out) as f:
            data = json.load(f)
        jobs = data["jobs"]
        res = {"wall_s": round(wall, 3)}
        for j in jobs:
            if j.get("error"):
                raise RuntimeError(f"fio {job} {tag}: job error {j['error']}")
        # One job (the workload) except restore-copy, which the caller handles.
        j = jobs[0]
        d = "write" if j["write"]["io_bytes"] > 0 else "read"
        s = j[d]
        lat = s.get("clat_ns", {}).get("percentile", {})
        res.update(
            {
                "dir": d,
                "iops": round(s["iops"], 1),
                "bw_bytes": s["bw_bytes"],
                "io_bytes": s["io_bytes"],
                "runtime_s": j["job_runtime"] / 1000.0,
                "lat_p50_us": round(lat.get("50.000000", 0) / 1000.0, 1),
                "lat_p99_us": round(lat.get("99.000000", 0) / 1000.0, 1),
                "client_cpu_s": round(
                    (j["usr_cpu"] + j["sys_cpu"]) / 100.0 * j["job_runtime"] / 1000.0, 3
                ),
            }
        )
        if "sync" in j and j["sync"].get("total_ios"):
            res["flushes"] = j["sync"]["total_ios"]
            sp = j["sync"].get("lat_ns", {}).get("percentile", {})
            res["flush_lat_p50_us"] = round(sp.get("50.000000", 0) / 1000.0, 1)
            res["flush_lat_p99_us"] = round(sp.get("99.000000", 0) / 1000.0, 1)
        if before:
            res["server_cpu_s"] = round(after[0] - before[0], 3)
            res["server_write_bytes"] = after[1]["write_bytes"] - before[1]["write_bytes"]
            res["server_read_bytes"] = after[1]["read_bytes"] - before[1]["read_bytes"]
        return res

    def quiesce(self):
        """Waits, after the setup has written several GiB of images, until the machine is
        quiet again: dirty pages written back, then the 1-minute load below 1.5 (at most
        2 minutes in all; 10 s with --quick), so that the writeback of the setup does not
        run into the first phase's first repetition."""
        t0 = time.monotonic()
        limit = 10 if self.quick else 120
        os.sync()
        while time.monotonic() - t0 < limit:
            with open("/proc/meminfo") as f:
                mem = {l.split(":")[0]: int(l.split()[1]) for l in f}
            if mem.get("Dirty", 0) + mem.get("Writeback", 0) < 32 << 10 and loadavg()[0] < 1.5:
                break
            time.sleep(2)
        log(f"quiesced in {time.monotonic() - t0:.0f} s (load {loadavg()[0]:.2f})")

    def settle(self, peer=None, paths=(), drop=False):
        """Puts the backing files of a peer (or the given files) into the same page-cache
        state before a run, whatever happened to them before: written back (fdatasync), then
        every 4 KiB block read once with readahead off, so the whole file is cached in 4 KiB
        folios. With drop, the cached pages are dropped first (POSIX_FADV_DONTNEED).

        Why: on this kernel (ext4 with large folios) a 4 KiB buffered write into a large
        folio costs several times one into a 4 KiB folio, and a file's folio sizes depend
        on how it was written and read (1 MiB writes and readahead make large folios). This
        VM also pages out page cache untouched for about a minute (DAMON), and what comes
        back depends on who reads it. Without this the peers would differ by their files'
        history: nbdkit measured 15k or 100k random-write IOPS on the same file."""
        files = list(paths) + (peer.backing_files() if peer else [])
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                if drop:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                blocks = (os.fstat(fd).st_size + 4095) // 4096
                nthreads = 32 if drop else 4

                def work(i, fd=fd, blocks=blocks, nthreads=nthreads):
                    for b in range(i, blocks, nthreads):
                        os.pread(fd, 4096, b * 4096)

                ts = [threading.Thread(target=work, args=(i,)) for i in range(nthreads)]
                for t in ts:
                    t.start()
                for t in ts:
                    t.join()
            finally:
                os.close(fd)

    def perf_path(self, workload, peer, rep):
        """Where --perf puts the profile of this run: the first repetition of the snapvol
        and nbdkit runs only."""
        if not self.args.perf or rep != 0 or peer.id not in ("snapvol", "nbdkit-file"):
            return None
        os.makedirs(self.args.perf, exist_ok=True)
        return os.path.join(self.args.perf, f"{peer.id}-{workload}")

    def peer_fio(self, p, *args, **kw):
        """self.fio for a peer's server; if the server has died (seen twice under heavy
        load: a peer found exited between two runs), it is noted, restarted and the run
        repeated once."""
        try:
            return self.fio(*args, **kw)
        except ServerDied as e:
            self.notes.append(f"{p.id} had exited before a run and was restarted: {e}")
            log(f"{p.id} died: {e}; restarting")
            p.stop()
            p.start()
            self.settle(p)
            args = list(args)
            args[2] = p.pid  # (job, peer_env, pid, ...)
            return self.fio(*args, **kw)

    @staticmethod
    def rotated(items, rep):
        """The peers in the order of this repetition: still interleaved (A B C A B C), but
        each repetition starts one further along, so no peer always runs first or right
        after the same neighbour."""
        k = rep % len(items)
        return items[k:] + items[:k]

    def make_iolog(self, path, name, offsets):
        with open(path, "w") as f:
            f.write(f"fio version 2 iolog\n{name} add\n{name} open\n")
            for off in offsets:
                f.write(f"{name} write {off} 4096\n")
            f.write(f"{name} close\n")

    # ---- setup

    def prepare(self):
        os.makedirs(os.path.join(self.work, "bin"), exist_ok=True)
        shutil.copy2(self.args.snapvol, self.snapvol)
        self.describe()
        self.sampler.start()
        self.seeds = [os.path.join(self.work, "seed-a.img"), os.path.join(self.work, "seed-b.img")]
        for p in self.seeds:
            if os.path.exists(p) and os.path.getsize(p) == self.size:
                continue
            log(f"writing {fmt_size(self.size)} of random data to {p}")
            with open(p, "wb") as f:
                left = self.size
                while left:
                    n = min(left, 16 * MIB)
                    f.write(os.urandom(n))
                    left -= n

    def setup_peers(self):
        h = self
        raw_direct_args = ["--cache=none", "--aio=io_uring"]
        peers = [
            SnapvolPeer(h),
            QemuPeer(h, "qemu-raw-wb", "qemu-nbd raw, cache=writeback", "raw", ["--cache=writeback"]),
            QemuPeer(h, "qemu-raw-direct", "qemu-nbd raw, cache=none aio=io_uring", "raw", raw_direct_args),
            QemuPeer(h, "qemu-qcow2-snap", "qemu-nbd qcow2 + internal snapshot, cache=writeback", "qcow2", ["--cache=writeback"]),
            NbdkitPeer(h),
            FilePeer(h),
        ]
        for p in peers:
            log(f"setting up {p.id}")
            self.peers.append(p)  # stopped by main's finally even if its setup fails
            try:
                p.setup()
            except RuntimeError as e:
                if p.id == "qemu-raw-direct":
                    self.notes.append(f"qemu-nbd --aio=io_uring failed to start ({e}); using --aio=native")
                    p.label = "qemu-nbd raw, cache=none aio=native (io_uring unavailable)"
                    p.cache_args = ["--cache=none", "--aio=native"]
                    p.stop()
                    p.start()
                else:
                    raise
            self.peer_info[p.id] = {
                "label": p.label,
                "kind": p.kind,
                "command": p.command,
                "setup": getattr(p, "setup_commands", []),
            }
        log("settling the page cache of every peer's files")
        for p in peers:
            self.settle(p, drop=True)
        self.save(False)

    def teardown_peers(self):
        for p in self.peers:
            if p.pid:
                hwm = proc_status_kib(p.pid, "VmHWM")
                self.peer_info[p.id]["vmhwm_kib"] = hwm
            p.remove()
        self.peers = []

    # ---- phases

    def phase_firstwrite(self):
        """Fresh snapshot, then one 4 KiB write per chunk of the export in random order
        at QD16. Also leaves snapvol and qcow2 with every chunk preserved/copied for their
        newest snapshot: the steady state the matrix measures."""
        self.phase("firstwrite")
        nchunks = self.size // CHUNK
        for rep in range(self.reps):
            rng = random.Random(1000 + rep)
            order = list(range(nchunks))
            rng.shuffle(order)
            offsets = [c * CHUNK + rng.randrange(CHUNK // 4096) * 4096 for c in order]
            for p in self.rotated(self.peers, rep):
                iolog = os.path.join(self.work, f"fw-{p.id}.iolog")
                self.make_iolog(iolog, p.iolog_name(), offsets)
                snap = None
                if p.cow:
                    snap = f"fw{rep}"
                    p.snapshot(snap)
                self.settle(p)
                c0 = p.counters() if p.id == "snapvol" else None
                r = self.peer_fio(p, "firstwrite-4k-qd16", p.fio_env(), p.pid, {"BENCH_IOLOG": iolog}, p.id,
                             perf=self.perf_path("firstwrite-4k-qd16", p, rep))
                if c0:
                    c1 = p.counters()
                    r["snapvol_counters"] = {k: c1[k] - c0[k] for k in c1}
                self.record(phase="firstwrite", workload="firstwrite-4k-qd16", peer=p.id, rep=rep,
                            snapshot=snap, writes=nchunks, **r)
                log(f"firstwrite rep {rep} {p.id}: {r['iops']:.0f} IOPS")
                os.unlink(iolog)
            self.save(False)

    def phase_matrix(self):
        self.phase("matrix")
        # The first-write phase wrote new clusters/slots in 64 KiB pieces: start over.
        for p in self.peers:
            self.settle(p, drop=True)
        for rep in range(self.reps):
            for wl in MATRIX_WORKLOADS:
                for p in self.rotated(self.peers, rep):
                    self.settle(p)
                    c0 = p.counters() if p.id == "snapvol" else None
                    r = self.peer_fio(p, wl, p.fio_env(), p.pid, tag=p.id, perf=self.perf_path(wl, p, rep))
                    if c0:
                        c1 = p.counters()
                        r["snapvol_counters"] = {k: c1[k] - c0[k] for k in c1}
                    self.record(phase="matrix", workload=wl, peer=p.id, rep=rep, **r)
                    log(f"matrix rep {rep} {wl} {p.id}: {r['iops']:.0f} IOPS, {r['bw_bytes'] / MIB:.1f} MiB/s")
            self.save(False)

    def phase_rewrite(self):
        """The same image copied in twice with nbdcopy (each copy flushed, and the page
        cache written back with sync before each); the second copy is timed, with the
        bytes the server process wrote during it."""
        self.phase("rewrite")
        nbd_peers = [p for p in self.peers if p.kind == "nbd"]
        for rep in range(self.reps):
            img = self.seeds[(rep + 1) % 2]  # differs from what the export holds now
            for p in self.rotated(nbd_peers, rep):
                times = []
                for copy in (1, 2):
                    run(["sync"])
                    self.settle(p)
                    c0 = p.counters() if p.id == "snapvol" else None
                    cpu0, io0 = proc_cpu_s(p.pid), proc_io(p.pid)
                    t = time.monotonic()
                    run(["nbdcopy", "--flush", img, p.uri()])
                    dt = time.monotonic() - t
                    cpu1, io1 = proc_cpu_s(p.pid), proc_io(p.pid)
                    times.append(dt)
                    if copy == 2:
                        r = {
                            "copy1_s": round(times[0], 3),
                            "copy2_s": round(dt, 3),
                            "bw_bytes": round(self.size / dt),
                            "server_write_bytes": io1["write_bytes"] - io0["write_bytes"],
                            "server_read_bytes": io1["read_bytes"] - io0["read_bytes"],
                            "server_cpu_s": round(cpu1 - cpu0, 3),
                        }
                        if c0:
                            c1 = p.counters()
                            r["snapvol_counters"] = {k: c1[k] - c0[k] for k in c1}
                        self.record(phase="rewrite", workload="identical-rewrite", peer=p.id, rep=rep, **r)
                        log(f"rewrite rep {rep} {p.id}: copy1 {times[0]:.2f}s copy2 {dt:.2f}s, "
                            f"server wrote {r['server_write_bytes'] / MIB:.1f} MiB")
            self.save(False)

    def phase_scaling(self):
        """snapvol only: volumes with 1, 10, 100 and 1000 snapshots, each snapshot taken
        after a few random 4 KiB writes; then every chunk rewritten once (so the newest
        snapshot has every chunk preserved: steady state), then steady random 4 KiB writes
        at QD16, interleaved across the volumes."""
        import nbd

        self.phase("scaling")
        sv = Snapvol(self, "snapvol-scale")
        counts = self.args.scaling_counts
        writes_between = self.args.scaling_writes
        try:
            for n in counts:
                sv.cli("volume", "create", f"s{n}", "--size", fmt_size(self.size))
                sv.cli("import", f"s{n}", self.seeds[0])
            sv.start(f"s{counts[0]}")
            rng = random.Random(7)
            for n in counts:
                t = time.monotonic()
                h = nbd.NBD()
                h.connect_uri(sv.uri(f"s{n}"))
                for i in range(n):
                    for _ in range(writes_between):
                        h.pwrite(os.urandom(4096), rng.randrange(self.size // 4096) * 4096)
                    sv.ctl("snapshot", "create", f"s{n}@n{i}")
                h.flush()
                h.shutdown()
                log(f"scaling: s{n} has {n} snapshots ({time.monotonic() - t:.1f}s); preconditioning")
                run(["nbdcopy", "--flush", self.seeds[1], sv.uri(f"s{n}")])
            origins = {n: os.path.join(sv.dir, "volumes", f"s{n}", "origin.raw") for n in counts}
            self.settle(paths=origins.values(), drop=True)
            self.record(phase="scaling-setup", workload="setup", peer="snapvol", rep=0,
                        counts=counts, writes_between=writes_between,
                        preserved={f"s{n}": sv.info(f"s{n}")["preserved_chunks"] for n in counts})
            for rep in range(self.args.scaling_reps):
                for n in self.rotated(counts, rep):
                    self.settle(paths=[origins[n]])
                    c0 = sv.info(f"s{n}")["counters"]
                    env = {"BENCH_IOENGINE": "nbd", "BENCH_TARGET": f"uri={sv.uri(f's{n}')}"}
                    r = self.fio("randwrite-4k-qd16", env, sv.server.pid, tag=f"s{n}")
                    c1 = sv.info(f"s{n}")["counters"]
                    r["snapvol_counters"] = {k: c1[k] - c0[k] for k in c1}
                    self.record(phase="scaling", workload="randwrite-4k-qd16", peer="snapvol",
                                snapshots=n, rep=rep, **r)
                    log(f"scaling rep {rep} {n} snapshots: {r['iops']:.0f} IOPS")
                self.save(False)
        finally:
            sv.remove()

    def phase_snapcreate(self):
        """Snapshot create latency through the daemon: the control socket (the operation as
        a management tool calls it: request sent to durable reply; the targets are judged on
        it) and the CLI (a process per create, as a user types it). A 1 TiB sparse volume
        holding 1000 snapshots (a few writes before each) against a 1 GiB volume holding 1,
        alternating; each timed snapshot is deleted again (not timed). 1000 samples each, so
        that a p99 is the 10th largest, not the 3rd."""
        import nbd

        self.phase("snapcreate")
        sv = Snapvol(self, "snapvol-snap")
        n_big = self.args.snapcreate_snapshots
        samples = self.args.snapcreate_samples
        try:
            sv.cli("volume", "create", "big", "--size", "1T")
            sv.cli("volume", "create", "small", "--size", "1G")
            sv.start("small")
            rng = random.Random(11)
            h = nbd.NBD()
            h.connect_uri(sv.uri("big"))
            for i in range(n_big):
                for _ in range(2):
                    h.pwrite(os.urandom(4096), rng.randrange((1 << 40) // 4096) * 4096)
                sv.ctl("snapshot", "create", f"big@n{i}")
            h.flush()
            h.shutdown()
            sv.ctl("snapshot", "create", "small@only")
            vols = {"big": f"1 TiB, {n_big:,} snapshots", "small": "1 GiB, 1 snapshot"}
            # Process start of the CLI, to subtract.
            ver = []
            for _ in range(samples):
                t = time.perf_counter()
                run([self.snapvol, "--version"])
                ver.append(time.perf_counter() - t)
            self.record(phase="snapcreate", workload="version", peer="snapvol", rep=0,
                        samples_ms=[round(x * 1000, 3) for x in ver])
            for method in ("cli", "socket"):
                times = {v: [] for v in vols}
                for i in range(samples):
                    for v in vols:
                        name = f"{v}@{method}{i}"
                        t = time.perf_counter()
                        if method == "cli":
                            run([self.snapvol, "--data-dir", sv.dir, "snapshot", "create", name])
                        else:
                            sv.ctl("snapshot", "create", name)
                        times[v].append(time.perf_counter() - t)
                        sv.ctl("snapshot", "delete", name)
                for v in vols:
                    self.record(phase="snapcreate", workload=f"create-{method}", peer="snapvol",
                                volume=v, volume_desc=vols[v], rep=0,
                                samples_ms=[round(x * 1000, 3) for x in times[v]])
                    log(f"snapcreate {method} {v}: p50 {pct(times[v], 50) * 1000:.2f} ms, "
                        f"p99 {pct(times[v], 99) * 1000:.2f} ms")
            self.save(False)
        finally:
            sv.remove()

    def phase_restore(self):
        """Change 10% of the chunks of a 1 GiB volume (whole 64 KiB chunks, random ones)
        after a fresh snapshot, then time `snapvol restore` through the daemon. Baseline:
        fio copying the same number of bytes sequentially (read, then write + fsync)."""
        import nbd

        self.phase("restore")
        sv = Snapvol(self, "snapvol-restore")
        copy_src = os.path.join(self.work, "copy-src.raw")
        copy_dst = os.path.join(self.work, "copy-dst.raw")
        nchunks = self.size // CHUNK
        nchange = nchunks // 10
        nbytes = nchange * CHUNK
        try:
            sv.cli("volume", "create", "r", "--size", fmt_size(self.size))
            sv.cli("import", "r", self.seeds[0])
            sv.start("r")
            shutil.copyfile(self.seeds[0], copy_src)
            shutil.copyfile(self.seeds[1], copy_dst)
            for rep in range(self.args.restore_reps):
                rng = random.Random(300 + rep)
                sv.ctl("snapshot", "create", f"r@s{rep}")
                h = nbd.NBD()
                h.connect_uri(sv.uri("r"))
                for c in rng.sample(range(nchunks), nchange):
                    h.pwrite(os.urandom(CHUNK), c * CHUNK)
                h.flush()
                h.shutdown()
                vdir = os.path.join(sv.dir, "volumes", "r")
                self.settle(paths=[os.path.join(vdir, f) for f in ("origin.raw", "store-0.snap")], drop=True)
                cpu0 = proc_cpu_s(sv.server.pid)
                t = time.perf_counter()
                out = run([self.snapvol, "--data-dir", sv.dir, "restore", f"r@s{rep}"], capture=True)
                dt = time.perf_counter() - t
                cpu1 = proc_cpu_s(sv.server.pid)
                safety = out.stdout.strip().split("@", 1)[1]
                self.record(phase="restore", workload="restore-10pct", peer="snapvol", rep=rep,
                            bytes=nbytes, time_s=round(dt, 4), bw_bytes=round(nbytes / dt),
                            server_cpu_s=round(cpu1 - cpu0, 3))
                # Keep the reps independent: drop this rep's snapshots (not timed).
                sv.ctl("snapshot", "delete", f"r@{safety}")
                sv.ctl("snapshot", "delete", f"r@s{rep}")
                # The baseline, interleaved.
                self.settle(paths=[copy_src, copy_dst], drop=True)
                out = os.path.join(self.work, "copy-out.json")
                env = dict(os.environ, BENCH_COPY_BYTES=str(nbytes), BENCH_COPY_SRC=copy_src,
                           BENCH_COPY_DST=copy_dst)
                run(["fio", os.path.join(FIO_DIR, "restore-copy.fio"), "--output-format=json",
                     f"--output={out}"], env=env)
                with open(out) as f:
                    jobs = json.load(f)["jobs"]
                ct = sum(j["job_runtime"] for j in jobs) / 1000.0
                self.record(phase="restore", workload="restore-10pct", peer="file-copy", rep=rep,
                            bytes=nbytes, time_s=round(ct, 4), bw_bytes=round(nbytes / ct))
                log(f"restore rep {rep}: snapvol {nbytes / MIB / dt:.1f} MiB/s "
                    f"({dt:.2f}s), copy {nbytes / MIB / ct:.1f} MiB/s ({ct:.2f}s)")
            self.save(False)
        finally:
            sv.remove()
            for p in (copy_src, copy_dst):
                if os.path.exists(p):
                    os.unlink(p)

    def phase_memory(self):
        """A volume with 4 KiB chunks, a snapshot, then N distinct 4 KiB writes (one per
        chunk, random order, QD16): N preserved chunks. Peak RSS (VmHWM) of the daemon
        against its RSS before the writes; then the RSS of a restarted daemon holding the
        same volume open. Also CPU per GiB of these first writes."""
        self.phase("memory")
        n = self.args.memory_chunks
        vol_bytes = 1 << max(28, (n * 4096 - 1).bit_length())
        sv = Snapvol(self, "snapvol-mem")
        origin = os.path.join(self.work, "mem-origin.raw")
        try:
            # A fully written origin (zeros), adopted with --origin: the scattered writes
            # then overwrite allocated blocks instead of fragmenting a sparse file (whose
            # deletion takes minutes on this VM's disk with online discard).
            zeros = bytes(16 * MIB)
            with open(origin, "wb") as f:
                for _ in range(vol_bytes // len(zeros)):
                    f.write(zeros)
                os.fsync(f.fileno())
            sv.cli("volume", "create", "m", "--size", fmt_size(vol_bytes), "--chunk-size", "4K",
                   "--origin", origin)
            sv.cli("snapshot", "create", "m@s")
            self.settle(paths=[origin], drop=True)
            sv.start("m")
            # Make sure the volume is open (it is opened lazily) before the baseline.
            run(["nbdinfo", "--size", sv.uri("m")])
            sv.info("m")
            rss0 = proc_status_kib(sv.server.pid, "VmRSS")
            rng = random.Random(5)
            offsets = [c * 4096 for c in rng.sample(range(vol_bytes // 4096), n)]
            iolog = os.path.join(self.work, "mem.iolog")
            self.make_iolog(iolog, "nbd", offsets)
            env = {"BENCH_IOENGINE": "nbd", "BENCH_TARGET": f"uri={sv.uri('m')}",
                   "BENCH_SIZE": str(vol_bytes), "BENCH_IOLOG": iolog}
            r = self.fio("firstwrite-4k-qd16", env, sv.server.pid, tag="memory")
            os.unlink(iolog)
            hwm = proc_status_kib(sv.server.pid, "VmHWM")
            rss1 = proc_status_kib(sv.server.pid, "VmRSS")
            info = sv.info("m")
            sv.stop()
            sv.start("m")
            run(["nbdinfo", "--size", sv.uri("m")])
            sv.info("m")
            rss2 = proc_status_kib(sv.server.pid, "VmRSS")
            hwm2 = proc_status_kib(sv.server.pid, "VmHWM")
            self.record(phase="memory", workload="memory-4k-chunks", peer="snapvol", rep=0,
                        writes=n, volume_bytes=vol_bytes, preserved_chunks=info["preserved_chunks"],
                        rss_before_kib=rss0, vmhwm_kib=hwm, rss_after_kib=rss1,
                        rss_reopened_kib=rss2, vmhwm_reopened_kib=hwm2, **r)
            log(f"memory: {info['preserved_chunks']} preserved chunks, RSS {rss0} -> peak {hwm} KiB, "
                f"reopened {rss2} KiB (peak {hwm2}); {r['iops']:.0f} IOPS")
            self.save(False)
        finally:
            sv.remove()
            if os.path.exists(origin):
                os.unlink(origin)

    def main(self):
        phases = self.args.only or PHASES
        self.prepare()
        log(f"mode {'quick' if self.quick else 'full'}: export {fmt_size(self.size)}, reps {self.reps}, "
            f"runtime {self.runtime}s, phases {','.join(phases)}; workdir {self.work}")
        self.meta["phases"] = phases
        try:
            import tiers

            for tier in ("asfilled", "bigger"):
                if tier in phases:
                    tiers.phase_tier(self, tier)
            if "createload" in phases:
                tiers.phase_createload(self)
            if "tls" in phases:
                tiers.phase_tier(self, "tls")
            # The settled tier is an extra: fewer repetitions, so the full run stays under
            # an hour (--settled-reps).
            if self.reps != self.args.settled_reps and any(p in phases for p in PHASES[4:]):
                self.notes.append(f"the settled-tier phases ran {self.args.settled_reps} repetition(s), "
                                  f"the tiers {self.reps}")
            if "restore" in phases and self.args.restore_reps != self.args.settled_reps:
                self.notes.append(f"the restore ran {self.args.restore_reps} repetitions (a short "
                                  f"measurement, median of at least 5)")
            self.reps = self.args.settled_reps
            if any(p in phases for p in ("firstwrite", "matrix", "rewrite")):
                self.phase("setup")
                self.setup_peers()
                self.quiesce()
                if "firstwrite" in phases:
                    self.phase_firstwrite()
                elif "matrix" in phases:
                    self.notes.append("firstwrite phase skipped: the COW peers are not preconditioned")
                if "matrix" in phases:
                    self.phase_matrix()
                if "rewrite" in phases:
                    self.phase_rewrite()
                self.teardown_peers()
            if "scaling" in phases:
                self.phase_scaling()
            if "snapcreate" in phases:
                self.phase_snapcreate()
            if "restore" in phases:
                self.phase_restore()
            if "memory" in phases:
                self.phase_memory()
        finally:
            for p in self.peers:
                try:
                    p.remove()
                except Exception as e:  # keep stopping the others
                    log(f"stopping {p.id}: {e}")
            self.sampler.stop_event.set()
        self.save(True)
        log(f"done in {time.monotonic() - T0:.0f}s; results in {self.out_path}")
        subprocess.run([sys.executable, os.path.join(BENCH_DIR, "report"), self.out_path], check=False)


def pct(xs, p):
    """Nearest-rank percentile."""
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(-(-p * len(s) // 100)) - 1))
    return s[k]


def now_iso():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_first(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def proc_status_kib_meminfo(key):
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--snapvol", required=True, help="the snapvol binary to benchmark (copied into the workdir)")
    ap.add_argument("--snapvol-source", metavar="TEXT",
                    help="what the binary was built from, for the report (default: this checkout's git commit)")
    ap.add_argument("--quick", action="store_true", help="smoke check: small sizes, 1 repetition, short runs")
    ap.add_argument("--workdir", default="/tmp/snapvol-bench")
    ap.add_argument("--out", help="JSON output (default bench/results/latest.json, or quick.json with --quick)")
    ap.add_argument("--only", help="comma-separated phases: " + ",".join(PHASES))
    ap.add_argument("--reps", type=int)
    ap.add_argument("--runtime", type=int, help="seconds per time-based fio run")
    ap.add_argument("--size", help="export size (default 1G; 256M with --quick)")
    ap.add_argument("--bigger-size", help="export size of the larger-than-memory tier and createload "
                    "(default 4G; 512M with --quick); servers get a memory cgroup of 1/8 of it")
    ap.add_argument("--settled-reps", type=int, help="repetitions of the settled-tier phases "
                    "(firstwrite ... memory; default 1, or --reps when given; the restore at least 5 in a full run)")
    ap.add_argument("--keep", action="store_true", help="keep the workdir (seed images) afterwards")
    ap.add_argument("--perf", metavar="DIR", help="profile snapvol and nbdkit (perf record -g) during the first "
                    "repetition of the first-write and matrix runs; DIR gets PEER-WORKLOAD.data and a .txt summary. "
                    "Profiling costs CPU: the figures of a --perf run are not for the report")
    a = ap.parse_args()
    q = a.quick
    a.settled_reps = a.settled_reps or a.reps or 1
    a.reps = a.reps or (1 if q else 3)
    a.runtime = a.runtime or (2 if q else 8)
    a.size = a.size or ("256M" if q else "1G")
    a.bigger_size = parse_size(a.bigger_size or ("512M" if q else "4G"))
    a.bigger_runtime = 2 if q else 10
    a.createload_count = 5 if q else 20
    a.out = a.out or os.path.join(BENCH_DIR, "results", "quick.json" if q else "latest.json")
    a.only = [p.strip() for p in a.only.split(",")] if a.only else None
    for p in a.only or []:
        if p not in PHASES:
            ap.error(f"unknown phase {p!r}; phases: {', '.join(PHASES)}")
    a.scaling_counts = [1, 10, 100, 200] if q else [1, 10, 100, 1000]
    a.scaling_writes = 2 if q else 8
    a.scaling_reps = a.reps if q else max(a.reps, 5)
    # A restore of 10% of 1 GiB takes 0.1-0.4 s and one run of it spread 0.25-0.63x: at
    # least 5, so that its median says something (each costs about 10 s).
    a.restore_reps = a.settled_reps if q else max(a.settled_reps, 5)
    a.snapcreate_snapshots = 200 if q else 1000
    a.snapcreate_samples = 40 if q else 1000
    a.memory_chunks = 50_000 if q else 1_000_000
    a.workdir = os.path.abspath(a.workdir)
    a.perf = os.path.abspath(a.perf) if a.perf else None
    if os.path.isdir(a.workdir):
        # Left by a run with --keep or one that died: only the seed images are reused.
        for name in os.listdir(a.workdir):
            if not name.startswith("seed-"):
                p = os.path.join(a.workdir, name)
                shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
    os.makedirs(a.workdir, exist_ok=True)
    h = Harness(a)
    ok = False
    try:
        h.main()
        ok = True
    finally:
        if not a.keep:
            shutil.rmtree(a.workdir, ignore_errors=True)
        elif not ok:
            log(f"workdir kept: {a.workdir}")


if __name__ == "__main__":
    # bench/tiers.py imports this module as `harness`: the same module, not a second copy.
    sys.modules.setdefault("harness", sys.modules[__name__])
    main()
