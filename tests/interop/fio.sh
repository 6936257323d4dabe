#!/usr/bin/env bash
# fio's nbd engine with data verification, and (snapvol) snapshots taken between and during
# fio runs:
#   1. paused writes: fio writes A, snapshot, fio writes B, snapshot, fio rewrites all; each
#      snapshot export (CLI and NBD) equals the live volume copied out when it was taken;
#   2. snapshots in a loop while two fio jobs (two connections) write randomly with
#      verify=md5; each snapshot must be internally consistent: every 4 KiB block is zero or a
#      whole fio block for its own offset (header, crc32c, md5), the written blocks only grow
#      from one snapshot to the next, and what differs from the live volume is in
#      `snapvol diff`.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
require_cmds fio nbdcopy
fio --enghelp=nbd >/dev/null 2>&1 || skip "fio has no nbd engine (fio --enghelp=nbd)"

start_server 64M
MIB=$((1024 * 1024))
SECONDS_CONCURRENT=${INTEROP_FIO_SECONDS:-6}
cd "$WORK" # fio may leave state files in its working directory

# A fio job on the export with the nbd engine.
FIO_NBD=(fio --ioengine=nbd --uri="$URI" --verify_state_save=0)

# --- 1. snapshots between paused writes ---------------------------------------------------
log "fio with verify, snapshots between the runs"
must "fio A: random writes 4k-64k over [0, 16M) with verify=crc32c" "${FIO_NBD[@]}" --name=A \
    --rw=randwrite --bsrange=4k-64k --offset=0 --size=16M --iodepth=8 --randseed=1 \
    --verify=crc32c --do_verify=1 --verify_fatal=1
must "copy the live volume out after A" nbdcopy "$URI" "$WORK/after-A.img"
if snapvol_only "snapshots between fio runs"; then
    must "snapshot create vol@A" sv snapshot create vol@A
fi
must "fio B: random writes over [4M, 12M) with verify=md5" "${FIO_NBD[@]}" --name=B \
    --rw=randwrite --bs=16k --offset=4M --size=8M --iodepth=4 --randseed=2 \
    --verify=md5 --do_verify=1 --verify_fatal=1
must "copy the live volume out after B" nbdcopy "$URI" "$WORK/after-B.img"
CHECKS=$((CHECKS + 1))
cmp -s "$WORK/after-A.img" "$WORK/after-B.img" &&
    record_failure "fio B changed the volume" "expected: after-A.img != after-B.img" "got: equal"
if snapvol_only "snapshots between fio runs"; then
    must "snapshot create vol@B" sv snapshot create vol@B
fi
must "fio C: sequential rewrite of [0, 16M)" "${FIO_NBD[@]}" --name=C \
    --rw=write --bs=64k --offset=0 --size=16M --iodepth=4 --randseed=3 \
    --verify=crc32c --do_verify=1 --verify_fatal=1
if snapvol_only "snapshots between fio runs"; then
    for s in A B; do
        must "snapvol export vol@$s" sv export "vol@$s" "$WORK/export-$s.img"
        expect_same_file "vol@$s (snapvol export) equals the volume when it was taken" \
            "$WORK/after-$s.img" "$WORK/export-$s.img"
        must "nbdcopy vol@$s out" nbdcopy --connections=4 "$(uri_of "vol@$s")" "$WORK/nbd-$s.img"
        expect_same_file "vol@$s (over NBD) equals the volume when it was taken" \
            "$WORK/after-$s.img" "$WORK/nbd-$s.img"
    done
fi

# --- 2. snapshots while fio writes ------------------------------------------------------
log "fio for ${SECONDS_CONCURRENT}s on [32M, 64M), two connections, snapshots in a loop"
"${FIO_NBD[@]}" --name=concurrent --rw=randwrite --bs=4k --offset=32M --size=16M --offset_increment=16M \
    --numjobs=2 --iodepth=16 --time_based --runtime="$SECONDS_CONCURRENT" \
    --verify=md5 --verify_backlog=256 --verify_fatal=1 --randseed=4 \
    </dev/null >"$WORK/fio-concurrent.log" 2>&1 &
FIO_PID=$!
on_exit "kill $FIO_PID 2>/dev/null"
SNAPS=()
if snapvol_only "snapshots while fio writes"; then
    sleep 0.5
    for ((i = 1; i <= 20; i++)); do
        kill -0 "$FIO_PID" 2>/dev/null || break
        check "snapshot create vol@c$i while fio writes" sv snapshot create "vol@c$i"
        [[ $LAST_RC -eq 0 ]] && SNAPS+=("c$i")
        sleep 0.3
    done
fi
rc=0
wait "$FIO_PID" || rc=$?
CHECKS=$((CHECKS + 1))
if [[ $rc -ne 0 ]]; then
    record_failure "fio with verify while snapshots were taken" "expected: exit 0" "got: exit $rc" \
        "$(grep -iE 'verify|error|bad|fail' "$WORK/fio-concurrent.log" | head -20)"
