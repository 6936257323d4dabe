"""The handshake and the commands through libnbd's python binding (what nbdsh runs), and the
negative cases of libnbd's tests/errors-server-*.c: each provokes a server error with the
client's strict mode relaxed, expects the errno the NBD protocol asks for, and then checks
that the connection still works.

Run by nbdsh.sh; needs the python3 that has the `nbd` module (python3-libnbd):
    python3 nbdsh_errors.py --uri URI --ro-uri URI --size N [--tcp-uri URI]
        [--default-size N] [--snapvol]
--snapvol adds the checks of snapvol's own features (dirty bitmaps listed, hole chunks).
Prints one line per failed check (what, expected, got); exits 1 if any failed.
"""

import argparse
import errno
import os
import sys
import urllib.parse

import nbd

FAILURES = []
CHECKS = 0


def name_of(e):
    return errno.errorcode.get(e, str(e)) if e else "success"


def check(desc, ok, expected="", got=""):
    global CHECKS
    CHECKS += 1
    if not ok:
        FAILURES.append(desc)
        print(f"FAIL: {desc}", file=sys.stderr)
        if expected or got:
            print(f"    expected: {expected}", file=sys.stderr)
            print(f"    got:      {got}", file=sys.stderr)
    return ok


def export_of(uri):
    return urllib.parse.unquote(urllib.parse.urlparse(uri).path.lstrip("/"))


def same_server(u1, u2):
    p1, p2 = urllib.parse.urlparse(u1), urllib.parse.urlparse(u2)
    return (p1.scheme, p1.netloc, p1.query) == (p2.scheme, p2.netloc, p2.query)


def connect(uri, meta=True, opt=False):
    h = nbd.NBD()
    h.set_handle_name("interop")
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    if opt:
        h.set_opt_mode(True)
    h.connect_uri(uri)
    return h


def relax(h, bits):
    h.set_strict_mode(h.get_strict_mode() & ~bits)


def outcome(f):
    """Run f; return (0, result) or (errno, message)."""
    try:
        return 0, f()
    except nbd.Error as e:
        return (e.errnum or -1), e.string


def expect_errno(desc, f, allowed):
    """f must fail at the server with one of the allowed errnos. libnbd words an error that
    the server replied with as "...: command failed: ..."; an error libnbd raised itself
    (its strict mode not relaxed) would not test the server, so it fails the check."""
    err, what = outcome(f)
    allowed = allowed if isinstance(allowed, (list, tuple)) else [allowed]
    from_server = err == 0 or "command failed" in what
    check(desc, err in allowed and from_server,
          " or ".join(name_of(a) for a in allowed) + " from the server",
          f"{name_of(err)}" + (f" ({what})" if err else ""))
    return err


def still_works(desc, h, size):
    """The connection survived: a read at the start and at the end succeed."""
    err, what = outcome(lambda: (h.pread(512, 0), h.pread(512, size - 512)))
    check(f"connection still usable after {desc}", err == 0, "a successful read",
          f"{name_of(err)} ({what})")


# ------------------------------------------------------------------ handshake

