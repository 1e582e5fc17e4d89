#!/bin/sh
# A real guest with vballoon as its virtio-balloon device: start the daemon, then QEMU.
#
#   examples/qemu-vballoon.sh [-m SIZE] [-- QEMU_ARGS...]
#
#   examples/qemu-vballoon.sh -m 4G -- -drive file=debian.qcow2,if=virtio -nographic
#   ACCEL=tcg examples/qemu-vballoon.sh -m 512M -- -kernel vmlinuz -initrd initrd.gz \
#       -append console=ttyS0 -serial stdio -display none
#
# Needs QEMU >= 10.2 (the user-creatable vhost-user-test-device-pci) and vballoon installed.
# Environment: QEMU (default qemu-system-x86_64), ACCEL (default kvm; tcg without KVM),
# PYTHON (default python3), RUNDIR (default $XDG_RUNTIME_DIR or /tmp).
#
# While the guest runs, steer the balloon and ask for free-page rounds from another shell:
#   vballoon ctl --control-socket RUN/control.sock query-balloon
#   vballoon ctl --control-socket RUN/control.sock balloon 3G
#   vballoon ctl --control-socket RUN/control.sock round start --wait
# (RUN is printed below.)  QEMU's own balloon/query-balloon do not reach a vhost-user balloon.
set -eu

MEM=1G
while [ $# -gt 0 ]; do
    case "$1" in
        -m) MEM=$2; shift 2 ;;
        --) shift; break ;;
        *) echo "usage: $0 [-m SIZE] [-- QEMU_ARGS...]" >&2; exit 2 ;;
    esac
done
QEMU=${QEMU:-qemu-system-x86_64}
PYTHON=${PYTHON:-python3}
RUN=$(mktemp -d "${RUNDIR:-${XDG_RUNTIME_DIR:-/tmp}}/vballoon.XXXXXX")
mkdir -m 700 "$RUN/exports"

# QEMU's num_vqs is the most queues the device may use (DESIGN.md: the driver's features pick
# the ones it does use).  Ask the device for it rather than hard-coding it.
NUM_VQS=$("$PYTHON" -c 'from vballoon.devices.balloon import Balloon; print(Balloon().max_queues())')

# Guest RAM must be shared memory (a memfd) for the back-end to map it; QEMU connects to the
# back-end once, at start-up, so the daemon must listen first: it says so on stdout.
mkfifo "$RUN/ready"
"$PYTHON" -m vballoon serve --socket-path "$RUN/vhost-user.sock" \
    --control-socket "$RUN/control.sock" --export-dir "$RUN/exports" >"$RUN/ready" &
DAEMON=$!
trap 'kill "$DAEMON" 2>/dev/null; wait "$DAEMON" 2>/dev/null; rm -rf "$RUN"' EXIT
trap 'exit 130' INT TERM
exec 3<"$RUN/ready"
if ! read -r READY <&3; then
    echo "$0: the daemon did not start" >&2
    exit 1
fi
echo "$READY; control socket $RUN/control.sock, exports in $RUN/exports" >&2

"$QEMU" \
    -machine q35,memory-backend=mem -accel "${ACCEL:-kvm}" -m "$MEM" \
    -object memory-backend-memfd,id=mem,size="$MEM",share=on \
    -chardev socket,id=vb,path="$RUN/vhost-user.sock" \
    -device vhost-user-test-device-pci,chardev=vb,virtio-id=5,num_vqs="$NUM_VQS",config_size=16 \
    "$@"
