"""NBD client side of tests/kill9.rs (SIGKILL of `snapvol serve`), on libnbd's python binding.
Needs the python3 that has the `nbd` module (python3-libnbd), normally /usr/bin/python3.

    nbd_io.py write --socket PATH [--tcp HOST:PORT] --export NAME --blocks N --log FILE
        --state FILE --next-version V --seed S [--depth D] [--max-seconds T]
    nbd_io.py read --socket PATH --blocks N [--flush EXPORT] EXPORT...
    nbd_io.py block B V            (prints the expected content of block B, version V, as hex)

Block format. The volume is an array of 4 KiB blocks. A block holding version V > 0 of block
B is eight 512-byte sectors; sector S is a 32-byte header (magic "SVK9BLK\\0", B, V as u64,
S as u32, 4 zero bytes, all little-endian) followed by 480 bytes: a 16-byte BLAKE2b digest of
the header repeated 30 times. Version 0 means "all zeros" (never written, or write-zeroes,
trim, or zeros written as data). Versions come from one counter for the whole test, so a
version names one write of one block's data; a block's new versions only grow.

`write` runs until both connections are dead (the server was killed) or --max-seconds pass.
It keeps up to --depth requests in flight on each connection, one unix-socket connection and
one TCP connection (if --tcp), and never has two requests in flight on the same block, so a
block's writes take effect in the order they were sent. It appends one line per event to the
log, each with a single write(2) on an O_APPEND descriptor (the test appends its own markers
to the same file, so the file's line order is the real-time order of the events):

    READY                       both connections are up
    S ID KIND B0 N FUA V0..VN-1 request ID sent next (logged before the request is issued):
                                KIND w (write), z (write zeroes), n (write zeroes, NO_HOLE),
                                t (trim); blocks B0..B0+N-1 get versions V0.. (0 = zeros);
                                FUA 1 if sent with the FUA flag
    A ID                        request ID acknowledged (logged after the reply came)
    E ID ERRNO                  request ID failed (an error reply, or the connection died)
    X ID MESSAGE                request ID could not be issued (never sent)
    FS ID                       flush ID sent next
    FA ID / FE ID ERRNO         flush ID acknowledged / failed
    DONE REASON                 the writer stops

--state holds the blocks' current values (one version per line, 0 for zeros), so that the
writer can re-send a block's current content: those writes are identical rewrites, which
snapvol's compare-before-write skips.

`read` reads each export through NBD, decodes every block and prints one line per export:

    EXPORT NAME TOKEN...        one token per block: its version, 0 for zeros, or ? when the
                                block is neither zeros nor exactly one version's content
    BAD NAME B DETAIL           for each ?, what each sector holds

With --flush EXPORT it sends a flush on that export after reading it, so that what was read is
durable.
"""

import argparse
import errno
import hashlib
import os
import random
import select
import struct
import sys
import time

import nbd

BLOCK = 4096
SECTOR = 512
MAGIC = b"SVK9BLK\0"
HEADER = struct.Struct("<8sQQII")
ZERO = bytes(BLOCK)