def handshake(a):
    print("handshake in opt mode")
    vol = export_of(a.uri)
    ro = export_of(a.ro_uri)
    h = connect(a.uri, opt=True)
    check("opt mode: connected and negotiating", h.aio_is_negotiating(), "negotiating",
          h.connection_state())
    check("protocol newstyle-fixed", h.get_protocol() == "newstyle-fixed", "newstyle-fixed",
          h.get_protocol())
    check("structured replies negotiated", h.get_structured_replies_negotiated(), True, False)

    exports = []
    n = h.opt_list(lambda name, desc: exports.append((name, desc)))
    names = [e[0] for e in exports]
    check("opt_list returns the number of exports listed", n == len(exports), len(exports), n)
    check(f"opt_list lists {vol}", vol in names, vol, names)
    if a.snapvol:
        check(f"opt_list lists the snapshot export {ro}", ro in names, ro, names)
    nodesc = [name for name, desc in exports if not desc]
    check("opt_list: every export has a description", not nodesc, "descriptions",
          f"none for {nodesc}")

    h.set_export_name(vol)
    # No query (libnbd sends the requested contexts as queries): every context of vol.
    h.clear_meta_contexts()
    contexts = []
    h.opt_list_meta_context(lambda name: contexts.append(name))
    check("opt_list_meta_context on vol offers base:allocation",
          "base:allocation" in contexts, "base:allocation", contexts)
    if a.snapvol:
        snap = ro.split("@", 1)[1]
        want = f"qemu:dirty-bitmap:{snap}"
        check(f"opt_list_meta_context on vol offers {want}", want in contexts, want, contexts)
        h.clear_meta_contexts()
        h.add_meta_context("qemu:dirty-bitmap:")
        bitmaps = []
        h.opt_list_meta_context(lambda name: bitmaps.append(name))
        check("opt_list_meta_context query 'qemu:dirty-bitmap:' lists the snapshot's bitmap",
              want in bitmaps, want, bitmaps)
    h.clear_meta_contexts()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)

    err, what = outcome(h.opt_info)
    check("opt_info on vol succeeds", err == 0, "success", f"{name_of(err)} {what}")
    if err == 0:
        check("opt_info: size", h.get_size() == a.size, a.size, h.get_size())
        check("opt_info: vol is writable", not h.is_read_only(), "read-write", "read-only")
        bmin, bpref, bmax = (h.get_block_size(x) for x in
                             (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED, nbd.SIZE_MAXIMUM))
        check("opt_info: block sizes advertised and sane", 0 < bmin <= bpref <= bmax,
              "0 < minimum <= preferred <= maximum", (bmin, bpref, bmax))

    h.set_export_name("no-such-export")
    err, what = outcome(h.opt_info)
    check("opt_info on an export that does not exist fails", err != 0, "an error", "success")
    check("still negotiating after a failed opt_info", h.aio_is_negotiating(), "negotiating",
          h.connection_state())

    if same_server(a.uri, a.ro_uri):
        h.set_export_name(ro)
        err, what = outcome(h.opt_info)
        check(f"opt_info on {ro} succeeds", err == 0, "success", f"{name_of(err)} {what}")
        if err == 0:
            check(f"opt_info: {ro} is read-only", h.is_read_only(), "read-only", "read-write")
            check(f"opt_info: {ro} size", h.get_size() == a.size, a.size, h.get_size())

    if a.default_size is not None:
        h.set_export_name("")
        err, what = outcome(h.opt_info)
        check("opt_info on the empty (default) export name succeeds", err == 0, "success",
              f"{name_of(err)} {what}")
        if err == 0:
            check("the default export's size", h.get_size() == a.default_size, a.default_size,
                  h.get_size())

    h.set_export_name(vol)
    err, what = outcome(h.opt_go)
    check("opt_go on vol succeeds", err == 0, "success", f"{name_of(err)} {what}")
    if err == 0:
        check("ready for transmission after opt_go", h.aio_is_ready(), "ready",
              h.connection_state())
        check("after opt_go: size", h.get_size() == a.size, a.size, h.get_size())
        check("base:allocation negotiated", h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION) == 1,
              1, h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION))
        err, what = outcome(lambda: h.pread(4096, 0))
        check("read after opt_go", err == 0, "success", f"{name_of(err)} {what}")
    h.shutdown()

    h = connect(a.uri, opt=True)
    err, what = outcome(h.opt_abort)
    check("opt_abort ends the negotiation cleanly", err == 0 and h.aio_is_closed(), "closed",
          f"{name_of(err)} {what} state {h.connection_state()}")

    # Several handshakes one after the other (the server must not leak or refuse them).
    for i in range(20):
        h = connect(a.uri)
        h.shutdown()
    check("20 connections in a row", True)


# ------------------------------------------------------------------ commands

