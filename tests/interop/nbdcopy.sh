#!/usr/bin/env bash
# nbdcopy with several connections (multi-conn) both ways, sparse copies that must zero what
# was there, NBD to NBD, and (snapvol) snapshot exports read by nbdcopy equal `snapvol export`.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
require_cmds nbdcopy nbdinfo

start_server 64M
MIB=$((1024 * 1024))

FULL="$WORK/full.img"   # no zero block anywhere
SPARSE="$WORK/sparse.img"
head -c "$SIZE" /dev/urandom >"$FULL"
helper make-image "$SPARSE" "$SIZE" 3

log "file -> NBD -> file, 4 connections"
must "nbdcopy --connections=4 a full image into the export" \
    nbdcopy --connections=4 "$FULL" "$URI"
must "nbdcopy --connections=4 the export out" nbdcopy --connections=4 "$URI" "$WORK/out1.img"
expect_same_file "round trip of a full image (4 connections)" "$FULL" "$WORK/out1.img"

# The sparse image over the full one: its holes must come out as zeros (nbdcopy zeroes them
# with WRITE_ZEROES, or writes zeros).
must "nbdcopy --connections=4 a sparse image over it" \
    nbdcopy --connections=4 --requests=32 "$SPARSE" "$URI"
must "nbdcopy the export out (one connection)" nbdcopy --connections=1 "$URI" "$WORK/out2.img"
expect_same_file "round trip of a sparse image over old data" "$SPARSE" "$WORK/out2.img"
must "nbdcopy --connections=4 --request-size=1M out" \
    nbdcopy --connections=4 --request-size=$MIB "$URI" "$WORK/out3.img"
expect_same_file "round trip with 1 MiB requests" "$SPARSE" "$WORK/out3.img"
check "nbdcopy --flush into the export" nbdcopy --connections=4 --flush "$FULL" "$URI"
check "nbdcopy out over TCP (4 connections)" nbdcopy --connections=4 "$TCP_URI" "$WORK/out4.img"
if [[ $TCP_SHARES_DATA == 1 ]]; then
    expect_same_file "TCP copy out equals the data written over the unix socket" "$FULL" "$WORK/out4.img"
fi

# Streams: nbdcopy through a pipe (no extents, sequential writes).
log "pipes"
check "nbdcopy from a pipe into the export" \
    sh -c "cat '$SPARSE' | nbdcopy --connections=4 - '$URI'"
check "nbdcopy from the export to a pipe" \
    sh -c "nbdcopy --connections=4 '$URI' - >'$WORK/out5.img'"
expect_same_file "pipe round trip" "$SPARSE" "$WORK/out5.img"

# NBD to NBD.
log "NBD -> NBD"
if [[ $AGAINST == snapvol ]]; then
    must "create volume vol2 through the daemon" sv volume create vol2 --size 64M
    DEST=$(uri_of vol2)
else
    DEST=$TCP_URI # a second nbdkit with its own memory
fi
must "nbdcopy --connections=4 from one export to another" nbdcopy --connections=4 "$URI" "$DEST"
must "nbdcopy the destination out" nbdcopy "$DEST" "$WORK/out6.img"
expect_same_file "NBD to NBD copy" "$SPARSE" "$WORK/out6.img"

# Snapshots: what nbdcopy reads from VOL@SNAP equals `snapvol export` and the data at the
# time of the snapshot, however much vol changes afterwards.
if snapvol_only "snapshot exports read by nbdcopy"; then
    log "snapshot exports"
    must "snapshot create vol@a" sv snapshot create vol@a
    must "nbdcopy --connections=4 the full image over vol" nbdcopy --connections=4 "$FULL" "$URI"
    must "snapshot create vol@b" sv snapshot create vol@b
    must "nbdcopy --connections=4 the sparse image over vol" nbdcopy --connections=4 "$SPARSE" "$URI"
    for s in a b; do
        must "nbdcopy --connections=4 vol@$s out" nbdcopy --connections=4 "$(uri_of "vol@$s")" "$WORK/snap-$s.img"
        must "snapvol export vol@$s" sv export "vol@$s" "$WORK/export-$s.img"
        expect_same_file "vol@$s over NBD equals snapvol export vol@$s" "$WORK/export-$s.img" "$WORK/snap-$s.img"
    done
    expect_same_file "vol@a holds the sparse image" "$SPARSE" "$WORK/snap-a.img"
    expect_same_file "vol@b holds the full image" "$FULL" "$WORK/snap-b.img"
    must "snapvol export vol" sv export vol "$WORK/export-live.img"
    expect_same_file "snapvol export of the live volume" "$SPARSE" "$WORK/export-live.img"
    expect_fail "nbdcopy into a snapshot export fails" nbdcopy "$FULL" "$(uri_of vol@a)"
    must "nbdcopy vol@a out again" nbdcopy "$(uri_of vol@a)" "$WORK/snap-a2.img"
    expect_same_file "the failed copy into vol@a changed nothing" "$SPARSE" "$WORK/snap-a2.img"
    # A snapshot copied into another volume over NBD.
    check "nbdcopy --connections=4 vol@b into vol2" nbdcopy --connections=4 "$(uri_of vol@b)" "$(uri_of vol2)"
    check "nbdcopy vol2 out" nbdcopy "$(uri_of vol2)" "$WORK/out7.img"
    expect_same_file "vol@b copied into vol2" "$FULL" "$WORK/out7.img"
fi

if snapvol_only "volume info counts the NBD writes"; then
    must "snapvol volume info vol --json" sv volume info vol --json
    cp "$WORK/.check.out" "$WORK/vol-info.json"
    written=$(helper json-get "$WORK/vol-info.json" counters.client_bytes_written)
    CHECKS=$((CHECKS + 1))
    ((written >= SIZE)) || record_failure "volume info: client_bytes_written counts the NBD writes" \
        "expected: at least $SIZE (one full copy)" "got:      $written"
    expect_eq "volume info: size" "$SIZE" "$(helper json-get "$WORK/vol-info.json" size)"
    check "volume info lists the snapshots a and b" "$PY" -c '
import json, sys
snaps = json.load(open(sys.argv[1]))["snapshots"]
names = [s["name"] if isinstance(s, dict) else s for s in snaps]
assert {"a", "b"} <= set(names), names
' "$WORK/vol-info.json"
fi
