#!/usr/bin/env bash
# ext4 end to end: the export as a file through nbdfuse (multi-conn), a loop device on it,
# mkfs.ext4, mount, files; (snapvol) a snapshot of the frozen file system, changes, the
# snapshot read through a second, read-only nbdfuse and mounted ro,noload with the old files
# intact; restore --force with the writer still connected; e2fsck clean and the old files
# back. Mounts, loop devices and FUSE mounts are undone at exit, also on failure.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
require_cmds nbdfuse fusermount3 losetup mkfs.ext4 e2fsck mount umount mountpoint fsfreeze sha256sum
require_root
[[ -e /dev/fuse ]] || skip "no /dev/fuse"

start_server 128M

# --- attach/detach helpers; each is safe to call again from the exit cleanup -------------

# fuse_attach DIR URI [-r]: the export as file DIR/nbd (nbdfuse in the background).
fuse_attach() {
    local dir=$1 uri=$2 ro=${3:-} i
    mkdir -p "$dir"
    nbdfuse ${ro:+-r} -P "$dir.pid" "$dir/nbd" "$uri" </dev/null >"$dir.log" 2>&1 &
    local pid=$!
    on_exit "fuse_detach '$dir'"
    for ((i = 0; i < 100; i++)); do
        [[ -s "$dir.pid" ]] && mountpoint -q "$dir" && return 0
        kill -0 "$pid" 2>/dev/null || die "nbdfuse $uri exited" "$(cat "$dir.log")"
        sleep 0.1
    done
    die "nbdfuse $uri not ready after 10 s" "$(cat "$dir.log")"
}

