"""Linux primitives for write tracking: userfaultfd write-protect (async mode),
PAGEMAP_SCAN, and ptrace syscall injection.  ctypes only; x86-64 Linux >= 6.7.

Why these (MIGRATION.md, "Write tracking"): the machines have no soft-dirty, and soft-dirty's
read-then-clear is racy.  A userfaultfd registered with ``UFFD_FEATURE_WP_ASYNC`` lets the kernel
resolve write faults on protected pages by itself (no handler thread, the writer never blocks) and
leaves the page "written"; ``ioctl(PAGEMAP_SCAN)`` with ``PM_SCAN_WP_MATCHING`` then returns the
written pages **and re-protects them in the same page-table walk, under the page-table lock**: a
write lands either before the scan (reported now) or after it (faults again, reported next time).

A userfaultfd belongs to the mm of the process that called ``userfaultfd(2)``.  Every other ioctl
(UFFDIO_API, UFFDIO_REGISTER, UFFDIO_WRITEPROTECT) acts on that mm through the file, whoever calls
it.  So only the ``userfaultfd(2)`` call has to run inside the writer (QEMU): :func:`inject_userfaultfd`
makes the target call it through ptrace (seize, interrupt, point one thread at a ``syscall``
instruction, single-step, restore), takes the new file with ``pidfd_getfd(2)`` and closes the
target's copy.  The tracker then holds the only reference: if it dies, the kernel drops the
registration and the target runs untracked, unharmed.

Privileges: ptrace attach (CAP_SYS_PTRACE, or the same uid with Yama's ptrace_scope <= 1) for
the injection and ``pidfd_getfd``; reading ``/proc/PID/pagemap``.  The target calls
``userfaultfd(2)`` with its own credentials: without CAP_SYS_PTRACE and with
``vm.unprivileged_userfaultfd=0`` only ``UFFD_USER_MODE_ONLY`` is allowed, which async
write-protect does not need (kernel-mode writes are resolved before the user-mode check).
"""
from __future__ import annotations

import ctypes
import errno
import os
import platform

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.ptrace.restype = ctypes.c_long
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
libc.ioctl.restype = ctypes.c_int
libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]

SYS_close = 3
SYS_userfaultfd = 323
SYS_pidfd_getfd = 438

O_CLOEXEC = 0o2000000
O_NONBLOCK = 0o4000
UFFD_USER_MODE_ONLY = 1

UFFD_API = 0xAA
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15
WP_FEATURES = UFFD_FEATURE_WP_HUGETLBFS_SHMEM | UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_ASYNC
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_WRITEPROTECT_MODE_WP = 1


