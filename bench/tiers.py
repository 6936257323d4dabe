"""The benchmark tiers that measure the states users have (bench/harness.py runs them):

  asfilled   1 GiB exports, each peer filled through its own server by the same client
             (nbdcopy of one random image; snapvol also after `snapvol import`, its own
             row), then measured as they are: no settling, no cache dropping. The headline.
  bigger     "larger than memory": 4 GiB exports, every server in a memory cgroup of 1/8
             of the export (v1 or v2, whichever the machine has), filled by nbdcopy, then
             the page cache dropped before each measurement (as after a reboot). Disk bytes
             read and written per client operation come from /proc/PID/io.
  createload snapshot create latency on a 4 GiB volume while a client writes random 64 KiB
             blocks at QD16, beside the same creates while idle.
  tls        NBD over TLS on TCP (certificates made by openssl in the workdir): snapvol
             `--tls require` against nbdkit `--tls=require` on the same certificates, and
             snapvol over plaintext TCP for the cost of TLS; sequential 1 MiB reads and
             writes QD8, random 4 KiB writes QD16 on 1 GiB exports filled by nbdcopy. fio's
             nbd engine finds the client certificates in $HOME/.pki/libnbd (libnbd's default
             place; its URIs may not name local files).

Each repetition starts from a fresh export (filled again), so no repetition inherits the
page-cache state of the one before. Peers run one after the other in an order rotated per
repetition. Per peer and repetition, in order: fill, identical rewrite (a second nbdcopy of
the same image, timed), snapshot (COW peers), first writes in order (one 4 KiB write per
64 KiB), steady random 4 KiB writes QD16, random 4 KiB reads QD16, and in the as-filled
tier sequential 1 MiB writes and reads QD8.
"""

import os
import re
import shutil
import signal
import subprocess
import time

import harness as hn

TIER_WORKLOADS = {
    "asfilled": ["firstwrite-seq-4k-qd16", "randwrite-4k-qd16", "randread-4k-qd16",
                 "seqwrite-1m-qd8", "seqread-1m-qd8"],
    "bigger": ["firstwrite-seq-4k-qd16", "randwrite-4k-qd16", "randread-4k-qd16"],
    "tls": ["seqread-1m-qd8", "seqwrite-1m-qd8", "randwrite-4k-qd16"],
}


# ----------------------------------------------------------------------------- cgroups


class MemoryCgroup:
    """A memory cgroup of our own (v2 where the unified hierarchy has the memory
    controller, else v1 at /sys/fs/cgroup/memory) that servers are moved into."""

    def __init__(self, name, limit_bytes):
        self.limit_bytes = limit_bytes
        v2 = "/sys/fs/cgroup/cgroup.controllers"
        if os.path.exists(v2) and "memory" in open(v2).read().split():
            self.path = os.path.join("/sys/fs/cgroup", name)
            self.version = 2
            limit_file = "memory.max"
        elif os.path.isdir("/sys/fs/cgroup/memory"):
            self.path = os.path.join("/sys/fs/cgroup/memory", name)
            self.version = 1
            limit_file = "memory.limit_in_bytes"
        else:
            raise RuntimeError("no memory cgroup controller (v1 or v2) on this machine")
        os.makedirs(self.path, exist_ok=True)
        with open(os.path.join(self.path, limit_file), "w") as f:
            f.write(str(limit_bytes))

    def add(self, pid):
        with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
            f.write(str(pid))

    def remove(self):
        try:
            os.rmdir(self.path)
        except OSError:
            pass  # a process still in it; removed next time


