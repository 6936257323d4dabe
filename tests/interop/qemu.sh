#!/usr/bin/env bash
# QEMU's NBD client against the server: qemu-nbd --list, qemu-io patterns (plain, FUA,
# write-zeroes, discard, unaligned), qemu-img convert/compare over unix and TCP, qemu-img map,
# the read-only export, and (snapvol) a snapshot that keeps the converted image.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
require_cmds qemu-img qemu-io qemu-nbd nbdinfo

QEMU_VERSION=$(qemu-img --version | sed -nE '1s/^qemu-img version ([0-9]+\.[0-9]+(\.[0-9]+)?).*/\1/p')
start_server 64M
IMG="$WORK/in.img"
helper make-image "$IMG" $((16 * 1024 * 1024)) 1

# --- qemu-nbd --list --------------------------------------------------------------------
log "qemu-nbd --list"
make_ro_export
check "qemu-nbd --list over the unix socket" qemu-nbd --list -k "$SOCK"
cp "$WORK/.check.out" "$WORK/list.txt"
expect_output_has "qemu-nbd --list shows export vol" "^ *export: 'vol'$"
# The description line must directly follow the export line.
desc=$(awk '/^ *export: /{e=$0; getline; if (e ~ /export: .vol.$/) print}' "$WORK/list.txt")
expect_eq "qemu-nbd --list: export vol has a description line" "description:" \
    "$(sed -E 's/^ *(description:).*/\1/' <<<"$desc")"
CHECKS=$((CHECKS + 1))
[[ -n "$(sed -E 's/^ *description: *//' <<<"$desc")" ]] ||
    record_failure "qemu-nbd --list: export vol has an empty description" "got: $desc"
expect_output_has "qemu-nbd --list shows vol's size" "^ *size: +$SIZE$"
expect_output_has "qemu-nbd --list shows base:allocation" "^ *base:allocation$"
if snapvol_only "snapshots listed as VOL@SNAP exports with descriptions"; then
    expect_output_has "qemu-nbd --list shows the snapshot export vol@ro" "^ *export: 'vol@ro'$"
    desc=$(awk '/^ *export: /{e=$0; getline; if (e ~ /export: .vol@ro.$/) print}' "$WORK/list.txt")
    expect_eq "qemu-nbd --list: export vol@ro has a description line" "description:" \
        "$(sed -E 's/^ *(description:).*/\1/' <<<"$desc")"
    # snapvol offers extended headers; qemu 8.2 and later then use 64-bit transactions.
    if printf '%s\n' 8.2 "$QEMU_VERSION" | sort -C -V; then
        expect_output_has "qemu negotiates extended headers (transaction size: 64-bit)" \
            "transaction size: 64-bit"
    else
        log "qemu $QEMU_VERSION predates extended headers (8.2): not checking them"
    fi
    check "qemu-nbd --list over TCP" qemu-nbd --list -b 127.0.0.1 -p "$PORT"
    expect_output_has "qemu-nbd --list over TCP shows export vol" "^ *export: 'vol'$"
    expect_output_has "qemu-nbd --list over TCP shows export vol@ro" "^ *export: 'vol@ro'$"
fi

# --- qemu-img info ------------------------------------------------------------------------
check "qemu-img info on the export" qemu-img info --output=json "$URI"
cp "$WORK/.check.out" "$WORK/info.json"
expect_eq "qemu-img info: virtual-size" "$SIZE" "$(helper json-get "$WORK/info.json" virtual-size)"

# --- qemu-io ----------------------------------------------------------------------------
log "qemu-io patterns"
check "qemu-io write/read pattern 0xab" qemu-io -f raw -c 'write -P 0xab 0 64k' -c 'read -P 0xab 0 64k' "$URI"
check "qemu-io: pattern visible to a new connection" qemu-io -f raw -c 'read -P 0xab 0 64k' "$URI"
check "qemu-io: unaligned write inside written data" qemu-io -f raw \
    -c 'write -P 0xcd 1000 3000' -c 'read -P 0xab 0 1000' -c 'read -P 0xcd 1000 3000' \
    -c 'read -P 0xab 4000 61536' "$URI"
check "qemu-io: write with FUA, then flush" qemu-io -f raw \
    -c 'write -f -P 0x11 1M 128k' -c 'flush' -c 'read -P 0x11 1M 128k' "$URI"