fuse_detach() {
    local dir=$1 i
    mountpoint -q "$dir" || return 0
    for ((i = 0; i < 50; i++)); do
        fusermount3 -u "$dir" 2>/dev/null && break
        sleep 0.2
    done
    if mountpoint -q "$dir"; then
        fusermount3 -u -z "$dir" 2>/dev/null
        record_failure "could not unmount nbdfuse at $dir"
    fi
    # nbdfuse exits once unmounted.
    local pid
    pid=$(cat "$dir.pid" 2>/dev/null || true)
    for ((i = 0; i < 50; i++)); do
        [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
}

# loop_attach VAR FILE [-r]: a loop device on FILE, its name stored in VAR.
loop_attach() {
    local dev
    dev=$(losetup ${3:+-r} -f --show "$2") || die "losetup $2 failed"
    on_exit "loop_detach $dev '$2'"
    printf -v "$1" '%s' "$dev"
}

loop_detach() {
    local dev=$1 file=$2 i
    # Only if it is still ours (the number may have been reused).
    losetup -n -O BACK-FILE "$dev" 2>/dev/null | grep -qF "$file" || return 0
    for ((i = 0; i < 50; i++)); do
        losetup -d "$dev" 2>/dev/null && return 0
        sleep 0.2
    done
    record_failure "could not detach $dev"
}

fs_mount() {
    mkdir -p "$3"
    must "mount $1 on $3 ($2)" mount -o "$2" "$1" "$3"
    on_exit "fs_umount '$3'"
}

fs_umount() {
    mountpoint -q "$1" || return 0
    fsfreeze -u "$1" 2>/dev/null || true
    umount "$1" 2>/dev/null || { sleep 1; umount "$1"; } || umount -l "$1"
}

# files_state DIR: name and sha256 of every file, sorted.
files_state() { (cd "$1" && find . -type f ! -path './lost+found/*' -print0 | sort -z | xargs -0 -r sha256sum); }

# --- the file system on the live volume -------------------------------------------------
log "nbdfuse + loop + mkfs.ext4"
FUSE="$WORK/fuse"
fuse_attach "$FUSE" "$URI"
expect_eq "nbdfuse file size" "$SIZE" "$(stat -c %s "$FUSE/nbd")"
loop_attach LOOP "$FUSE/nbd"
must "mkfs.ext4 on the export (with discard)" mkfs.ext4 -q -F -L interop "$LOOP"
FS="$WORK/fs"
fs_mount "$LOOP" rw "$FS"
head -c 4M /dev/urandom >"$FS/keep"
head -c 1M /dev/urandom >"$FS/to-delete"
head -c 12M /dev/urandom >"$FS/to-change"
mkdir -p "$FS/dir/sub"
for i in $(seq 1 50); do echo "small file $i" >"$FS/dir/sub/f$i"; done
ln -s ../keep "$FS/dir/link"
must "sync" sync
files_state "$FS" >"$WORK/state-before"
expect_eq "files written" 53 "$(wc -l <"$WORK/state-before")"

if snapvol_only "snapshot of the file system, read back, restore"; then
    # Frozen, the file system is clean on disk: the snapshot needs no journal replay.
    log "snapshot of the frozen file system"
    must "fsfreeze -f" fsfreeze -f "$FS"
    check "snapshot create vol@s1 (file system frozen)" sv snapshot create vol@s1
    snap_rc=$LAST_RC
    must "fsfreeze -u" fsfreeze -u "$FS"
    [[ $snap_rc -eq 0 ]] || exit 1

    log "changing the live file system"
    rm "$FS/to-delete"
    head -c 12M /dev/urandom >"$FS/to-change"
    head -c 2M /dev/urandom >"$FS/new"
    rm -r "$FS/dir/sub"
    must "sync" sync
    files_state "$FS" >"$WORK/state-after"
    CHECKS=$((CHECKS + 1))
    cmp -s "$WORK/state-before" "$WORK/state-after" &&
        record_failure "the live file system did not change" "expected: different states" "got: equal"

    log "reading vol@s1 through a read-only nbdfuse"
    SFUSE="$WORK/sfuse"
    fuse_attach "$SFUSE" "$(uri_of vol@s1)" -r
    loop_attach SLOOP "$SFUSE/nbd" -r
    SFS="$WORK/sfs"
    fs_mount "$SLOOP" ro,noload "$SFS"
    files_state "$SFS" >"$WORK/state-snap"
    expect_eq "the snapshot holds the files as they were (names and sha256)" \
        "$(md5sum <"$WORK/state-before")" "$(md5sum <"$WORK/state-snap")"
    diff "$WORK/state-before" "$WORK/state-snap" >&2 || true
    expect_fail "the snapshot's nbdfuse file is read-only" dd if=/dev/zero of="$SFUSE/nbd" bs=4k count=1 conv=notrunc,nocreat
    fs_umount "$SFS"
    loop_detach "$SLOOP" "$SFUSE/nbd"
    fuse_detach "$SFUSE"

    log "unmount; restore with the nbdfuse writer still connected"
    fs_umount "$FS"
    loop_detach "$LOOP" "$FUSE/nbd"
    # nbdfuse still holds its connections to vol (idle writers).
    expect_fail "restore without --force refuses while a writer is connected" sv restore vol@s1
    check "restore vol@s1 --force (disconnects the writer)" sv restore vol@s1 --force
    fuse_detach "$FUSE"
    must "snapvol export vol@s1" sv export vol@s1 "$WORK/s1.img"
    must "snapvol export vol" sv export vol "$WORK/restored.img"
    expect_same_file "after restore, vol equals vol@s1" "$WORK/s1.img" "$WORK/restored.img"

    log "e2fsck and mount the restored volume"
    FUSE2="$WORK/fuse2"
    fuse_attach "$FUSE2" "$URI"
    loop_attach LOOP2 "$FUSE2/nbd"
    check "e2fsck -fn on the restored volume is clean" e2fsck -fn "$LOOP2"
    fs_mount "$LOOP2" rw "$FS"
    files_state "$FS" >"$WORK/state-restored"
    expect_eq "after restore the old files are back (names and sha256)" \
        "$(md5sum <"$WORK/state-before")" "$(md5sum <"$WORK/state-restored")"
    diff "$WORK/state-before" "$WORK/state-restored" >&2 || true
    # The restored file system is usable.
    head -c 1M /dev/urandom >"$FS/after-restore"
    must "sync" sync
    fs_umount "$FS"
    check "e2fsck -fn after writing to the restored file system" e2fsck -fn "$LOOP2"
    loop_detach "$LOOP2" "$FUSE2/nbd"
    fuse_detach "$FUSE2"
else
    log "unmount, e2fsck, mount again"
    fs_umount "$FS"
    check "e2fsck -fn after unmount is clean" e2fsck -fn "$LOOP"
    fs_mount "$LOOP" rw "$FS"
    files_state "$FS" >"$WORK/state-again"
    expect_eq "the files read back after a remount (names and sha256)" \
        "$(md5sum <"$WORK/state-before")" "$(md5sum <"$WORK/state-again")"
    fs_umount "$FS"
    loop_detach "$LOOP" "$FUSE/nbd"
    fuse_detach "$FUSE"
    # A new nbdfuse sees the same file system (the data reached the server).
    FUSE2="$WORK/fuse2"
    fuse_attach "$FUSE2" "$URI"
    loop_attach LOOP2 "$FUSE2/nbd"
    check "e2fsck -fn through a new nbdfuse connection" e2fsck -fn "$LOOP2"
    fs_mount "$LOOP2" ro "$FS"
    files_state "$FS" >"$WORK/state-new-conn"
    expect_eq "the files through a new connection" \
        "$(md5sum <"$WORK/state-before")" "$(md5sum <"$WORK/state-new-conn")"
    fs_umount "$FS"
    loop_detach "$LOOP2" "$FUSE2/nbd"
    fuse_detach "$FUSE2"
fi
