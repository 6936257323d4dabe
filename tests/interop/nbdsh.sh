#!/usr/bin/env bash
# libnbd's own client: nbdsh one-liners, then nbdsh_errors.py (handshake in opt mode, the
# commands, and the negative cases of libnbd's tests/errors-server-*).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
require_cmds nbdsh nbdinfo
find_nbd_python

start_server 64M
# vol@ro is a snapshot taken while vol is all zeros (snapvol), or a separate nbdkit -r.
make_ro_export
extra=()
if [[ $AGAINST == snapvol ]]; then
    extra+=(--snapvol)
    # The empty export name means volume `default` (serve may have created it).
    if sv volume info default --json >"$WORK/default.json" 2>/dev/null; then
        DEFAULT_SIZE=$(helper json-get "$WORK/default.json" size)
    else
        must "create volume default through the daemon" sv volume create default --size 2M
        DEFAULT_SIZE=$((2 * 1024 * 1024))
    fi
    extra+=(--default-size "$DEFAULT_SIZE")
fi

log "nbdsh one-liners"
check "nbdsh -u: size" nbdsh -u "$URI" -c "assert h.get_size() == $SIZE, h.get_size()"
check "nbdsh: write, flush, read back" nbdsh -u "$URI" \
    -c 'h.pwrite(b"nbdsh!" * 100, 4096)' -c 'h.flush()' \
    -c 'assert h.pread(600, 4096) == b"nbdsh!" * 100'
check "nbdsh: a second connection sees the data" nbdsh -u "$URI" \
    -c 'assert h.pread(600, 4096) == b"nbdsh!" * 100'
check "nbdsh --opt-mode: list exports, info, go" nbdsh --opt-mode -u "$URI" \
    -c 'names = []' -c 'h.opt_list(lambda n, d: names.append(n))' \
    -c 'assert "vol" in names, names' -c 'h.opt_info()' -c 'h.opt_go()' \
    -c 'assert h.aio_is_ready()'
check "nbdsh: the read-only export refuses writes with EPERM" nbdsh -u "$RO_URI" -c '
import errno
assert h.is_read_only()
h.set_strict_mode(0)
try:
    h.pwrite(b"x" * 512, 0)
    raise SystemExit("write to the read-only export succeeded")
except nbd.Error as e:
    assert e.errnum == errno.EPERM, (e.errnum, e.string)
'
if [[ $AGAINST == snapvol ]]; then
    check "nbdsh: the empty export name is volume default" nbdsh -u "nbd+unix:///?socket=$SOCK" \
        -c "assert h.get_size() == $DEFAULT_SIZE, h.get_size()"
fi

log "nbdsh_errors.py"
check "nbdsh_errors.py: handshake, commands and negative cases" \
    "$NBD_PYTHON" "$INTEROP_DIR/nbdsh_errors.py" --uri "$URI" --ro-uri "$RO_URI" \
    --tcp-uri "$TCP_URI" --size "$SIZE" "${extra[@]}"
cat "$WORK/.check.out"

# --- deleting a snapshot that a client has open (snapvol) -------------------------------
if snapvol_only "deleting a snapshot that a client reads"; then
    log "snapshot deleted while a client reads it"
    # The client must never read wrong data: after the delete, its reads fail or still give
    # the snapshot's data, even once the freed store space has been reused.
    check "a client reading a snapshot while it is deleted and its space reused" \
        "$NBD_PYTHON" -c '
import subprocess, sys, nbd
sock = sys.argv[1]
def run(*args):
    r = subprocess.run(["sv", *args], capture_output=True, text=True)
    print("$ sv", *args, "->", r.returncode, r.stderr.strip())
    return r.returncode
v = nbd.NBD(); v.connect_uri(f"nbd+unix:///vol?socket={sock}")
P1, P2, P3 = b"\x31" * (1 << 20), b"\x32" * (1 << 20), b"\x33" * (1 << 20)
v.pwrite(P1, 32 << 20)
assert run("snapshot", "create", "vol@doomed") == 0
v.pwrite(P2, 32 << 20)            # P1 goes to the snapshot store
s = nbd.NBD(); s.connect_uri(f"nbd+unix:///vol@doomed?socket={sock}")
assert s.pread(1 << 20, 32 << 20) == P1, "the snapshot does not hold P1"
deleted = run("snapshot", "delete", "vol@doomed") == 0
assert run("snapshot", "create", "vol@after") == 0
v.pwrite(P3, 32 << 20)            # P2 goes to the store, maybe where P1 was
v.flush()
try:
    got = s.pread(1 << 20, 32 << 20)
    assert got == P1, f"read from the deleted snapshot returned other data: {bytes(got[:4])!r}..."
    print("after the delete the open connection still reads the snapshot data")
except nbd.Error as e:
    print("after the delete the open connection fails:", e.string)
if deleted:
    n = nbd.NBD()
    try:
        n.connect_uri(f"nbd+unix:///vol@doomed?socket={sock}")
        raise SystemExit("a deleted snapshot can still be opened")
    except nbd.Error:
        pass
a = nbd.NBD(); a.connect_uri(f"nbd+unix:///vol@after?socket={sock}")
assert a.pread(1 << 20, 32 << 20) == P2, "vol@after does not hold P2"
' "$SOCK"
fi

# --- shutdown with clients connected (snapvol) ------------------------------------------
if snapvol_only "SIGTERM with connected clients, then a restart"; then
    log "SIGTERM while a client is connected; the acknowledged writes survive a restart"
    # The client writes (no flush), waits connected, and reports what it sees afterwards.
    "$NBD_PYTHON" -c '
import sys, time, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
for i in range(16):
    h.pwrite(bytes([0x70 + i]) * 65536, (16 << 20) + i * 65536)
print("written", flush=True)
time.sleep(30)
' "$URI" >"$WORK/client.out" 2>&1 &
    CLIENT_PID=$!
    on_exit "kill $CLIENT_PID 2>/dev/null; wait $CLIENT_PID 2>/dev/null"
    for ((i = 0; i < 100; i++)); do
        grep -q written "$WORK/client.out" && break
        sleep 0.1
    done
    expect_eq "the client wrote its data" written "$(cat "$WORK/client.out")"
    restart_snapvol
    kill "$CLIENT_PID" 2>/dev/null
    check "after SIGTERM and a restart, the acknowledged writes are there" nbdsh -u "$URI" -c '
for i in range(16):
    got = h.pread(65536, (16 << 20) + i * 65536)
    assert got == bytes([0x70 + i]) * 65536, f"block {i}: {got[:8]!r}"
'
    check "after the restart, vol@ro is still served read-only" nbdsh -u "$RO_URI" -c 'assert h.is_read_only()'
fi
