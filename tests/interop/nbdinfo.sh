#!/usr/bin/env bash
# nbdinfo against the server: --json (handshake facts, flags, block sizes, contexts), --list
# (exports with descriptions), --map (base:allocation), and (snapvol)
# --map=qemu:dirty-bitmap:SNAP, which must equal `snapvol diff VOL@SNAP --json` and the
# blocks that really differ; also `snapvol serve` with no arguments.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
require_cmds nbdinfo nbdcopy qemu-io

start_server 64M
make_ro_export

# j FILE PATH: a value from a JSON file ("" when absent).
j() { helper json-get "$1" "$2" 2>/dev/null || true; }

# --- nbdinfo --json ---------------------------------------------------------------------
log "nbdinfo --json"
must "nbdinfo --json on vol" nbdinfo --json "$URI"
cp "$WORK/.check.out" "$WORK/info.json"
I="$WORK/info.json"
expect_eq "nbdinfo: protocol" "newstyle-fixed" "$(j "$I" protocol)"
expect_eq "nbdinfo: structured replies" "true" "$(j "$I" structured)"
expect_eq "nbdinfo: export name" "vol" "$(j "$I" exports.0.export-name)"
expect_eq "nbdinfo: export size" "$SIZE" "$(j "$I" exports.0.export-size)"
expect_eq "nbdinfo: vol is read-write" "false" "$(j "$I" exports.0.is_read_only)"
for flag in can_flush can_fua can_trim can_zero can_cache can_multi_conn; do
    expect_eq "nbdinfo: vol $flag" "true" "$(j "$I" "exports.0.$flag")"
done
expect_eq "nbdinfo: vol offers base:allocation" "yes" \
    "$(grep -q '"base:allocation"' <<<"$(j "$I" exports.0.contexts)" && echo yes || echo no)"
bmin=$(j "$I" exports.0.block_size_minimum)
bpref=$(j "$I" exports.0.block_size_preferred)
bmax=$(j "$I" exports.0.block_size_maximum)
CHECKS=$((CHECKS + 1))
if [[ -z "$bmin" || -z "$bpref" || -z "$bmax" ]]; then
    record_failure "nbdinfo: block size constraints advertised (NBD_INFO_BLOCK_SIZE)" \
        "expected: block_size_minimum/preferred/maximum" "got: '$bmin' '$bpref' '$bmax'"
elif ! ((bmin >= 1 && bmin <= bpref && bpref <= bmax && (bmin & (bmin - 1)) == 0 &&
    (bpref & (bpref - 1)) == 0 && bmin <= 65536 && bpref <= 32 * 1024 * 1024)); then
    record_failure "nbdinfo: sane block sizes (powers of two, min <= preferred <= maximum)" \
        "got: minimum $bmin, preferred $bpref, maximum $bmax"
fi
log "block sizes: minimum $bmin, preferred $bpref, maximum $bmax"

must "nbdinfo --json on the read-only export" nbdinfo --json "$RO_URI"
cp "$WORK/.check.out" "$WORK/ro.json"
expect_eq "nbdinfo: the read-only export is read-only" "true" "$(j "$WORK/ro.json" exports.0.is_read_only)"
expect_eq "nbdinfo: the read-only export's size" "$SIZE" "$(j "$WORK/ro.json" exports.0.export-size)"
expect_fail "nbdinfo on an export that does not exist fails" nbdinfo --size "$(uri_of nosuchvolume)"

check "nbdinfo --size over TCP" nbdinfo --size "$TCP_URI"
expect_eq "nbdinfo --size over TCP" "$SIZE" "$(cat "$WORK/.check.out")"
check "nbdinfo --can flush" nbdinfo --can flush "$URI"
expect_fail "nbdinfo --can write on the read-only export is false" nbdinfo --can write "$RO_URI"