check "qemu-io: write-zeroes over data reads zeros" qemu-io -f raw \
    -c 'write -P 0x22 2M 256k' -c 'write -z 2M 64k' -c 'write -z -u 2112k 64k' \
    -c 'read -P 0 2M 128k' -c 'read -P 0x22 2176k 128k' "$URI"
check "qemu-io: unaligned write-zeroes" qemu-io -f raw \
    -c 'write -P 0x33 3M 64k' -c 'write -z 3076k 1000' -c 'read -P 0x33 3M 4k' \
    -c 'read -P 0 3076k 1000' -c 'read -P 0x33 3150824 500' "$URI"
check "qemu-io: discard, then the area can be rewritten" qemu-io -f raw \
    -c 'write -P 0x44 4M 128k' -c 'discard 4M 128k' -c 'write -P 0x45 4M 64k' \
    -c 'read -P 0x45 4M 64k' "$URI"
check "qemu-io: many requests in flight (aio)" qemu-io -f raw \
    -c 'aio_write -P 0x51 5M 64k' -c 'aio_write -P 0x52 5184k 64k' -c 'aio_write -P 0x53 5248k 4k' \
    -c 'aio_flush' -c 'aio_read -P 0x51 5M 64k' -c 'aio_read -P 0x52 5184k 64k' \
    -c 'aio_read -P 0x53 5248k 4k' -c 'aio_flush' "$URI"
check "qemu-io: write and read the last block of the export" qemu-io -f raw \
    -c "write -P 0x66 $((SIZE - 4096)) 4k" -c "read -P 0x66 $((SIZE - 4096)) 4k" \
    -c "write -z $((SIZE - 4096)) 4k" -c "read -P 0 $((SIZE - 4096)) 4k" "$URI"
expect_fail "qemu-io: read past the end of the export fails" qemu-io -f raw -c "read $SIZE 4k" "$URI"
check "qemu-io over TCP" qemu-io -f raw -c 'write -P 0x77 6M 64k' -c 'read -P 0x77 6M 64k' "$TCP_URI"
if [[ $TCP_SHARES_DATA == 1 ]]; then
    check "qemu-io: a TCP write is seen over the unix socket" qemu-io -f raw -c 'read -P 0x77 6M 64k' "$URI"
fi

# --- read-only export ---------------------------------------------------------------------
log "read-only export $RO_URI"
check "qemu-io -r reads the read-only export" qemu-io -r -f raw -c 'read 0 64k' "$RO_URI"
expect_fail "qemu-io cannot write to the read-only export" qemu-io -f raw -c 'write -P 1 0 4k' "$RO_URI"
if snapvol_only "the snapshot holds the volume's contents when it was taken"; then
    # vol@ro was taken before the qemu-io writes above: it reads as zeros there.
    check "snapshot vol@ro reads zeros where vol was written later" \
        qemu-io -r -f raw -c 'read -P 0 0 64k' -c 'read -P 0 1M 128k' "$RO_URI"
fi

# --- qemu-img convert / compare -----------------------------------------------------------
log "qemu-img convert in and out"
must "qemu-img convert a 16 MiB image into the export" \
    qemu-img convert -n -f raw -O raw "$IMG" "$URI"
check "qemu-img compare: the export equals the image (the rest zero)" \
    qemu-img compare -f raw -F raw "$IMG" "$URI"
check "qemu-img convert the export out to a file" qemu-img convert -f raw -O raw "$URI" "$WORK/out.img"
expect_same_file "converted-out image equals the input (first 16 MiB)" "$IMG" "$WORK/out.img" $((16 * 1024 * 1024))
expect_eq "converted-out image has the export's size" "$SIZE" "$(stat -c %s "$WORK/out.img")"
check "the rest of the export reads as zeros" \
    qemu-io -r -f raw -c "read -P 0 16M $((SIZE - 16 * 1024 * 1024))" "$URI"

IMG2="$WORK/in2.img"
helper make-image "$IMG2" $((16 * 1024 * 1024)) 2
must "qemu-img convert a second image over TCP (16 coroutines, out-of-order writes)" \
    qemu-img convert -n -m 16 -W -f raw -O raw "$IMG2" "$TCP_URI"