def _ioc(direction: int, type_: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (type_ << 8) | nr


_IOW, _IOR, _IOWR = 1, 2, 3


class uffdio_api(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class uffdio_range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class uffdio_register(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class uffdio_writeprotect(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", ctypes.c_uint64)]


UFFDIO_API = _ioc(_IOWR, 0xAA, 0x3F, ctypes.sizeof(uffdio_api))
UFFDIO_REGISTER = _ioc(_IOWR, 0xAA, 0x00, ctypes.sizeof(uffdio_register))
UFFDIO_UNREGISTER = _ioc(_IOR, 0xAA, 0x01, ctypes.sizeof(uffdio_range))
UFFDIO_WRITEPROTECT = _ioc(_IOWR, 0xAA, 0x06, ctypes.sizeof(uffdio_writeprotect))


class pm_scan_arg(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


class page_region(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64), ("categories", ctypes.c_uint64)]


PAGEMAP_SCAN = _ioc(_IOWR, ord("f"), 16, ctypes.sizeof(pm_scan_arg))
PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1
PAGE_IS_WPALLOWED = 1 << 0
PAGE_IS_WRITTEN = 1 << 1


class TrackingError(OSError):
    """Write tracking cannot be set up or was lost; the message says why and what is needed."""


def _err(what: str) -> TrackingError:
    e = ctypes.get_errno()
    return TrackingError(e, f"{what}: {os.strerror(e)}")


def ioctl(fd: int, request: int, arg: ctypes.Structure, what: str) -> int:
    r = libc.ioctl(fd, request, ctypes.byref(arg))
    if r < 0:
        raise _err(what)
    return r


def uffd_enable_wp_async(uffd: int) -> None:
    api = uffdio_api(api=UFFD_API, features=WP_FEATURES)
    try:
        ioctl(uffd, UFFDIO_API, api, "UFFDIO_API(WP_ASYNC | WP_UNPOPULATED | WP_HUGETLBFS_SHMEM)")
    except TrackingError as e:
        raise TrackingError(e.errno, f"{e.strerror}: the kernel lacks async userfaultfd "
                            "write-protect (Linux >= 6.7 with CONFIG_PTE_MARKER_UFFD_WP)") from None


def uffd_register_wp(uffd: int, start: int, length: int) -> None:
    reg = uffdio_register(range=uffdio_range(start, length), mode=UFFDIO_REGISTER_MODE_WP)
    ioctl(uffd, UFFDIO_REGISTER, reg, f"UFFDIO_REGISTER(WP) {start:#x}+{length:#x}")
    wp = uffdio_writeprotect(range=uffdio_range(start, length), mode=UFFDIO_WRITEPROTECT_MODE_WP)
    ioctl(uffd, UFFDIO_WRITEPROTECT, wp, f"UFFDIO_WRITEPROTECT {start:#x}+{length:#x}")


def uffd_unregister(uffd: int, start: int, length: int) -> None:
    r = uffdio_range(start, length)
    try:
        ioctl(uffd, UFFDIO_UNREGISTER, r, "UFFDIO_UNREGISTER")
    except TrackingError as e:
        if e.errno not in (errno.ENOMEM, errno.EINVAL, errno.ESRCH, errno.ENOENT):
            raise


def pagemap_scan_written(pagemap_fd: int, start: int, end: int, vec: ctypes.Array) -> list[tuple[int, int]]:
    """The written pages of [start, end) as (start, end) address ranges, re-protected
    atomically.  `vec` is a page_region array used as the kernel's output buffer."""
    out: list[tuple[int, int]] = []
    arg = pm_scan_arg(size=ctypes.sizeof(pm_scan_arg),
                      flags=PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                      start=start, end=end, vec=ctypes.addressof(vec), vec_len=len(vec),
                      category_mask=PAGE_IS_WRITTEN, return_mask=PAGE_IS_WRITTEN)
    while arg.start < end:
        n = ioctl(pagemap_fd, PAGEMAP_SCAN, arg, "PAGEMAP_SCAN")
        out.extend((vec[i].start, vec[i].end) for i in range(n))
        if arg.walk_end <= arg.start:
            raise TrackingError(errno.EIO, "PAGEMAP_SCAN made no progress")
        arg.start = arg.walk_end
    return out


def pidfd_getfd(pidfd: int, targetfd: int) -> int:
    r = libc.syscall(SYS_pidfd_getfd, pidfd, targetfd, 0)
    if r < 0:
        raise _err(f"pidfd_getfd(fd {targetfd})")
    return r


def userfaultfd_here() -> int:
    """A userfaultfd for this process's own mm (the daemon tracking itself)."""
    fd = libc.syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK)
    if fd < 0 and ctypes.get_errno() == errno.EPERM:
        fd = libc.syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY)
    if fd < 0:
        raise _err("userfaultfd()")
    return fd


# ----------------------------------------------------------------------------- ptrace

PTRACE_GETREGS, PTRACE_SETREGS = 12, 13
PTRACE_SINGLESTEP, PTRACE_DETACH = 9, 17
PTRACE_SEIZE, PTRACE_INTERRUPT = 0x4206, 0x4207
PTRACE_EVENT_STOP = 128
WALL = 0x40000000
_REGS = ("r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax rip cs eflags "
         "rsp ss fs_base gs_base ds es fs gs").split()


class user_regs(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in _REGS]


def _ptrace(req: int, pid: int, addr: int = 0, data: int = 0, what: str = "") -> None:
    if libc.ptrace(req, pid, ctypes.c_void_p(addr), ctypes.c_void_p(data)) < 0:
        raise _err(what or f"ptrace({req}, {pid})")


def _find_syscall_insn(pid: int) -> int:
    """Address of a `syscall` instruction (0f 05) in one of the target's executable mappings."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            f = line.split()
            if len(f) < 6 or "x" not in f[1] or not f[5].startswith("/") or "libc" not in f[5]:
                continue
            lo, hi = (int(x, 16) for x in f[0].split("-"))
            for base in range(lo, hi, 1 << 20):
                try:
                    data = os.pread(mem.fileno(), min(1 << 20, hi - base) + 1, base)
                except OSError:
                    break
                i = data.find(b"\x0f\x05")
                if i >= 0:
                    return base + i
    raise TrackingError(errno.ENOENT, f"no syscall instruction found in process {pid}'s libc")


def _wait_stop(pid: int, pending: list[int]) -> int:
    """Wait for the next stop of `pid`; return the stop signal. Unrelated signals are
    remembered in `pending` to be delivered at detach."""
    _, status = os.waitpid(pid, WALL)
    if os.WIFEXITED(status) or os.WIFSIGNALED(status):
        raise TrackingError(errno.ESRCH, f"process {pid} exited during syscall injection")
    return os.WSTOPSIG(status) | (status >> 16) << 8


def inject_syscalls(pid: int, calls: list[tuple[int, tuple[int, ...]]]) -> list[int]:
    """Make thread `pid` execute each syscall (nr, args) in turn; return their results
    (negative errno on failure).  Its registers are restored and it resumes unharmed.
    Must run in a process that is not `pid`'s parent (its child watcher would take the stops)."""
    insn = _find_syscall_insn(pid)
    try:
        _ptrace(PTRACE_SEIZE, pid, what=f"ptrace attach to process {pid}")
    except TrackingError as e:
        raise TrackingError(e.errno, f"{e.strerror}: write tracking needs to ptrace process "
                            f"{pid} (CAP_SYS_PTRACE, or same uid and kernel.yama.ptrace_scope "
                            "<= 1)") from None
    pending: list[int] = []
    results: list[int] = []
    try:
        _ptrace(PTRACE_INTERRUPT, pid, what="PTRACE_INTERRUPT")
        while True:
            sig = _wait_stop(pid, pending)
            if sig >> 8 == PTRACE_EVENT_STOP:
                break
            pending.append(sig & 0xFF)  # a signal-delivery stop came first: keep the signal
            _ptrace(PTRACE_INTERRUPT, pid, what="PTRACE_INTERRUPT")
            _ptrace(7, pid, 0, 0, "PTRACE_CONT")  # let it reach the interrupt stop
        saved = user_regs()
        _ptrace(PTRACE_GETREGS, pid, 0, ctypes.addressof(saved), "PTRACE_GETREGS")
        try:
            for nr, args in calls:
                regs = user_regs.from_buffer_copy(saved)
                regs.rax, regs.orig_rax, regs.rip = nr, (1 << 64) - 1, insn
                for name, value in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args):
                    setattr(regs, name, value & ((1 << 64) - 1))
                _ptrace(PTRACE_SETREGS, pid, 0, ctypes.addressof(regs), "PTRACE_SETREGS")
                for _ in range(16):
                    _ptrace(PTRACE_SINGLESTEP, pid, 0, 0, "PTRACE_SINGLESTEP")
                    sig = _wait_stop(pid, pending)
                    _ptrace(PTRACE_GETREGS, pid, 0, ctypes.addressof(regs), "PTRACE_GETREGS")
                    if regs.rip == insn + 2:
                        break
                    if sig & 0xFF not in (5, 0) and sig >> 8 == 0:  # not SIGTRAP: deliver later
                        pending.append(sig & 0xFF)
                else:
                    raise TrackingError(errno.EIO, f"injected syscall {nr} did not complete")
                rax = regs.rax
                results.append(rax - (1 << 64) if rax >= 1 << 63 else rax)
        finally:
            _ptrace(PTRACE_SETREGS, pid, 0, ctypes.addressof(saved), "PTRACE_SETREGS (restore)")
    finally:
        try:
            _ptrace(PTRACE_DETACH, pid, 0, pending[0] if pending else 0, "PTRACE_DETACH")
        except TrackingError:
            pass
        for sig in pending[1:]:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
    return results


def inject_userfaultfd(pid: int) -> int:
    """A userfaultfd for process `pid`'s mm, as a file descriptor of *this* process
    (the target keeps no copy).  Runs the ptrace part in a helper process."""
    if platform.machine() != "x86_64":
        raise TrackingError(errno.ENOSYS, "syscall injection is implemented for x86-64 only")
    import socket
    import subprocess
    import sys
    ours, theirs = socket.socketpair()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "vballoon.migrate.uffd", str(pid), str(theirs.fileno())],
            pass_fds=[theirs.fileno()], capture_output=True, text=True, timeout=30)
        theirs.close()
        if proc.returncode != 0:
            msg = (proc.stderr.strip().splitlines() or ["helper failed"])[-1]
            raise TrackingError(errno.EPERM, f"cannot create a userfaultfd in process {pid}: {msg}")
        _, fds, _, _ = socket.recv_fds(ours, 16, 1)
        if not fds:
            raise TrackingError(errno.EIO, "injection helper sent no descriptor")
        return fds[0]
    finally:
        ours.close()
        theirs.close()


def _helper(pid: int, sock_fd: int) -> None:
    import socket
    sock = socket.socket(fileno=sock_fd)
    pidfd = os.pidfd_open(pid)
    try:
        flags = O_CLOEXEC | O_NONBLOCK
        [remote] = inject_syscalls(pid, [(SYS_userfaultfd, (flags,))])
        if remote == -errno.EPERM:
            [remote] = inject_syscalls(pid, [(SYS_userfaultfd, (flags | UFFD_USER_MODE_ONLY,))])
        if remote < 0:
            raise TrackingError(-remote, f"userfaultfd() in process {pid}: {os.strerror(-remote)}")
        try:
            local = pidfd_getfd(pidfd, remote)
        finally:
            inject_syscalls(pid, [(SYS_close, (remote,))])
        socket.send_fds(sock, [b"u"], [local])
    finally:
        os.close(pidfd)


if __name__ == "__main__":
    import sys
    try:
        _helper(int(sys.argv[1]), int(sys.argv[2]))
    except (OSError, ValueError, IndexError) as e:
        print(f"vballoon.migrate.uffd: {e}", file=sys.stderr)
        sys.exit(1)