# --- nbdinfo --list ------------------------------------------------------------------------
log "nbdinfo --list"
check "nbdinfo --list" nbdinfo --list "$URI"
expect_output_has "nbdinfo --list shows export vol" '^export="vol":$'
must "nbdinfo --list --json" nbdinfo --list --json "$URI"
cp "$WORK/.check.out" "$WORK/list.json"
# Every listed export has a non-empty description and its facts; vol is among them.
check "nbdinfo --list --json: every export has a description" "$PY" -c '
import json, sys
doc = json.load(open(sys.argv[1]))
exports = {e["export-name"]: e for e in doc["exports"]}
bad = [n for n, e in exports.items() if not e.get("description")]
assert "vol" in exports, f"vol not listed: {sorted(exports)}"
assert not bad, f"exports without a description: {bad}"
assert exports["vol"]["export-size"] == int(sys.argv[2]), exports["vol"]
' "$WORK/list.json" "$SIZE"
if snapvol_only "snapshot exports in the list"; then
    check "nbdinfo --list --json: vol@ro listed read-only with the volume's size" "$PY" -c '
import json, sys
exports = {e["export-name"]: e for e in json.load(open(sys.argv[1]))["exports"]}
e = exports.get("vol@ro")
assert e is not None, f"vol@ro not listed: {sorted(exports)}"
assert e["is_read_only"] is True, e
assert e["export-size"] == int(sys.argv[2]), e
assert exports["vol"]["is_read_only"] is False, exports["vol"]
' "$WORK/list.json" "$SIZE"
fi

# --- nbdinfo --map (base:allocation) ------------------------------------------------------
log "nbdinfo --map"
# The same writes go to the export and to a local file, so the file is what the export holds.
# (Against snapvol, vol@ro was taken before: vol was still all zero.)
EXPECT="$WORK/expect.img"
truncate -s "$SIZE" "$EXPECT"
WRITES=(-c 'write -P 0x01 0 64k' -c 'write -P 0x02 1M 4k' -c 'write -P 0x03 2M 1000'
    -c 'write -P 0x04 3M 1M' -c 'write -P 0x05 8M 64k' -c 'write -z 8M 64k'
    -c "write -P 0x06 $((SIZE - 65536)) 64k")
must "qemu-io writes to the export" qemu-io -f raw "${WRITES[@]}" "$URI"
must "the same writes to the expected image" qemu-io -f raw "${WRITES[@]}" "$EXPECT"
check "nbdinfo --map" nbdinfo --map "$URI"
expect_output_has "nbdinfo --map lists data" '[[:space:]]0[[:space:]]+data$'
must "nbdinfo --map --json" nbdinfo --map --json "$URI"
cp "$WORK/.check.out" "$WORK/map.json"
check "nbdinfo --map: contiguous extents over the export, zero extents read as zero, holes reported" \
    helper check-map nbdinfo "$WORK/map.json" "$EXPECT" "$SIZE" --min-zero $((40 * 1024 * 1024))
check "nbdinfo --map=base:allocation" nbdinfo --map=base:allocation --json "$URI"
check "nbdinfo --map --totals" nbdinfo --map --totals "$URI"
check "the export holds the expected image (nbdcopy out)" nbdcopy "$URI" "$WORK/live.img"
expect_same_file "the export's contents equal the expected image" "$EXPECT" "$WORK/live.img"
check "nbdinfo --map on the read-only export" nbdinfo --map --json "$RO_URI"
expect_fail "nbdinfo --map of an unknown context fails" nbdinfo --map=qemu:dirty-bitmap:nosuch "$URI"