def drop_caches():
    """Writes dirty pages back and drops the page cache (as after a reboot)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


# ----------------------------------------------------------------------------- peers


class TierPeer:
    """One server under test in a tier, on a fresh backing file/volume per repetition."""

    id = ""
    label = ""
    cow = False

    def __init__(self, h, tier, size):
        self.h = h
        self.size = size
        self.dir = os.path.join(h.work, f"{tier}-{self.id}")
        self.sock = os.path.join(self.dir, "nbd.sock")
        self.server = None
        self.cgroup = None
        self.command = ""
        self.setup_commands = []

    def uri(self):
        return f"nbd+unix:///?socket={self.sock}"

    @property
    def pid(self):
        return self.server.pid if self.server else None

    def create(self):
        """Makes the empty backing store (before the first start)."""
        raise NotImplementedError

    def server_cmd(self):
        raise NotImplementedError

    def start(self):
        self.command = " ".join(self.server_cmd())
        self.server = hn.Server(self.id, self.server_cmd(), os.path.join(self.dir, "server.log"))
        self.server.start(ready_uri=self.uri(), ready_path=self.sock)
        if self.cgroup:
            self.cgroup.add(self.server.pid)

    def stop(self):
        if self.server:
            self.server.stop()
            self.server = None

    def fill(self, image):
        hn.run(["nbdcopy", "--flush", image, self.uri()])

    def snapshot(self, name):
        raise NotImplementedError

    def counters(self):
        """snapvol's engine counters (None for other servers)."""
        return None

    def fio_env(self):
        return {"BENCH_IOENGINE": "nbd", "BENCH_TARGET": f"uri={self.uri()}",
                "BENCH_SIZE": str(self.size)}

    def remove(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class SnapvolTierPeer(TierPeer):
    id = "snapvol"
    label = "snapvol, filled by nbdcopy"
    cow = True
    # Options of `volume create` beyond the size (the peers below set theirs).
    create_options = []

    def create(self):
        os.makedirs(self.dir, exist_ok=True)
        self.data = os.path.join(self.dir, "data")
        hn.run([self.h.snapvol, "--data-dir", self.data, "volume", "create", "v",
                "--size", hn.fmt_size(self.size)] + self.create_options)
        self.setup_commands = [" ".join(["snapvol volume create v --size", hn.fmt_size(self.size)]
                                        + self.create_options),
                               "nbdcopy --flush SEED nbd+unix:///v?socket=S"]

    def server_cmd(self):
        return [self.h.snapvol, "--data-dir", self.data, "serve", "--socket", self.sock]

    def uri(self):
        return f"nbd+unix:///v?socket={self.sock}"

    def snapshot(self, name):
        hn.ctl(self.data, ["snapshot", "create", f"v@{name}"])

    def counters(self):
        import json
        return json.loads(hn.ctl(self.data, ["volume", "info", "v", "--json"])["stdout"])["counters"]


class SnapvolCachedPeer(SnapvolTierPeer):
    """snapvol with `volume create --compare cached` (the larger-than-memory option)."""

    id = "snapvol-cached"
    label = "snapvol --compare cached, filled by nbdcopy"
    create_options = ["--compare", "cached"]


class SnapvolPartsPeer(SnapvolTierPeer):
    """snapvol with `volume create --copies parts` (first writes copy only the parts of a chunk
    they change)."""

    id = "snapvol-parts"
    label = "snapvol --copies parts, filled by nbdcopy"
    create_options = ["--copies", "parts"]


class SnapvolDirtyMaxPeer(SnapvolTierPeer):
    """snapvol with `volume create --dirty-max 24M` (writers wait for the origin's writeback
    past 24 MiB, so a snapshot create under heavy writes has little to sync)."""

    id = "snapvol-dirtymax"
    label = "snapvol --dirty-max 24M, filled by nbdcopy"
    create_options = ["--dirty-max", "24M"]


class SnapvolImportPeer(SnapvolTierPeer):
    """snapvol filled by `snapvol import` (before the daemon starts) instead of nbdcopy."""

    id = "snapvol-import"
    label = "snapvol, filled by snapvol import"

    def fill(self, image):
        self.stop()
        hn.run([self.h.snapvol, "--data-dir", self.data, "import", "v", image])
        self.start()

    def create(self):
        super().create()
        self.setup_commands = [f"snapvol volume create v --size {hn.fmt_size(self.size)}",
                               "snapvol import v SEED"]


class NbdkitTierPeer(TierPeer):
    def __init__(self, h, tier, size, cache_none=False):
        self.cache_none = cache_none
        self.id = "nbdkit-file-nocache" if cache_none else "nbdkit-file"
        self.label = "nbdkit file, cache=none" if cache_none else "nbdkit file"
        super().__init__(h, tier, size)

    def create(self):
        os.makedirs(self.dir, exist_ok=True)
        self.path = os.path.join(self.dir, "disk.raw")
        with open(self.path, "wb") as f:
            f.truncate(self.size)
        self.setup_commands = ["truncate -s SIZE F.raw", "nbdcopy --flush SEED nbd+unix:///?socket=S"]

    def server_cmd(self):
        extra = ["cache=none"] if self.cache_none else []
        return ["nbdkit", "-f", "-U", self.sock, "file", f"file={self.path}", *extra]


class QemuTierPeer(TierPeer):
    def __init__(self, h, tier, size, fmt, cache_args, id, label):
        self.id = id
        self.label = label
        self.fmt = fmt
        self.cache_args = cache_args
        self.cow = fmt == "qcow2"
        super().__init__(h, tier, size)

    def create(self):
        os.makedirs(self.dir, exist_ok=True)
        self.path = os.path.join(self.dir, "disk." + self.fmt)
        hn.run(["qemu-img", "create", "-q", "-f", self.fmt, self.path, str(self.size)])
        self.setup_commands = [f"qemu-img create -f {self.fmt} F SIZE",
                               "nbdcopy --flush SEED nbd+unix:///?socket=S"]

    def server_cmd(self):
        return ["qemu-nbd", "-f", self.fmt, "-t", "-e", "0", *self.cache_args, "-k", self.sock, self.path]

    def snapshot(self, name):
        # qemu-nbd cannot take an internal snapshot while it serves the image (not timed).
        self.stop()
        hn.run(["qemu-img", "snapshot", "-c", name, self.path])
        self.start()


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_pki(h):
    """A CA, a server certificate for localhost and a client certificate (openssl), in
    the layout snapvol, nbdkit and libnbd read: DIR/server/{ca-cert,server-cert,server-key}.pem
    and DIR/home/.pki/libnbd/{ca-cert,client-cert,client-key}.pem. Made once per workdir."""
    root = os.path.join(h.work, "tls-pki")
    server = os.path.join(root, "server")
    client = os.path.join(root, "home", ".pki", "libnbd")
    if os.path.exists(os.path.join(client, "client-key.pem")):
        return server, os.path.join(root, "home")
    os.makedirs(server, exist_ok=True)
    os.makedirs(client, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    ca_key, ca_cert = os.path.join(root, "ca-key.pem"), os.path.join(server, "ca-cert.pem")
    hn.run(["openssl", "req", "-x509", *ec, "-days", "30", "-subj", "/CN=bench CA",
            "-keyout", ca_key, "-out", ca_cert], capture=True)
    for name, cn, ext, out in (
            ("server", "localhost", "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n", server),
            ("client", "bench", "extendedKeyUsage=clientAuth\n", client)):
        key, csr, extf = (os.path.join(out, f"{name}-key.pem"), os.path.join(root, f"{name}.csr"),
                          os.path.join(root, f"{name}.ext"))
        with open(extf, "w") as f:
            f.write(ext)
        hn.run(["openssl", "req", *ec, "-subj", f"/CN={cn}", "-keyout", key, "-out", csr], capture=True)
        hn.run(["openssl", "x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key,
                "-CAcreateserial", "-days", "30", "-out", os.path.join(out, f"{name}-cert.pem"),
                "-extfile", extf], capture=True)
    shutil.copy(ca_cert, os.path.join(client, "ca-cert.pem"))
    return server, os.path.join(root, "home")


class TcpTierPeer(TierPeer):
    """A peer on TCP (127.0.0.1), with TLS or without."""

    tls = False

    def __init__(self, h, tier, size):
        super().__init__(h, tier, size)
        self.port = free_port()
        self.certs, self.home = make_pki(h)

    def export(self):
        return ""

    def uri(self):
        if self.tls:
            client = os.path.join(self.home, ".pki", "libnbd")
            return f"nbds://localhost:{self.port}/{self.export()}?tls-certificates={client}"
        return f"nbd://localhost:{self.port}/{self.export()}"

    def start(self):
        self.command = " ".join(self.server_cmd())
        self.server = hn.Server(self.id, self.server_cmd(), os.path.join(self.dir, "server.log"))
        self.server.start(ready_uri=self.uri())

    def fio_env(self):
        scheme = "nbds" if self.tls else "nbd"
        return {"BENCH_IOENGINE": "nbd", "BENCH_SIZE": str(self.size), "HOME": self.home,
                "BENCH_TARGET": f"uri={scheme}://localhost:{self.port}/{self.export()}"}


class SnapvolTcpPeer(TcpTierPeer, SnapvolTierPeer):
    cow = False

    def __init__(self, h, tier, size, tls):
        self.tls = tls
        self.id = "snapvol-tls" if tls else "snapvol-tcp"
        self.label = "snapvol --tls require" if tls else "snapvol, plaintext TCP"
        super().__init__(h, tier, size)

    def export(self):
        return "v"

    def server_cmd(self):
        cmd = [self.h.snapvol, "--data-dir", self.data, "serve", "--listen", f"127.0.0.1:{self.port}"]
        if self.tls:
            cmd += ["--tls", "require", "--tls-certificates", self.certs]
        return cmd


class NbdkitTlsPeer(TcpTierPeer):
    id = "nbdkit-tls"
    label = "nbdkit file --tls=require"
    tls = True

    def create(self):
        os.makedirs(self.dir, exist_ok=True)
        self.path = os.path.join(self.dir, "disk.raw")
        with open(self.path, "wb") as f:
            f.truncate(self.size)
        self.setup_commands = ["truncate -s SIZE F.raw", "nbdcopy --flush SEED nbds://localhost:PORT/"]

    def server_cmd(self):
        return ["nbdkit", "-f", "-p", str(self.port), "--tls=require", f"--tls-certificates={self.certs}",
                "file", f"file={self.path}"]


def tier_peers(h, tier, size):
    if tier == "tls":
        return [SnapvolTcpPeer(h, tier, size, tls=True), NbdkitTlsPeer(h, tier, size),
                SnapvolTcpPeer(h, tier, size, tls=False)]
    if tier == "asfilled":
        return [
            SnapvolTierPeer(h, tier, size),
            SnapvolImportPeer(h, tier, size),
            SnapvolPartsPeer(h, tier, size),
            SnapvolDirtyMaxPeer(h, tier, size),
            NbdkitTierPeer(h, tier, size),
            QemuTierPeer(h, tier, size, "raw", ["--cache=writeback"], "qemu-raw-wb", "qemu-nbd raw, cache=writeback"),
            QemuTierPeer(h, tier, size, "qcow2", ["--cache=writeback"], "qemu-qcow2-snap",
                         "qemu-nbd qcow2 + internal snapshot, cache=writeback"),
        ]
    return [
        SnapvolTierPeer(h, tier, size),
        SnapvolCachedPeer(h, tier, size),
        SnapvolPartsPeer(h, tier, size),
        NbdkitTierPeer(h, tier, size),
        NbdkitTierPeer(h, tier, size, cache_none=True),
        QemuTierPeer(h, tier, size, "raw", ["--cache=none", "--aio=io_uring"], "qemu-raw-direct",
                     "qemu-nbd raw, cache=none aio=io_uring"),
    ]


# ----------------------------------------------------------------------------- phases


def seed(h, size, name):
    """A random image of `size` bytes in the workdir (reused when it exists)."""
    path = os.path.join(h.work, f"seed-{name}-{size}.img")
    if not (os.path.exists(path) and os.path.getsize(path) == size):
        hn.log(f"writing {hn.fmt_size(size)} of random data to {path}")
        with open(path, "wb") as f:
            left = size
            while left:
                n = min(left, 16 * hn.MIB)
                f.write(os.urandom(n))
                left -= n
    return path


def timed_copy(p, image):
    """nbdcopy of `image` into the peer, with the server's disk and CPU use over it."""
    cpu0, io0 = hn.proc_cpu_s(p.pid), hn.proc_io(p.pid)
    t = time.monotonic()
    hn.run(["nbdcopy", "--flush", image, p.uri()])
    dt = time.monotonic() - t
    cpu1, io1 = hn.proc_cpu_s(p.pid), hn.proc_io(p.pid)
    return {
        "seconds": round(dt, 3),
        "bw_bytes": round(p.size / dt),
        "server_write_bytes": io1["write_bytes"] - io0["write_bytes"],
        "server_read_bytes": io1["read_bytes"] - io0["read_bytes"],
        "server_cpu_s": round(cpu1 - cpu0, 3),
    }


OP_BYTES = {"firstwrite-seq-4k-qd16": 4096, "randwrite-4k-qd16": 4096, "randread-4k-qd16": 4096,
            "seqwrite-1m-qd8": hn.MIB, "seqread-1m-qd8": hn.MIB}


def phase_tier(h, tier):
    """One tier: every peer through fill, rewrite, snapshot and the workloads, per rep."""
    big = tier == "bigger"
    size = h.args.bigger_size if big else h.size
    h.phase(tier)
    image = seed(h, size, tier)
    peers = tier_peers(h, tier, size)
    cg_limit = size // 8
    for p in peers:
        h.peer_info[f"{tier}:{p.id}"] = {"label": p.label, "tier": tier, "size": size,
                                         "cgroup_bytes": cg_limit if big else None}
    for rep in range(h.reps):
        for p in h.rotated(peers, rep):
            if big:
                p.cgroup = MemoryCgroup(f"snapvol-bench-{p.id}", cg_limit)
            h.peers.append(p)  # stopped by main's finally if anything fails
            try:
                run_peer(h, tier, p, rep, image, big)
            finally:
                h.peer_info[f"{tier}:{p.id}"].update(command=p.command, setup=p.setup_commands)
                p.remove()
                h.peers.remove(p)
                if p.cgroup:
                    p.cgroup.remove()
            h.save(False)


def run_peer(h, tier, p, rep, image, big):
    p.create()
    p.start()
    t = time.monotonic()
    p.fill(image)
    fill_s = time.monotonic() - t
    if big:
        drop_caches()
    c0 = p.counters()
    r = timed_copy(p, image)
    if c0 is not None:
        c1 = p.counters()
        r["snapvol_counters"] = {k: c1[k] - c0[k] for k in c1}
    h.record(phase=tier, workload="identical-rewrite", peer=p.id, rep=rep, fill_s=round(fill_s, 3), **r)
    hn.log(f"{tier} rep {rep} {p.id}: fill {fill_s:.1f}s, identical rewrite {r['seconds']:.2f}s, "
           f"server wrote {r['server_write_bytes'] / hn.MIB:.1f} MiB")
    if p.cow:
        p.snapshot(f"t{rep}")
    for wl in TIER_WORKLOADS[tier]:
        if big:
            drop_caches()
        extra = {"BENCH_SIZE": str(p.size), "BENCH_IO_BYTES": str(p.size // 16)}
        if big:
            extra["BENCH_RUNTIME"] = str(h.args.bigger_runtime)
        r = h.fio(wl, p.fio_env(), p.pid, extra_env=extra, tag=f"{tier}:{p.id}")
        n = r["io_bytes"] / OP_BYTES[wl]
        if n:
            r["disk_read_per_op_bytes"] = round(r["server_read_bytes"] / n)
            r["disk_write_per_op_bytes"] = round(r["server_write_bytes"] / n)
        h.record(phase=tier, workload=wl, peer=p.id, rep=rep, **r)
        hn.log(f"{tier} rep {rep} {wl} {p.id}: {r['iops']:.0f} IOPS, {r['bw_bytes'] / hn.MIB:.1f} MiB/s, "
               f"disk read/op {r.get('disk_read_per_op_bytes', 0) / 1024:.1f} KiB")


def phase_createload(h):
    """Snapshot create latency (control socket, request to durable reply) on a 4 GiB
    snapvol volume filled by nbdcopy: idle, then while fio writes random 64 KiB blocks at
    QD16 (a create every 0.8 s); the default volume and one created with `--dirty-max`,
    with the load's own write rate beside (what the bound costs it)."""
    h.phase("createload")
    size = h.args.bigger_size
    image = seed(h, size, "bigger")
    count = h.args.createload_count
    for cls in (SnapvolTierPeer, SnapvolDirtyMaxPeer):
        p = cls(h, "createload", size)
        h.peers.append(p)
        try:
            p.create()
            p.start()
            p.fill(image)
            for rep in range(h.reps):
                for mode in ("idle", "load"):
                    fio = None
                    fio_out = os.path.join(p.dir, "fio-load.json")
                    if mode == "load":
                        with open(fio_out, "w") as out:
                            fio = subprocess.Popen(
                                ["fio", "--name=createload", "--ioengine=nbd", f"--uri={p.uri()}",
                                 f"--size={size}", "--rw=randwrite", "--bs=64k", "--iodepth=16",
                                 "--time_based", f"--runtime={int(count * 0.8 + 10)}", "--randrepeat=0",
                                 "--output-format=json"],
                                stdout=out, stderr=subprocess.DEVNULL)
                        time.sleep(3)  # the load is running before the first create
                    lat = []
                    for i in range(count):
                        time.sleep(0.8)
                        t = time.monotonic()
                        hn.ctl(p.data, ["snapshot", "create", f"v@{mode}{rep}-{i}"])
                        lat.append((time.monotonic() - t) * 1000)
                    load_bw = None
                    if fio:
                        fio.send_signal(signal.SIGINT)  # fio stops and writes its report
                        fio.wait()
                        load_bw = fio_write_bw(fio_out)
                    for i in range(count):
                        hn.ctl(p.data, ["snapshot", "delete", f"v@{mode}{rep}-{i}"])
                    # The daemon's own time for each create (its log, from the request on), to
                    # tell a slow create from time outside it (the control socket's request,
                    # this harness under the load).
                    inside = daemon_create_ms(os.path.join(p.dir, "server.log"),
                                              [f"{mode}{rep}-{i}" for i in range(count)])
                    h.record(phase="createload", workload=f"snapshot-create-{mode}", peer=p.id, rep=rep,
                             samples_ms=[round(x, 3) for x in lat], p50_ms=round(hn.pct(lat, 50), 3),
                             p99_ms=round(hn.pct(lat, 99), 3), max_ms=round(max(lat), 3),
                             daemon_samples_ms=inside, load_bw_bytes=load_bw)
                    hn.log(f"createload {p.id} rep {rep} {mode}: p50 {hn.pct(lat, 50):.1f} ms, "
                           f"p99 {hn.pct(lat, 99):.1f} ms"
                           + (f", load {load_bw / hn.MIB:.0f} MiB/s" if load_bw else ""))
                h.save(False)
        finally:
            p.remove()
            h.peers.remove(p)


def daemon_create_ms(log_path, names):
    """The daemon's time (ms, its `snapshot created ... total_us=` log line) for each snapshot
    of `names`, in that order; None where the line is missing."""
    took = {}
    try:
        with open(log_path, errors="replace") as f:
            for line in f:
                if "snapshot created" not in line:
                    continue
                name = re.search(r"snapshot=(\S+)", line)
                total = re.search(r"total_us=(\d+)", line)
                if name and total:
                    took[name.group(1)] = int(total.group(1)) / 1000
    except OSError:
        pass
    return [took.get(n) for n in names]


def fio_write_bw(path):
    """The write bandwidth (bytes/s) in a fio JSON report, or None if it has none."""
    import json
    try:
        with open(path) as f:
            text = f.read()
        return json.loads(text[text.index("{"):])["jobs"][0]["write"]["bw_bytes"]
    except (OSError, ValueError, KeyError, IndexError):
        return None
