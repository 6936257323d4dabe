#!/usr/bin/env bash
# nbd-client, the user-space half of the Linux kernel's NBD client, against the server. This
# machine has no nbd kernel module, so what is tested is what runs without it: the
# fixed-newstyle negotiation and the export list (`nbd-client -l`, NBD_OPT_LIST) over TCP
# and over the unix socket. Connecting a /dev/nbdN device (NBD_OPT_GO, then the kernel's
# transmission) is not tested here.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
require_cmds nbd-client

start_server 64M
make_ro_export

log "nbd-client -l over TCP"
check "nbd-client -l over TCP" nbd-client -l 127.0.0.1 "$PORT"
expect_output_has "nbd-client -l lists export vol" '^vol(:|$)'
if [[ $AGAINST == snapvol ]]; then
    expect_output_has "nbd-client -l lists the snapshot vol@ro with its description" \
        '^vol@ro: snapshot of vol taken '
    expect_output_has "nbd-client -l shows the volume's description" '^vol: volume, 64(\.0)? MiB'

    log "nbd-client -l over the unix socket"
    check "nbd-client -l over the unix socket" nbd-client -u "$SOCK" -l
    expect_output_has "nbd-client -l (unix) lists export vol" '^vol(:|$)'
    expect_output_has "nbd-client -l (unix) lists vol@ro" '^vol@ro:'
fi