# --- dirty bitmaps (snapvol) -----------------------------------------------------------
# dirty_checks VOL SNAP CHUNK: the dirty bitmap of VOL since SNAP, from NBD and from the CLI,
# against the blocks that really differ between the snapshot and the live volume.
dirty_checks() {
    local vol=$1 snap=$2 chunk=$3 d="$WORK/dirty-$1-$2"
    mkdir -p "$d"
    must "nbdinfo --map=qemu:dirty-bitmap:$snap on $vol" \
        nbdinfo --map="qemu:dirty-bitmap:$snap" --json "$(uri_of "$vol")"
    cp "$WORK/.check.out" "$d/map.json"
    must "snapvol diff $vol@$snap --json" sv diff "$vol@$snap" --json
    cp "$WORK/.check.out" "$d/diff.json"
    must "copy $vol out" nbdcopy "$(uri_of "$vol")" "$d/live.img"
    must "snapvol export $vol@$snap" sv export "$vol@$snap" "$d/snap.img"
    helper differing-blocks "$d/snap.img" "$d/live.img" "$d/real.json"
    check "dirty bitmap $vol since $snap (NBD) equals snapvol diff $vol@$snap (4 KiB blocks)" \
        helper same-blocks "dirty bitmap of $vol since $snap vs snapvol diff" \
        dirty "$d/map.json" diff "$d/diff.json"
    check "every block that differs from $vol@$snap is dirty" \
        helper subset-blocks "differing blocks within the dirty bitmap ($vol since $snap)" \
        diff "$d/real.json" dirty "$d/map.json"
    check "every dirty chunk of $vol since $snap really differs (chunk $chunk)" \
        helper subset-blocks "dirty chunks within the differing chunks ($vol since $snap)" \
        dirty "$d/map.json" diff "$d/real.json" "$chunk"
}

if snapvol_only "qemu:dirty-bitmap:SNAP contexts"; then
    log "dirty bitmaps"
    must "snapshot create vol@s1" sv snapshot create vol@s1
    check "nbdinfo --json: vol offers qemu:dirty-bitmap:s1" nbdinfo --json "$URI"
    expect_output_has "vol's contexts include qemu:dirty-bitmap:s1" '"qemu:dirty-bitmap:s1"'
    check "nbdinfo: a bitmap with no writes since the snapshot is clean" \
        nbdinfo --map=qemu:dirty-bitmap:s1 --json "$URI"
    cp "$WORK/.check.out" "$WORK/s1-clean.json"
    check "snapvol diff vol@s1 right after the snapshot" sv diff vol@s1 --json
    cp "$WORK/.check.out" "$WORK/s1-clean-diff.json"
    check "clean bitmap equals the empty diff" helper same-blocks "clean bitmap vs diff" \
        dirty "$WORK/s1-clean.json" diff "$WORK/s1-clean-diff.json"
    expect_eq "no dirty blocks right after the snapshot" "no blocks" \
        "$(helper blocks dirty "$WORK/s1-clean.json")"
    # Changes: aligned, unaligned across a chunk boundary, a large write, write-zeroes over
    # data, data over a hole, a rewrite with identical data (not a change).
    # The expected image follows along, so the copy-on-write of partly written chunks is
    # checked byte for byte, live and in each snapshot.
    cp "$EXPECT" "$WORK/expect-s1.img"
    W1=(-c 'write -P 0x11 4k 4k' -c 'write -P 0x12 130000 10000' -c 'write -P 0x13 5M 1M'
        -c 'write -z 3M 64k' -c 'write -P 0x14 20M 100' -c 'write -P 0x02 1M 4k')
    must "writes after vol@s1" qemu-io -f raw "${W1[@]}" "$URI"
    must "the same writes to the expected image" qemu-io -f raw "${W1[@]}" "$EXPECT"
    must "snapshot create vol@s2" sv snapshot create vol@s2
    cp "$EXPECT" "$WORK/expect-s2.img"
    W2=(-c 'write -P 0x21 12k 4k' -c 'write -P 0x22 40M 64k' -c 'write -P 0x23 5M 4k'
        -c 'write -P 0x24 65535 2')
    must "writes after vol@s2" qemu-io -f raw "${W2[@]}" "$URI"
    must "the same writes to the expected image" qemu-io -f raw "${W2[@]}" "$EXPECT"
    dirty_checks vol s1 65536
    dirty_checks vol s2 65536
    expect_same_file "live vol after partial-chunk writes over snapshots" "$EXPECT" "$WORK/dirty-vol-s1/live.img"
    expect_same_file "vol@s1 holds vol as it was" "$WORK/expect-s1.img" "$WORK/dirty-vol-s1/snap.img"
    expect_same_file "vol@s2 holds vol as it was" "$WORK/expect-s2.img" "$WORK/dirty-vol-s2/snap.img"
    check "changed since s2 is within changed since s1" helper subset-blocks \
        "dirty(s2) within dirty(s1)" dirty "$WORK/dirty-vol-s2/map.json" dirty "$WORK/dirty-vol-s1/map.json"
    echo '{"ranges":[{"offset":0,"length":1048576},{"offset":1114112,"length":65994752}]}' \
        >"$WORK/not-1M.json"
    check "the rewrite of identical data (1M, 4k) is not dirty" helper subset-blocks \
        "identical rewrite not dirty" dirty "$WORK/dirty-vol-s1/map.json" diff "$WORK/not-1M.json"

    # With 4 KiB chunks the bitmap is exact: the dirty blocks are the blocks that differ.
    must "create volume v4k with 4 KiB chunks" sv volume create v4k --size 16M --chunk-size 4K
    V4K=$(uri_of v4k)
    must "fill v4k" qemu-io -f raw -c 'write -P 0x31 0 1M' -c 'write -P 0x32 4M 64k' "$V4K"
    must "snapshot create v4k@a" sv snapshot create v4k@a
    must "writes after v4k@a" qemu-io -f raw -c 'write -P 0x41 8k 4k' -c 'write -P 0x42 100000 5000' \
        -c 'write -z 4M 8k' -c 'write -P 0x43 10M 12k' -c 'write -P 0x31 512k 4k' "$V4K"
    dirty_checks v4k a 4096
    check "v4k: dirty blocks are exactly the differing blocks" helper same-blocks \
        "dirty bitmap of v4k since a vs the blocks that differ" \
        dirty "$WORK/dirty-v4k-a/map.json" diff "$WORK/dirty-v4k-a/real.json"
    expect_fail "a bitmap of another volume's snapshot is not offered" \
        nbdinfo --map=qemu:dirty-bitmap:s1 "$V4K"