check "qemu-img compare over TCP" qemu-img compare -f raw -F raw "$IMG2" "$TCP_URI"
if [[ $TCP_SHARES_DATA == 1 ]]; then
    check "qemu-img compare over the unix socket sees the TCP convert" \
        qemu-img compare -f raw -F raw "$IMG2" "$URI"
fi
expect_fail "qemu-img compare notices a different image" qemu-img compare -f raw -F raw "$IMG" "$TCP_URI"
expect_output_has "qemu-img compare reports a content mismatch (not an error)" "Content mismatch"

# --- qemu-img map --------------------------------------------------------------------------
log "qemu-img map"
# What the unix export holds now: the TCP convert went to the same export only on snapvol.
if [[ $TCP_SHARES_DATA == 1 ]]; then CUR_IMG=$IMG2; else CUR_IMG=$IMG; fi
check "qemu-img map --output=json" qemu-img map -f raw --output=json "$URI"
cp "$WORK/.check.out" "$WORK/map.json"
# 48 MiB past the image were never written (only zeroed by convert -n at most): some of it
# must be reported as zero.
check "qemu-img map: contiguous, zero extents read as zero, unwritten space reported zero" \
    helper check-map qemu "$WORK/map.json" "$CUR_IMG" "$SIZE" --min-zero $((32 * 1024 * 1024))

# --- snapshot (snapvol) ------------------------------------------------------------------
if snapvol_only "qemu-img compare against a snapshot export"; then
    must "snapshot create vol@s1" sv snapshot create vol@s1
    S1=$(uri_of vol@s1)
    check "qemu-img compare: vol@s1 equals the image" qemu-img compare -f raw -F raw "$IMG2" "$S1"
    must "qemu-img convert the first image into vol" qemu-img convert -n -f raw -O raw "$IMG" "$URI"
    check "qemu-img compare: vol@s1 still equals the second image" \
        qemu-img compare -f raw -F raw "$IMG2" "$S1"
    check "qemu-img compare: vol equals the first image" qemu-img compare -f raw -F raw "$IMG" "$URI"
    check "discard and write-zeroes on vol after the snapshot" qemu-io -f raw \
        -c 'discard 0 4M' -c 'write -z -u 4M 4M' -c 'write -z 8M 1M' -c 'read -P 0 4M 4M' "$URI"
    check "qemu-img compare: vol@s1 unchanged by discard and write-zeroes on vol" \
        qemu-img compare -f raw -F raw "$IMG2" "$S1"
    check "qemu-img map on the snapshot export" qemu-img map -f raw --output=json "$S1"
    cp "$WORK/.check.out" "$WORK/map-s1.json"
    check "qemu-img map of vol@s1: contiguous, zero extents read as zero" \
        helper check-map qemu "$WORK/map-s1.json" "$IMG2" "$SIZE"
    # The dirty bitmap the way qemu's backup clients read it (x-dirty-bitmap): vol changed
    # since s1 where the first image differs from the second.
    check "qemu-img map with x-dirty-bitmap=qemu:dirty-bitmap:s1" qemu-img map --output=json \
        --image-opts "driver=nbd,server.type=unix,server.path=$SOCK,export=vol,x-dirty-bitmap=qemu:dirty-bitmap:s1"
    cp "$WORK/.check.out" "$WORK/qemu-dirty.json"
    check "snapvol diff vol@s1" sv diff vol@s1 --json
    cp "$WORK/.check.out" "$WORK/diff-s1.json"
    check "qemu's view of qemu:dirty-bitmap:s1 equals snapvol diff vol@s1" helper same-blocks \
        "qemu-img map x-dirty-bitmap vs snapvol diff" qemu-dirty "$WORK/qemu-dirty.json" diff "$WORK/diff-s1.json"
    helper differing-blocks "$IMG" "$IMG2" "$WORK/real-s1.json"
    check "every block where the images differ is dirty in qemu's view" helper subset-blocks \
        "differing blocks within qemu's dirty view" diff "$WORK/real-s1.json" qemu-dirty "$WORK/qemu-dirty.json"
    check "qemu-img convert out of the snapshot over TCP" \
        qemu-img convert -f raw -O raw "nbd://127.0.0.1:$PORT/vol@s1" "$WORK/s1.img"
    expect_same_file "vol@s1 converted out over TCP equals the second image" "$IMG2" "$WORK/s1.img" $((16 * 1024 * 1024))
fi
