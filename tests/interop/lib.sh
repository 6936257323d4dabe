# Shared code for the interop scripts; sourced, not run.
#
# Every script runs against one server, chosen by INTEROP_AGAINST:
#   snapvol (default)  `$SNAPVOL serve` on a fresh data directory, with a unix socket and a
#                      free TCP port on 127.0.0.1; volume `vol` is created through the CLI
#                      against the running daemon.
#   nbdkit             `nbdkit memory`, the reference server: proves that a check tests the
#                      NBD protocol and not a snapvol quirk. It has no snapshots and no dirty
#                      bitmaps, so the snapvol-only parts of a script are skipped.
#
# The scripts talk to the server only through the URIs set by start_server:
#   URI      nbd+unix:///vol?socket=...  (read-write export `vol`)
#   TCP_URI  nbd://127.0.0.1:PORT/vol    (snapvol: the same export; nbdkit: a second nbdkit
#                                         with its own memory, see TCP_SHARES_DATA)
#   RO_URI   a read-only export, set by make_ro_export (snapvol: a snapshot `vol@ro`;
#            nbdkit: a third nbdkit started with -r)
#
# Exit status of a script: 0 passed, 1 failed, 77 skipped (a required tool is missing; the
# reason is printed). Checks record a failure and go on, so one run reports every failure; a
# step that later steps depend on aborts the script with `must`/`die`.

set -euo pipefail
shopt -s inherit_errexit