fi
grep -E '^ +(write|read):' "$WORK/fio-concurrent.log" | sed 's/^ */    /' >&2 || true
must "copy the live volume out" nbdcopy --connections=4 "$URI" "$WORK/live.img"
check "the live volume: every block in [32M, 64M) is zero or a whole fio block" \
    helper fio-check "$WORK/live.img" 4096 $((32 * MIB)) $((64 * MIB)) --written-out "$WORK/written-live.json"

if ((${#SNAPS[@]} > 0)); then
    log "checking ${#SNAPS[@]} snapshots taken during fio"
    prev=""
    for s in "${SNAPS[@]}"; do
        must "snapvol export vol@$s" sv export "vol@$s" "$WORK/$s.img"
        check "vol@$s is consistent: every block in [32M, 64M) is zero or a whole fio block" \
            helper fio-check "$WORK/$s.img" 4096 $((32 * MIB)) $((64 * MIB)) \
            --written-out "$WORK/written-$s.json"
        if [[ -n "$prev" ]]; then
            check "blocks written in vol@$prev are written in vol@$s too" "$PY" -c '
import json, sys
a, b = (set(json.load(open(f))) for f in sys.argv[1:3])
missing = sorted(a - b)
assert not missing, f"{len(missing)} blocks written in the older snapshot are zero in the newer one, e.g. block {missing[:5]}"
' "$WORK/written-$prev.json" "$WORK/written-$s.json"
        fi
        must "snapvol diff vol@$s --json" sv diff "vol@$s" --json
        cp "$WORK/.check.out" "$WORK/diff-$s.json"
        helper differing-blocks "$WORK/$s.img" "$WORK/live.img" "$WORK/real-$s.json"
        check "what differs between vol@$s and the live volume is within snapvol diff vol@$s" \
            helper subset-blocks "blocks differing from vol@$s within its diff" \
            diff "$WORK/real-$s.json" diff "$WORK/diff-$s.json"
        prev=$s
    done
    last=${SNAPS[-1]}
    must "nbdcopy vol@$last out" nbdcopy --connections=4 "$(uri_of "vol@$last")" "$WORK/nbd-$last.img"
    expect_same_file "vol@$last over NBD equals snapvol export vol@$last" "$WORK/$last.img" "$WORK/nbd-$last.img"
    must "snapvol export vol@A again" sv export vol@A "$WORK/export-A2.img"
    expect_same_file "vol@A is unchanged after all the writes" "$WORK/after-A.img" "$WORK/export-A2.img"
elif [[ $AGAINST == snapvol ]]; then
    record_failure "no snapshot was taken while fio ran" "expected: at least one" "got: none"
fi

# --- 3. restore --force under load (snapvol) --------------------------------------------
if snapvol_only "restore --force while fio writes"; then
    log "restore --force while two fio connections write"
    must "snapshot create vol@base" sv snapshot create vol@base
    must "snapvol export vol@base" sv export vol@base "$WORK/base.img"
    "${FIO_NBD[@]}" --name=restore-load --rw=randwrite --bs=4k --offset=0 --size=32M \
        --offset_increment=32M --numjobs=2 --iodepth=32 --time_based --runtime=20 \
        --randseed=5 </dev/null >"$WORK/fio-restore.log" 2>&1 &
    FIO2_PID=$!
    on_exit "kill $FIO2_PID 2>/dev/null"
    sleep 1.5
    check "restore vol@base --force while fio writes" sv restore vol@base --force
    # The kicked writers end: fio stops on the dropped connections.
    for ((i = 0; i < 150; i++)); do
        kill -0 "$FIO2_PID" 2>/dev/null || break
        sleep 0.1
    done
    CHECKS=$((CHECKS + 1))
    if kill -0 "$FIO2_PID" 2>/dev/null; then
        record_failure "fio still running 15 s after restore --force (writers not disconnected?)"
        kill "$FIO2_PID" 2>/dev/null || true
    fi
    wait "$FIO2_PID" 2>/dev/null || true
    must "nbdcopy vol out after the restore" nbdcopy --connections=4 "$URI" "$WORK/restored.img"
    expect_same_file "after restore --force under load, vol equals vol@base (no late write landed)" \
        "$WORK/base.img" "$WORK/restored.img"
    sleep 1
    must "snapvol export vol a second later" sv export vol "$WORK/restored2.img"
    expect_same_file "vol still equals vol@base a second later" "$WORK/base.img" "$WORK/restored2.img"
    check "new writes after the restore" "${FIO_NBD[@]}" --name=after-restore --rw=randwrite \
        --bs=64k --offset=0 --size=8M --verify=crc32c --do_verify=1 --verify_fatal=1
fi