def commands(a):
    print("commands")
    h = connect(a.uri)
    size = a.size
    check("multi-conn advertised", h.can_multi_conn(), True, False)
    for what in ("flush", "fua", "trim", "zero", "cache"):
        v = getattr(h, "can_" + what)()
        check(f"can_{what} advertised", v, True, v)

    data = bytes(range(256)) * 256  # 64 KiB
    h.pwrite(data, 0)
    check("read back a write", h.pread(len(data), 0) == data)
    if h.can_fua():
        h.pwrite(data[:4096], 1 << 20, nbd.CMD_FLAG_FUA)
        check("read back a FUA write", h.pread(4096, 1 << 20) == data[:4096])
    h.pwrite(b"\xee" * 1000, 123457)
    check("unaligned write", h.pread(1000, 123457) == b"\xee" * 1000)
    if h.can_flush():
        h.flush()
    if h.can_zero():
        h.pwrite(b"\x55" * 65536, 2 << 20)
        h.zero(65536, 2 << 20)
        check("write-zeroes reads back zeros", h.pread(65536, 2 << 20) == bytes(65536))
        h.pwrite(b"\x56" * 65536, 3 << 20)
        h.zero(4000, (3 << 20) + 100, nbd.CMD_FLAG_NO_HOLE)
        got = h.pread(65536, 3 << 20)
        check("unaligned write-zeroes with NO_HOLE",
              got == b"\x56" * 100 + bytes(4000) + b"\x56" * (65536 - 4100))
        if h.can_fast_zero():
            err, what = outcome(lambda: h.zero(65536, 4 << 20, nbd.CMD_FLAG_FAST_ZERO))
            check("fast zero succeeds or fails with ENOTSUP", err in (0, errno.ENOTSUP),
                  "success or ENOTSUP", f"{name_of(err)} {what}")
    if h.can_trim():
        h.pwrite(b"\x57" * 65536, 5 << 20)
        h.trim(65536, 5 << 20)
        check("trim succeeds and the area can be rewritten", True)
        h.pwrite(b"\x58" * 4096, 5 << 20)
        check("write after trim", h.pread(4096, 5 << 20) == b"\x58" * 4096)
    if h.can_cache():
        h.cache(1 << 20, 0)
        check("cache succeeds", True)

    # Structured read: the chunks cover the request exactly once; holes read as zeros.
    def chunks_of(count, offset, flags=0):
        seen = []

        def cb(subbuf, off, status, err):
            seen.append((off, len(subbuf), status))
            return 0

        buf = h.pread_structured(count, offset, cb, flags)
        return buf, sorted(seen)

    def covers(seen, count, offset):
        pos = offset
        for off, n, status in seen:
            if status == nbd.READ_ERROR:
                return False
            if off != pos:
                return False
            pos += n
        return pos == offset + count

    buf, seen = chunks_of(65536, 0)
    check("structured read of data: chunks cover the range", covers(seen, 65536, 0),
          "contiguous chunks over [0, 65536)", seen)
    check("structured read returns the data", bytes(buf) == data)
    hole_off = size - (8 << 20)  # never written by this script
    buf, seen = chunks_of(1 << 20, hole_off)
    check("structured read of an unwritten area: chunks cover the range",
          covers(seen, 1 << 20, hole_off), f"contiguous chunks over 1 MiB at {hole_off}", seen)
    check("an unwritten area reads as zeros", bytes(buf) == bytes(1 << 20))
    if a.snapvol:
        holes = [s for s in seen if s[2] == nbd.READ_HOLE]
        check("an unwritten area is sent as hole chunks (NBD_REPLY_TYPE_OFFSET_HOLE)",
              bool(holes), "at least one hole chunk",
              [(o, n, "hole" if s == nbd.READ_HOLE else "data") for o, n, s in seen])
    if h.can_df():
        buf, seen = chunks_of(1 << 20, hole_off - (1 << 20) // 2, nbd.CMD_FLAG_DF)
        check("read with DF: exactly one chunk", len(seen) == 1, "1 chunk", seen)

    # Block status: extents from the requested offset, contiguous; REQ_ONE gives one.
    def extents(count, offset, flags=0):
        got = []

        def cb(ctx, off, entries, err):
            got.append((ctx, off, list(entries)))
            return 0

        h.block_status(count, offset, cb, flags)
        return got

    got = extents(size, 0)
    base = [g for g in got if g[0] == "base:allocation"]
    check("block status answers base:allocation once", len(base) == 1, 1, got)
    if base:
        ents = base[0][2]
        total = sum(ents[0::2])
        check("block status extents are not empty", len(ents) >= 2 and total > 0,
              "at least one extent", ents[:10])
        check("block status extents do not pass the end", total <= size, f"<= {size}", total)
        check("block status: the written start is not reported as zero",
              not (ents[1] & nbd.STATE_ZERO), "not zero", ents[:2])
    got = extents(1 << 20, 0, nbd.CMD_FLAG_REQ_ONE)
    base = [g for g in got if g[0] == "base:allocation"]
    if base:
        check("block status with REQ_ONE: one extent, within the request",
              len(base[0][2]) == 2 and base[0][2][0] <= 1 << 20, "1 extent <= 1 MiB",
              base[0][2])
    got = extents(65536, hole_off)
    base = [g for g in got if g[0] == "base:allocation"]
    if base and a.snapvol:
        check("block status of an unwritten area reports zero",
              bool(base[0][2][1] & nbd.STATE_ZERO), "STATE_ZERO set", base[0][2][:4])

    # Many commands in flight at once; replies may come in any order.
    blocks = 64
    cookies = []
    for i in range(blocks):
        cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray([i + 1]) * 4096),
                                    (6 << 20) + i * 4096))
    while h.aio_in_flight() > 0:
        h.poll(-1)
    results = [h.aio_command_completed(c) for c in cookies]
    check("64 writes in flight all succeed", all(results), "all completed", results)
    bufs = [nbd.Buffer(4096) for _ in range(blocks)]
    cookies = [h.aio_pread(bufs[i], (6 << 20) + i * 4096) for i in range(blocks)]
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c in cookies:
        h.aio_command_completed(c)
    bad = [i for i in range(blocks) if bufs[i].to_bytearray() != bytearray([i + 1]) * 4096]
    check("64 reads in flight return their own data", not bad, "all match", f"blocks {bad}")

    # Multi-conn: a write flushed on one connection is seen by another.
    h2 = connect(a.uri)
    h.pwrite(b"\x99" * 4096, 7 << 20)
    h.flush()
    check("multi-conn: a flushed write is visible on a second connection",
          h2.pread(4096, 7 << 20) == b"\x99" * 4096)
    h2.pwrite(b"\x9a" * 4096, 7 << 20, nbd.CMD_FLAG_FUA)
    check("multi-conn: a FUA write is visible on the first connection",
          h.pread(4096, 7 << 20) == b"\x9a" * 4096)
    h2.shutdown()

    if a.tcp_uri:
        t = connect(a.tcp_uri)
        check("TCP: size", t.get_size() == size, size, t.get_size())
        t.pwrite(b"\x42" * 512, 8 << 20)
        check("TCP: read back", t.pread(512, 8 << 20) == b"\x42" * 512)
        t.shutdown()
    h.shutdown()