INTEROP_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$INTEROP_DIR/../.." && pwd)
AGAINST=${INTEROP_AGAINST:-snapvol}
SNAPVOL=${SNAPVOL:-$REPO_DIR/target/debug/snapvol}
[[ $SNAPVOL == /* ]] || SNAPVOL="$PWD/$SNAPVOL"
SCRIPT=$(basename "$0")
# Helpers need only the standard library; prefer the system interpreter (the one with libnbd).
if [[ -x /usr/bin/python3 ]]; then PY=/usr/bin/python3; else PY=python3; fi
HELPERS="$INTEROP_DIR/helpers.py"

case "$AGAINST" in
    snapvol | nbdkit) ;;
    *)
        echo "$SCRIPT: INTEROP_AGAINST must be snapvol or nbdkit, not '$AGAINST'" >&2
        exit 2
        ;;
esac

FAILURES=0
CHECKS=0
WORK=""
CLEANUPS=()
SERVER_PIDS=()

log() { printf '%s [%s] %s\n' "$(date +%T)" "$SCRIPT" "$*" >&2; }

# A failed check: printed at once, counted, and the script goes on.
record_failure() {
    FAILURES=$((FAILURES + 1))
    {
        echo "FAIL ($SCRIPT against $AGAINST): $1"
        shift
        local line
        for line in "$@"; do echo "    $line"; done
    } >&2
}

die() {
    record_failure "$@"
    exit 1
}

skip() {
    echo "SKIP ($SCRIPT): $*"
    SKIPPING=1
    exit 77
}

# Runs at exit: cleanups in reverse order, then the verdict.
_on_exit() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    local i
    for ((i = ${#CLEANUPS[@]} - 1; i >= 0; i--)); do
        eval "${CLEANUPS[$i]}"
    done
    if [[ -n "$WORK" && -d "$WORK" ]]; then
        if [[ $FAILURES -gt 0 && -n "${INTEROP_KEEP:-}" ]]; then
            echo "$SCRIPT: kept $WORK" >&2
        else
            rm -rf "$WORK"
        fi
    fi
    if [[ -n "${SKIPPING:-}" ]]; then
        exit 77
    fi
    if [[ $rc -ne 0 && $FAILURES -eq 0 ]]; then
        echo "FAIL ($SCRIPT against $AGAINST): script aborted with status $rc (see the output above)" >&2
        FAILURES=1
    fi
    if [[ $FAILURES -gt 0 ]]; then
        echo "$SCRIPT against $AGAINST: $FAILURES of $CHECKS checks failed" >&2
        exit 1
    fi
    echo "$SCRIPT against $AGAINST: all $CHECKS checks passed"
    exit 0
}
trap _on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# on_exit 'shell code': run at exit, latest first (so a mount is undone before the device
# under it).
on_exit() { CLEANUPS+=("$1"); }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/snapvol-interop.XXXXXX")
# Wrappers as real commands, so that `timeout` can run them:
#   nbdsh  runs on the system python (the PATH may start with a python3 without libnbd)
#   sv     the snapvol CLI on the test's data directory (written by start_server)
mkdir "$WORK/bin"
if _nbdsh=$(command -v nbdsh); then
    printf '#!/bin/sh\nPATH=/usr/bin:$PATH exec %q "$@"\n' "$_nbdsh" >"$WORK/bin/nbdsh"
    chmod +x "$WORK/bin/nbdsh"
fi
#   helper tests/interop/helpers.py SUBCOMMAND ARGS...
printf '#!/bin/sh\nexec %q %q "$@"\n' "$PY" "$HELPERS" >"$WORK/bin/helper"
chmod +x "$WORK/bin/helper"
PATH="$WORK/bin:$PATH"

require_cmds() {
    local missing=() c
    for c in "$@"; do
        command -v "$c" >/dev/null 2>&1 || missing+=("$c")
    done
    if ((${#missing[@]} > 0)); then
        skip "missing tools: ${missing[*]}"
    fi
}

require_root() {
    [[ $(id -u) -eq 0 ]] || skip "needs root (loop devices, mount)"
}

# The interpreter that has libnbd's python module (python3-libnbd installs it for the system
# python, which may not be the python3 on PATH).
find_nbd_python() {
    local p
    for p in "${NBD_PYTHON:-}" /usr/bin/python3 python3; do
        [[ -n "$p" ]] || continue
        if "$p" -c 'import nbd' >/dev/null 2>&1; then
            NBD_PYTHON=$p
            return 0
        fi
    done
    skip "no python3 with the libnbd module (python3-libnbd)"
}

# --- checks -------------------------------------------------------------------------------

# expect_eq DESC EXPECTED ACTUAL
expect_eq() {
    CHECKS=$((CHECKS + 1))
    if [[ "$2" != "$3" ]]; then
        record_failure "$1" "expected: $2" "got:      $3"
        return 0
    fi
}

# _run OUTFILE cmd...: runs the command (with a time limit) with stdin from /dev/null, output
# to OUTFILE; returns its status.
_run() {
    local out=$1
    shift
    local rc=0
    timeout -k 5 "${INTEROP_CMD_TIMEOUT:-120}" "$@" </dev/null >"$out" 2>&1 || rc=$?
    if [[ $rc -eq 124 ]]; then
        echo "(timed out after ${INTEROP_CMD_TIMEOUT:-120}s)" >>"$out"
    fi
    return $rc
}

_show_output() {
    local out=$1
    if [[ -s "$out" ]]; then
        echo "    output (last 30 lines):"
        tail -n 30 "$out" | sed 's/^/      /'
    fi
}

# check DESC cmd...: the command must exit 0; a failure is recorded and the script goes on.
# Always returns 0; LAST_RC holds the command's status. Its output is in $WORK/.check.out.
check() {
    local desc=$1
    shift
    CHECKS=$((CHECKS + 1))
    local out="$WORK/.check.out"
    LAST_RC=0
    _run "$out" "$@" || LAST_RC=$?
    if [[ $LAST_RC -ne 0 ]]; then
        record_failure "$desc" "command: $(_quote "$@")" "expected: exit 0" "got:      exit $LAST_RC"
        _show_output "$out" >&2
    elif [[ -n "${INTEROP_VERBOSE:-}" ]]; then
        echo "ok: $desc" >&2
        head -c 2000 "$out" | sed 's/^/    /' >&2
    fi
    return 0
}

# must DESC cmd...: like check, but a failure ends the script (later steps depend on it).
must() {
    check "$@"
    [[ $LAST_RC -eq 0 ]] || exit 1
}

# expect_fail DESC cmd...: the command must exit non-zero (and not time out). Always returns
# 0; its output is in $WORK/.check.out for a further look.
expect_fail() {
    local desc=$1
    shift
    CHECKS=$((CHECKS + 1))
    local out="$WORK/.check.out"
    LAST_RC=0
    _run "$out" "$@" || LAST_RC=$?
    if [[ $LAST_RC -eq 0 || $LAST_RC -eq 124 ]]; then
        record_failure "$desc" "command: $(_quote "$@")" "expected: a non-zero exit" "got:      exit $LAST_RC"
        _show_output "$out" >&2
    fi
    return 0
}

# expect_output_has DESC PATTERN: the last check's output matches the grep -E PATTERN.
expect_output_has() {
    CHECKS=$((CHECKS + 1))
    if ! grep -qE -- "$2" "$WORK/.check.out"; then
        record_failure "$1" "expected: output matching /$2/" "got:"
        _show_output "$WORK/.check.out" >&2
    fi
}

# expect_same_file DESC EXPECTED_FILE ACTUAL_FILE [BYTES]: byte equality (of the first BYTES).
expect_same_file() {
    local desc=$1 a=$2 b=$3 n=${4:-}
    CHECKS=$((CHECKS + 1))
    local res
    if [[ -n "$n" ]]; then
        res=$(cmp -n "$n" "$a" "$b" 2>&1) && return 0
    else
        res=$(cmp "$a" "$b" 2>&1) && return 0
    fi
    record_failure "$desc" "expected: $b to equal $a${n:+ (first $n bytes)}" "got:      $res"
    return 0
}

_quote() {
    local s="" a
    for a in "$@"; do s+="$(printf '%q' "$a") "; done
    printf '%s' "${s% }"
}

# --- servers ------------------------------------------------------------------------------

free_port() {
    "$PY" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

uri_of() { echo "nbd+unix:///$1?socket=$SOCK"; }

# wait_ready PID LOGFILE PATTERN SECONDS: until PATTERN shows in LOGFILE; dies if PID exits.
_wait_log() {
    local pid=$1 logf=$2 pattern=$3 secs=$4 i
    for ((i = 0; i < secs * 10; i++)); do
        if grep -q -- "$pattern" "$logf" 2>/dev/null; then
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            die "server exited before it was ready" "log ($logf):" "$(tail -n 20 "$logf")"
        fi
        sleep 0.1
    done
    die "server not ready after ${secs}s (no '$pattern' in its log)" "$(tail -n 20 "$logf")"
}

_wait_uri() {
    local pid=$1 uri=$2 logf=$3 i
    for ((i = 0; i < 100; i++)); do
        if nbdinfo --size "$uri" >/dev/null 2>&1; then
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || die "server exited before it was ready" "$(tail -n 20 "$logf")"
        sleep 0.1
    done
    die "server not answering at $uri after 10s" "$(tail -n 20 "$logf")"
}

# start_server SIZE [CHUNK]: a server with a read-write export `vol` of SIZE bytes
# (suffixes K/M/G). CHUNK is snapvol's --chunk-size (ignored for nbdkit).
start_server() {
    SIZE_STR=$1
    SIZE=$(_bytes "$1")
    local chunk=${2:-}
    SOCK="$WORK/nbd.sock"
    PORT=$(free_port) # nbdkit; snapvol picks its own
    URI=$(uri_of vol)
    TCP_URI="nbd://127.0.0.1:$PORT/vol"
    RO_URI=""
    if [[ $AGAINST == snapvol ]]; then
        [[ -x "$SNAPVOL" ]] || die "no snapvol binary at $SNAPVOL (set SNAPVOL)"
        TCP_SHARES_DATA=1
        DATA="$WORK/data"
        mkdir -p "$DATA"
        printf '#!/bin/sh\nexec %q --data-dir %q "$@"\n' "$SNAPVOL" "$DATA" >"$WORK/bin/sv"
        chmod +x "$WORK/bin/sv"
        SERVER_LOG="$WORK/server.log"
        on_exit stop_snapvol
        _launch_snapvol
        must "create volume vol through the running daemon" \
            sv volume create vol --size "$SIZE_STR" ${chunk:+--chunk-size "$chunk"}
        must "the new volume is served" nbdinfo --size "$URI"
    else
        require_cmds nbdkit
        TCP_SHARES_DATA=0
        SERVER_LOG="$WORK/nbdkit.log"
        _start_nbdkit -U "$SOCK"
        _wait_uri "${SERVER_PIDS[-1]}" "$URI" "$SERVER_LOG"
        _start_nbdkit -i 127.0.0.1 -p "$PORT"
        _wait_uri "${SERVER_PIDS[-1]}" "$TCP_URI" "$SERVER_LOG"
    fi
    log "serving ($AGAINST): $URI and $TCP_URI, $SIZE bytes"
}

# The reference server: memory plugin, one advertised export `vol` with a description
# (exportname filter), advertised block size limits (blocksize-policy filter).
_start_nbdkit() {
    nbdkit -f --exit-with-parent "$@" \
        --filter=exportname --filter=blocksize-policy memory "$SIZE" \
        exportname-list=explicit exportname-strict=true exportname=vol default-export=vol \
        exportdesc=fixed:"nbdkit memory reference export" \
        blocksize-minimum=1 blocksize-preferred=4096 blocksize-maximum=32M \
        blocksize-error-policy=error \
        </dev/null >>"$SERVER_LOG" 2>&1 &
    SERVER_PIDS+=($!)
    on_exit "_stop_pid $!"
}

_stop_pid() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

_launch_snapvol() {
    # Port 0: the server picks a free port and names it in its ready line,
    # "snapvol: serving N volume(s) on 127.0.0.1:PORT, unix:PATH".
    : >"$SERVER_LOG"
    "$SNAPVOL" --data-dir "$DATA" serve --listen "127.0.0.1:0" --socket "$SOCK" \
        </dev/null >>"$SERVER_LOG" 2>&1 &
    SNAPVOL_PID=$!
    _wait_log "$SNAPVOL_PID" "$SERVER_LOG" "snapvol: serving" 30
    PORT=$(grep -m1 -oE 'snapvol: serving .*127\.0\.0\.1:[0-9]+' "$SERVER_LOG" | grep -oE '[0-9]+$') ||
        die "no TCP port in the ready line" "$(grep 'snapvol: serving' "$SERVER_LOG")"
    TCP_URI="nbd://127.0.0.1:$PORT/vol"
}

# restart_snapvol: SIGTERM (checked like at exit), then serve the same data directory again.
restart_snapvol() {
    cp "$SERVER_LOG" "$SERVER_LOG.$(date +%s%N)"
    stop_snapvol
    _launch_snapvol
    log "restarted: $URI and $TCP_URI"
}

# SIGTERM must end `snapvol serve` with status 0 (within the contract's 30 s for clients).
stop_snapvol() {
    [[ -n "${SNAPVOL_PID:-}" ]] || return 0
    local pid=$SNAPVOL_PID i rc
    SNAPVOL_PID=""
    kill -0 "$pid" 2>/dev/null || {
        rc=0
        wait "$pid" || rc=$?
        record_failure "snapvol serve died during the test (exit $rc)" "$(tail -n 20 "$SERVER_LOG")"
        return 0
    }
    kill -TERM "$pid" 2>/dev/null || true
    # The contract: clients get at most 30 s to finish their requests.
    for ((i = 0; i < 350; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    CHECKS=$((CHECKS + 1))
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        record_failure "snapvol serve did not exit within 35 s of SIGTERM" "$(tail -n 20 "$SERVER_LOG")"
        return 0
    fi
    rc=0
    wait "$pid" || rc=$?
    if [[ $rc -ne 0 ]]; then
        record_failure "snapvol serve: SIGTERM should end it with exit 0" "expected: exit 0" \
            "got:      exit $rc" "$(tail -n 20 "$SERVER_LOG")"
    fi
    if grep -q 'panicked' "$SERVER_LOG"; then
        record_failure "snapvol serve panicked during the test" "$(grep -A5 panicked "$SERVER_LOG" | head -20)"
    fi
}

# make_ro_export: sets RO_URI to a read-only export. snapvol: snapshot `vol@ro` of the current
# contents; nbdkit: a separate `nbdkit -r` (its own, zeroed memory).
make_ro_export() {
    if [[ $AGAINST == snapvol ]]; then
        must "snapshot create vol@ro" sv snapshot create vol@ro
        RO_URI=$(uri_of vol@ro)
    else
        local rosock="$WORK/ro.sock"
        nbdkit -f --exit-with-parent -r -U "$rosock" --filter=exportname memory "$SIZE" \
            exportname-list=explicit exportname=vol@ro default-export=vol@ro \
            exportdesc=fixed:"nbdkit read-only reference export" \
            </dev/null >>"$SERVER_LOG" 2>&1 &
        SERVER_PIDS+=($!)
        on_exit "_stop_pid $!"
        RO_URI="nbd+unix:///vol@ro?socket=$rosock"
        _wait_uri "${SERVER_PIDS[-1]}" "$RO_URI" "$SERVER_LOG"
    fi
}

# snapvol_only WHAT: true against snapvol; against nbdkit logs that WHAT is skipped.
snapvol_only() {
    if [[ $AGAINST == snapvol ]]; then
        return 0
    fi
    log "not against $AGAINST (snapvol only): $*"
    return 1
}

_bytes() {
    local s=$1 n mult=1
    case "$s" in
        *K) mult=1024 ;;
        *M) mult=$((1024 * 1024)) ;;
        *G) mult=$((1024 * 1024 * 1024)) ;;
    esac
    n=${s%[KMG]}
    echo $((n * mult))
}