fi

# --- a volume beyond 4 GiB (snapvol) ------------------------------------------------------
# Offsets and extents past 32 bits: extents longer than 4 GiB must be split for 32-bit
# block status replies (nbdinfo 1.14 has no extended headers; qemu 8.2+ has them).
if snapvol_only "an 8 GiB sparse volume"; then
    log "8 GiB volume"
    BIG=$(uri_of big)
    G=$((1024 * 1024 * 1024))
    must "create volume big (8 GiB) through the daemon" sv volume create big --size 8G
    must "writes past 4 GiB" qemu-io -f raw -c "write -P 0x61 $((5 * G)) 64k" \
        -c "write -P 0x62 $((8 * G - 4096)) 4k" -c "write -P 0x63 $((4 * G - 2048)) 4096" "$BIG"
    check "reads past 4 GiB" qemu-io -r -f raw -c "read -P 0x61 $((5 * G)) 64k" \
        -c "read -P 0x62 $((8 * G - 4096)) 4k" -c "read -P 0x63 $((4 * G - 2048)) 4096" \
        -c "read -P 0 $((6 * G)) 64k" "$BIG"
    check "nbdinfo --map of 8 GiB" nbdinfo --map --json "$BIG"
    cp "$WORK/.check.out" "$WORK/big-map.json"
    check "nbdinfo --map of 8 GiB: extents contiguous over the whole export" "$PY" -c '
import json, sys
ext = json.load(open(sys.argv[1]))
pos = 0
for e in ext:
    assert e["offset"] == pos, f"gap or overlap at {pos}: {e}"
    assert e["length"] > 0, e
    pos += e["length"]
assert pos == int(sys.argv[2]), f"covers {pos}, expected {sys.argv[2]}"
data = [e for e in ext if not e["type"] & 2]
assert any(e["offset"] <= 5 * 2**30 < e["offset"] + e["length"] for e in data), f"5 GiB not data: {data}"
' "$WORK/big-map.json" $((8 * G))
    check "qemu-img map of 8 GiB" qemu-img map -f raw --output=json "$BIG"
    cp "$WORK/.check.out" "$WORK/big-qmap.json"
    check "qemu-img map of 8 GiB: contiguous, the writes past 4 GiB are data" "$PY" -c '
import json, sys
ext = json.load(open(sys.argv[1]))
pos = 0
for e in ext:
    assert e["start"] == pos, f"gap or overlap at {pos}: {e}"
    pos += e["length"]