# ------------------------------------------------------------------ negative cases

def errors(a):
    print("negative cases (libnbd tests/errors-server-*)")
    size = a.size
    h = connect(a.uri)

    # errors-server-invalid-offset: beyond the end. NBD: EINVAL for read, trim and block
    # status; ENOSPC for write and write-zeroes.
    relax(h, nbd.STRICT_BOUNDS)
    expect_errno("read past the end", lambda: h.pread(512, size), errno.EINVAL)
    expect_errno("read straddling the end", lambda: h.pread(1024, size - 512), errno.EINVAL)
    expect_errno("read at a huge offset (2^64 - 512)", lambda: h.pread(512, (1 << 64) - 512),
                 errno.EINVAL)
    expect_errno("write past the end", lambda: h.pwrite(b"x" * 512, size), errno.ENOSPC)
    expect_errno("write straddling the end", lambda: h.pwrite(b"x" * 1024, size - 512),
                 errno.ENOSPC)
    check("a failed straddling write changed nothing", h.pread(512, size - 512) == bytes(512),
          "zeros", "data")
    if h.can_zero():
        expect_errno("write-zeroes past the end", lambda: h.zero(512, size), errno.ENOSPC)
    if h.can_trim():
        expect_errno("trim past the end", lambda: h.trim(512, size), errno.EINVAL)
    expect_errno("block status past the end",
                 lambda: h.block_status(512, size, lambda *args: 0), errno.EINVAL)
    still_works("out-of-bounds requests", h, size)

    # errors-server-unknown-flags: a flag bit no NBD version defines.
    relax(h, nbd.STRICT_FLAGS)
    bogus = nbd.CMD_FLAG_MASK + 1
    expect_errno(f"read with unknown flag {bogus:#x}", lambda: h.pread(512, 0, bogus), errno.EINVAL)
    expect_errno(f"write with unknown flag {bogus:#x}",
                 lambda: h.pwrite(b"y" * 512, 0, bogus), errno.EINVAL)
    still_works("unknown flags", h, size)

    # errors-server-zerosize: libnbd's test gets EINVAL from nbdkit for a read of 0 bytes,
    # but NBD leaves the answer to a zero-length request unspecified; the server SHOULD NOT
    # disconnect. So: any answer, and the connection must still work.
    relax(h, nbd.STRICT_ZERO_SIZE)
    for what, f in (("read", lambda: h.pread(0, 0)),
                    ("write", lambda: h.pwrite(b"", 0)), ("trim", lambda: h.trim(0, 0)),
                    ("write-zeroes", lambda: h.zero(0, 0)),
                    ("block status", lambda: h.block_status(0, 0, lambda *args: 0))):
        err, msg = outcome(f)
        print(f"    zero-size {what}: {name_of(err)}")
        still_works(f"a zero-size {what}", h, size)

    # errors-server-unadvertised-cmd: BLOCK_STATUS on a connection that negotiated no
    # metadata context (NBD: the server SHOULD answer EINVAL).
    plain = connect(a.uri, meta=False)
    relax(plain, nbd.STRICT_COMMANDS)
    expect_errno("block status without a negotiated metadata context",
                 lambda: plain.block_status(512, 0, lambda *args: 0), errno.EINVAL)
    still_works("an unadvertised command", plain, size)
    # ... and any command or flag the export does not advertise.
    relax(h, nbd.STRICT_COMMANDS | nbd.STRICT_FLAGS)
    unadvertised = []
    if not h.can_trim():
        unadvertised.append(("trim", lambda: h.trim(512, 0)))
    if not h.can_zero():
        unadvertised.append(("write-zeroes", lambda: h.zero(512, 0)))
    if not h.can_cache():
        unadvertised.append(("cache", lambda: h.cache(512, 0)))
    if not h.can_flush():
        unadvertised.append(("flush", lambda: h.flush()))
    if not h.can_fua():
        unadvertised.append(("FUA flag", lambda: h.pwrite(b"z" * 512, 0, nbd.CMD_FLAG_FUA)))
    if not h.can_df():
        unadvertised.append(("DF flag", lambda: h.pread(512, 0, nbd.CMD_FLAG_DF)))
    if h.can_zero() and not h.can_fast_zero():
        unadvertised.append(("FAST_ZERO flag",
                             lambda: h.zero(512, 0, nbd.CMD_FLAG_FAST_ZERO)))
    for what, f in unadvertised:
        expect_errno(f"unadvertised {what}", f, errno.EINVAL)
    print(f"    unadvertised on vol: {[w for w, _ in unadvertised] or 'none'}")
    # A flag that does not apply to the command: REQ_ONE on a read.
    expect_errno("read with REQ_ONE (a block-status flag)",
                 lambda: h.pread(512, 0, nbd.CMD_FLAG_REQ_ONE), errno.EINVAL)
    still_works("unadvertised commands and flags", h, size)

    # errors-server-oversize: a request larger than the advertised maximum block size.
    bmax = h.get_block_size(nbd.SIZE_MAXIMUM)
    limit = 64 << 20  # libnbd's own cap on a request
    if bmax <= 0:
        check("maximum block size advertised", False, "a maximum block size", bmax)
    elif bmax + 4096 > min(size, limit):
        print(f"    oversize: maximum block size {bmax} leaves no room below {min(size, limit)}")
    else:
        expect_errno(f"read of {bmax + 4096} bytes (maximum block size {bmax})",
                     lambda: h.pread(bmax + 4096, 0), errno.EINVAL)
        still_works("an oversize read", h, size)
        w = connect(a.uri)
        err, msg = outcome(lambda: w.pwrite(b"o" * (bmax + 4096), 0))
        # NBD: a server SHOULD answer EINVAL, but MAY drop the connection rather than read
        # the oversize payload.
        check("oversize write fails (EINVAL, or the server drops the connection)",
              err in (errno.EINVAL, errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE,
                      errno.ESHUTDOWN),
              "EINVAL or a dropped connection", f"{name_of(err)} {msg}")
        print(f"    oversize write: {name_of(err)}")
        if err == errno.EINVAL:
            still_works("an oversize write", w, size)
        after = connect(a.uri)
        still_works("an oversize write (new connection)", after, size)
        after.shutdown()

    # Unaligned requests, if the server has a minimum block size above 1
    # (errors-server-unaligned).
    bmin = h.get_block_size(nbd.SIZE_MINIMUM)
    if bmin > 1:
        relax(h, nbd.STRICT_ALIGN)
        expect_errno(f"read not aligned to the minimum block size {bmin}",
                     lambda: h.pread(bmin, 1), errno.EINVAL)
        still_works("an unaligned read", h, size)
    h.shutdown()

    # A read-only export: writes answer EPERM (errors-server-*: read-only-flag).
    r = connect(a.ro_uri)
    check("the read-only export is read-only", r.is_read_only(), True, False)
    relax(r, nbd.STRICT_COMMANDS | nbd.STRICT_FLAGS)
    before = r.pread(4096, 0)
    expect_errno("write to the read-only export", lambda: r.pwrite(b"w" * 4096, 0), errno.EPERM)
    expect_errno("FUA write to the read-only export",
                 lambda: r.pwrite(b"w" * 4096, 0, nbd.CMD_FLAG_FUA), errno.EPERM)
    # Trim and write-zeroes: EPERM by the read-only rule, or EINVAL if the export does not
    # advertise them.
    expect_errno("trim on the read-only export", lambda: r.trim(4096, 0),
                 [errno.EPERM] if r.can_trim() else [errno.EPERM, errno.EINVAL])
    expect_errno("write-zeroes on the read-only export", lambda: r.zero(4096, 0),
                 [errno.EPERM] if r.can_zero() else [errno.EPERM, errno.EINVAL])
    check("the read-only export is unchanged", r.pread(4096, 0) == before)
    if r.can_flush():
        err, msg = outcome(r.flush)
        check("flush on the read-only export succeeds", err == 0, "success", f"{name_of(err)} {msg}")
    still_works("writes to the read-only export", r, size)
    r.shutdown()


