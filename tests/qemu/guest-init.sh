#!/bin/sh
# /init of the vballoon test guest: busybox sh as PID 1 in a tiny initramfs
# (setup.sh copies this file in). It loads virtio_balloon (or, with
# lab.driver=bitmap on the kernel command line, guest/linux's
# virtio_balloon_bitmap, with the module parameters of lab.params=a=1,b=2:
# busybox insmod does not read them from the command line), then lets the host
# (harness.py) drive it over ttyS0 with a line protocol:
#
#   guest -> host, once per boot:  @@VB READY <boot_id> <kernel release> insmod=<rc>
#   host -> guest, per command:    <id> <shell command>           (one line)
#   guest -> host, per command:    @@VB BEGIN <id>
#                                  <stdout+stderr of the command>@@VB END <id> <rc>
#
# END follows the output directly, so output without a final newline is kept
# exact; <id> is unique per command, so output cannot fake a marker.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# Dirtying workloads write files here; tmpfs pages are ordinary guest RAM.
mount -t tmpfs -o size=90% tmpfs /tmp
module=virtio_balloon params=
for arg in $(cat /proc/cmdline); do
    case $arg in
        lab.driver=bitmap) module=virtio_balloon_bitmap ;;
        lab.params=*) params=$(echo "${arg#lab.params=}" | tr , ' ') ;;
    esac
done
# shellcheck disable=SC2086 # params: one word per module parameter
insmod /lib/$module.ko $params
ins=$?

exec </dev/ttyS0 >/dev/ttyS0 2>&1
# No echo (the host would read its own commands back), and no \n -> \r\n
# translation, so command output arrives byte for byte.
stty -echo -onlcr

echo "@@VB READY $(cat /proc/sys/kernel/random/boot_id) $(uname -r) insmod=$ins"
while :; do
    # PID 1 must never exit (that panics the kernel), so a failed read just retries.
    read -r id cmd || { sleep 1; continue; }
    [ -n "$id" ] || continue
    echo "@@VB BEGIN $id"
    sh -c "$cmd" </dev/null 2>&1
    echo "@@VB END $id $?"
done