assert pos == int(sys.argv[2]), f"covers {pos}, expected {sys.argv[2]}"
for off in (5 * 2**30, 8 * 2**30 - 4096, 4 * 2**30 - 2048):
    e = next(e for e in ext if e["start"] <= off < e["start"] + e["length"])
    assert e["data"] and not e["zero"], f"offset {off} reported as {e}"
' "$WORK/big-qmap.json" $((8 * G))
    must "snapshot create big@s" sv snapshot create big@s
    must "a write past 4 GiB after the snapshot" qemu-io -f raw -c "write -P 0x64 $((7 * G)) 4k" "$BIG"
    check "dirty bitmap of 8 GiB" nbdinfo --map=qemu:dirty-bitmap:s --json "$BIG"
    cp "$WORK/.check.out" "$WORK/big-dirty.json"
    check "snapvol diff big@s" sv diff big@s --json
    cp "$WORK/.check.out" "$WORK/big-diff.json"
    check "8 GiB: dirty bitmap equals snapvol diff" helper same-blocks "8 GiB dirty bitmap vs diff" \
        dirty "$WORK/big-dirty.json" diff "$WORK/big-diff.json"
    echo "{\"ranges\":[{\"offset\":$((7 * G)),\"length\":4096}]}" >"$WORK/big-written.json"
    check "8 GiB: the write at 7 GiB is dirty" helper subset-blocks "write at 7 GiB within the dirty bitmap" \
        diff "$WORK/big-written.json" dirty "$WORK/big-dirty.json"
    check "big@s reads the old data past 4 GiB" qemu-io -r -f raw -c "read -P 0 $((7 * G)) 4k" \
        -c "read -P 0x61 $((5 * G)) 64k" "$(uri_of big@s)"
fi

# --- volumes come and go while serving (snapvol) --------------------------------------------
if snapvol_only "volume delete while serving"; then
    must "create volume gone" sv volume create gone --size 1M
    check "the new volume is listed" nbdinfo --list --json "$URI"
    expect_output_has "volume gone listed" '"export-name": "gone"'
    check "delete volume gone through the daemon" sv volume delete gone
    check "nbdinfo --list after the delete" nbdinfo --list --json "$URI"
    CHECKS=$((CHECKS + 1))
    grep -q '"export-name": "gone"' "$WORK/.check.out" &&
        record_failure "a deleted volume is still listed" "expected: no export gone" "got: listed"
    expect_fail "a deleted volume cannot be opened" nbdinfo --size "$(uri_of gone)"
    expect_fail "a snapshot that does not exist cannot be opened" nbdinfo --size "$(uri_of vol@nosuch)"
fi

# --- snapvol serve with no arguments ------------------------------------------------------
if snapvol_only "serve with no arguments"; then
    if "$PY" -c 'import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 10809))' 2>/dev/null; then
        log "snapvol serve with no arguments"
        mkdir "$WORK/noargs"
        (cd "$WORK/noargs" && exec "$SNAPVOL" serve </dev/null >"$WORK/noargs.log" 2>&1) &
        NOARGS_PID=$!
        on_exit "kill $NOARGS_PID 2>/dev/null; wait $NOARGS_PID 2>/dev/null"
        _wait_log "$NOARGS_PID" "$WORK/noargs.log" "snapvol: serving" 30
        check "no-args serve: the empty export name on 127.0.0.1:10809" nbdinfo --json nbd://127.0.0.1
        cp "$WORK/.check.out" "$WORK/noargs.json"
        expect_eq "no-args serve: default export size (1 GiB)" 1073741824 \
            "$(j "$WORK/noargs.json" exports.0.export-size)"
        check "no-args serve: export default" nbdinfo --size nbd://127.0.0.1/default
        expect_eq "no-args serve: export default is 1 GiB" 1073741824 "$(cat "$WORK/.check.out")"
        kill -TERM "$NOARGS_PID"
        rc=0
        wait "$NOARGS_PID" || rc=$?
        expect_eq "no-args serve: exit status after SIGTERM" 0 "$rc"
    else
        log "port 10809 is busy: not testing serve with no arguments"
    fi
fi