# ------------------------------------------------------------------ older clients

def legacy(a):
    print("older ways to connect")
    size = a.size
    # No structured replies: every reply is a simple reply.
    h = nbd.NBD()
    h.set_request_structured_replies(False)
    h.connect_uri(a.uri)
    check("structured replies can be declined", not h.get_structured_replies_negotiated(),
          "not negotiated", "negotiated")
    h.pwrite(b"\x81" * (1 << 20), 9 << 20)
    check("simple replies: read back 1 MiB", h.pread(1 << 20, 9 << 20) == b"\x81" * (1 << 20))
    relax(h, nbd.STRICT_BOUNDS)
    expect_errno("simple replies: read past the end", lambda: h.pread(512, size), errno.EINVAL)
    still_works("an error in a simple reply", h, size)
    h.shutdown()

    # Handshake flags 0: no fixed newstyle, no NO_ZEROES; libnbd then picks the export with
    # NBD_OPT_EXPORT_NAME and the server ends the handshake with 124 zero bytes.
    h = nbd.NBD()
    h.set_handshake_flags(0)
    h.connect_uri(a.uri)
    check("NBD_OPT_EXPORT_NAME (handshake flags 0): size", h.get_size() == size, size,
          h.get_size())
    check("NBD_OPT_EXPORT_NAME: read", h.pread(1 << 20, 9 << 20) == b"\x81" * (1 << 20))
    h.shutdown()

    # Fixed newstyle without NO_ZEROES.
    h = nbd.NBD()
    h.set_handshake_flags(nbd.HANDSHAKE_FLAG_FIXED_NEWSTYLE)
    h.connect_uri(a.uri)
    check("fixed newstyle without NO_ZEROES: read",
          h.pread(1 << 20, 9 << 20) == b"\x81" * (1 << 20))
    h.shutdown()

    # NBD_OPT_GO asking for everything (NBD_INFO_NAME, NBD_INFO_DESCRIPTION).
    h = nbd.NBD()
    h.set_full_info(True)
    h.connect_uri(a.uri)
    vol = export_of(a.uri)
    err, name = outcome(h.get_canonical_export_name)
    check("full info: canonical export name", err == 0 and name == vol, vol, f"{name_of(err)} {name}")
    err, desc = outcome(h.get_export_description)
    check("full info: export description", err == 0 and bool(desc), "a description",
          f"{name_of(err)} {desc!r}")
    h.shutdown()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--uri", required=True)
    p.add_argument("--ro-uri", required=True)
    p.add_argument("--tcp-uri")
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--default-size", type=int)
    p.add_argument("--snapvol", action="store_true")
    a = p.parse_args()
    for part in (handshake, commands, errors, legacy):
        try:
            part(a)
        except nbd.Error as e:
            check(f"{part.__name__}: unexpected libnbd error", False, "no error",
                  f"{name_of(e.errnum)}: {e.string}")
        except Exception as e:  # a crash of the script is a failure too, with its cause
            import traceback
            traceback.print_exc()
            check(f"{part.__name__}: unexpected exception", False, "no exception", repr(e))
    print(f"nbdsh_errors.py: {CHECKS - len(FAILURES)} of {CHECKS} checks passed")
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()