def make_block(block, version):
    out = []
    for s in range(BLOCK // SECTOR):
        head = HEADER.pack(MAGIC, block, version, s, 0)
        digest = hashlib.blake2b(head, digest_size=16).digest()
        out.append(head)
        out.append(digest * ((SECTOR - HEADER.size) // 16))
    return b"".join(out)


def describe_sector(data, s):
    sec = data[s * SECTOR:(s + 1) * SECTOR]
    if sec == bytes(SECTOR):
        return "zeros"
    magic, b, v, idx, _ = HEADER.unpack_from(sec)
    if magic != MAGIC:
        return "garbage"
    whole = make_block(b, v)[idx * SECTOR:(idx + 1) * SECTOR] if idx < BLOCK // SECTOR else None
    tag = f"b{b}v{v}s{idx}"
    return tag if whole == sec else tag + "(damaged)"


def decode(data, block, cache):
    """Version held by `data` at block `block`: 0 for zeros, None if neither zeros nor exact."""
    if data == ZERO:
        return 0
    magic, b, v, s, _ = HEADER.unpack_from(data)
    if magic != MAGIC or b != block or s != 0 or v == 0:
        return None
    want = cache.get((b, v))
    if want is None:
        want = make_block(b, v)
        cache[(b, v)] = want
    return v if data == want else None


def connect(socket_path, tcp, export):
    h = nbd.NBD()
    h.set_handle_name("kill9")
    h.set_export_name(export)
    if tcp:
        host, port = tcp.rsplit(":", 1)
        h.connect_tcp(host, port)
    else:
        h.connect_unix(socket_path)
    return h


# ------------------------------------------------------------------------------- write


class Log:
    def __init__(self, path):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def __call__(self, line):
        os.write(self.fd, (line + "\n").encode())


def write_main(a):
    log = Log(a.log)
    rng = random.Random(a.seed)
    with open(a.state) as f:
        current = [int(x) for x in f.read().split()]
    if len(current) != a.blocks:
        sys.exit(f"state has {len(current)} blocks, expected {a.blocks}")
    # current[b]: the block's value as far as the writer knows (None: unknown, after an error).
    version = a.next_version
    handles = []
    try:
        handles.append(connect(a.socket, None, a.export))
        if a.tcp:
            handles.append(connect(a.socket, a.tcp, a.export))
    except nbd.Error as e:
        log(f"DONE connect failed: {e.string}")
        sys.exit(3)
    for h in handles:
        if h.is_read_only() or not (h.can_fua() and h.can_flush() and h.can_zero()
                                     and h.can_trim() and h.can_multi_conn()):
            log("DONE the export lacks a flag (read-only, or no fua/flush/zero/trim/multi-conn)")
            sys.exit(4)
    log("READY")

    state = {"next_id": 1, "flushes": 0}
    busy = set()
    inflight = {id(h): 0 for h in handles}
    buffers = {}
    dead = set()
    hot = rng.randrange(0, max(1, a.blocks - 256))
    deadline = time.monotonic() + a.max_seconds

    def new_id():
        i = state["next_id"]
        state["next_id"] += 1
        return i

    def finish_write(h, rid, blocks, values, err):
        inflight[id(h)] -= 1
        buffers.pop(rid, None)
        if err == 0:
            log(f"A {rid}")
            for b, v in zip(blocks, values):
                current[b] = v
        else:
            log(f"E {rid} {errno.errorcode.get(err, err)}")
            for b in blocks:
                current[b] = None
        for b in blocks:
            busy.discard(b)

    def finish_flush(h, rid, err):
        inflight[id(h)] -= 1
        state["flushes"] -= 1
        if err == 0:
            log(f"FA {rid}")
        else:
            log(f"FE {rid} {errno.errorcode.get(err, err)}")

    def pick_range():
        n = 1 if rng.random() < 0.6 else rng.randint(2, 16)
        for _ in range(8):
            if rng.random() < 0.5:
                b0 = hot + rng.randrange(0, 256)
            else:
                b0 = rng.randrange(0, a.blocks)
            b0 = min(b0, a.blocks - n)
            blocks = range(b0, b0 + n)
            if not any(b in busy for b in blocks):
                return blocks
        return None

    def issue(h):
        nonlocal version
        r = rng.random()
        if r < 0.08 and state["flushes"] < 2:
            rid = new_id()
            log(f"FS {rid}")
            try:
                h.aio_flush(completion=lambda err, h=h, rid=rid: (
                    finish_flush(h, rid, err.value), 1)[1])
            except nbd.Error as e:
                log(f"X {rid} {e.string}")
                return False
            state["flushes"] += 1
            inflight[id(h)] += 1
            return True
        blocks = pick_range()
        if blocks is None:
            return False
        r = rng.random()
        kind = "w" if r < 0.84 else "z" if r < 0.90 else "n" if r < 0.94 else "t"
        fua = rng.random() < 0.12
        values = []
        if kind == "w":
            resend_all = rng.random() < 0.1
            for b in blocks:
                if current[b] is not None and (resend_all or rng.random() < 0.15):
                    values.append(current[b])  # identical rewrite (zeros as data if 0)
                else:
                    values.append(version)
                    version += 1
        else:
            values = [0] * len(blocks)
        rid = new_id()
        flags = nbd.CMD_FLAG_FUA if fua else 0
        log(f"S {rid} {kind} {blocks[0]} {len(blocks)} {int(fua)} " + " ".join(map(str, values)))
        done = (lambda err, h=h, rid=rid, blocks=blocks, values=values:
                (finish_write(h, rid, blocks, values, err.value), 1)[1])
        try:
            if kind == "w":
                buf = nbd.Buffer.from_bytearray(b"".join(
                    make_block(b, v) if v else ZERO for b, v in zip(blocks, values)))
                buffers[rid] = buf
                h.aio_pwrite(buf, blocks[0] * BLOCK, completion=done, flags=flags)
            elif kind in "zn":
                if kind == "n":
                    flags |= nbd.CMD_FLAG_NO_HOLE
                h.aio_zero(len(blocks) * BLOCK, blocks[0] * BLOCK, completion=done, flags=flags)
            else:
                h.aio_trim(len(blocks) * BLOCK, blocks[0] * BLOCK, completion=done, flags=flags)
        except nbd.Error as e:
            buffers.pop(rid, None)
            log(f"X {rid} {e.string}")
            return False
        busy.update(blocks)
        inflight[id(h)] += 1
        return True

    reason = "all connections closed"
    while True:
        live = [h for h in handles if id(h) not in dead]
        for h in live:
            if h.aio_is_dead() or h.aio_is_closed():
                dead.add(id(h))
        live = [h for h in handles if id(h) not in dead]
        if not live:
            break
        stopping = time.monotonic() > deadline
        if stopping and all(inflight[id(h)] == 0 for h in live):
            reason = "time limit"
            break
        if not stopping:
            for h in live:
                while inflight[id(h)] < a.depth and (h.aio_is_ready() or h.aio_is_processing()):
                    if not issue(h):
                        break
        rl, wl, by_fd = [], [], {}
        for h in live:
            try:
                d = h.aio_get_direction()
                fd = h.aio_get_fd()
            except nbd.Error:
                dead.add(id(h))  # died since the check above
                continue
            by_fd[fd] = h
            if d & nbd.AIO_DIRECTION_READ:
                rl.append(fd)
            if d & nbd.AIO_DIRECTION_WRITE:
                wl.append(fd)
        if not rl and not wl:
            time.sleep(0.001)
            continue
        rr, ww, _ = select.select(rl, wl, [], 0.2)
        for fd in ww:
            try:
                by_fd[fd].aio_notify_write()
            except nbd.Error:
                dead.add(id(by_fd[fd]))
        for fd in rr:
            try:
                by_fd[fd].aio_notify_read()
            except nbd.Error:
                dead.add(id(by_fd[fd]))
    log(f"DONE {reason}")


# -------------------------------------------------------------------------------- read


def read_main(a):
    cache = {}
    out = []
    for export in a.exports:
        h = connect(a.socket, None, export)
        size = h.get_size()
        if size != a.blocks * BLOCK:
            sys.exit(f"export {export}: size {size}, expected {a.blocks * BLOCK}")
        tokens = []
        bad = []
        step = 1 << 22
        for off in range(0, size, step):
            data = h.pread(min(step, size - off), off)
            for i in range(0, len(data), BLOCK):
                b = (off + i) // BLOCK
                blk = data[i:i + BLOCK]
                v = decode(blk, b, cache)
                if v is None:
                    tokens.append("?")
                    sectors = [describe_sector(blk, s) for s in range(BLOCK // SECTOR)]
                    bad.append(f"BAD {export} {b} sectors: {' '.join(sectors)}")
                else:
                    tokens.append(str(v))
        if export == a.flush:
            h.flush()
        h.shutdown()
        out.append(f"EXPORT {export} " + " ".join(tokens))
        out.extend(bad)
    sys.stdout.write("\n".join(out) + "\n")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("--socket", required=True)
    w.add_argument("--tcp")
    w.add_argument("--export", required=True)
    w.add_argument("--blocks", type=int, required=True)
    w.add_argument("--log", required=True)
    w.add_argument("--state", required=True)
    w.add_argument("--next-version", type=int, required=True)
    w.add_argument("--seed", type=int, required=True)
    w.add_argument("--depth", type=int, default=8)
    w.add_argument("--max-seconds", type=float, default=20.0)
    r = sub.add_parser("read")
    r.add_argument("--socket", required=True)
    r.add_argument("--blocks", type=int, required=True)
    r.add_argument("--flush")
    r.add_argument("exports", nargs="+")
    b = sub.add_parser("block")
    b.add_argument("block", type=int)
    b.add_argument("version", type=int)
    a = p.parse_args()
    if a.cmd == "write":
        write_main(a)
    elif a.cmd == "read":
        read_main(a)
    else:
        print(make_block(a.block, a.version).hex())


if __name__ == "__main__":
    main()
