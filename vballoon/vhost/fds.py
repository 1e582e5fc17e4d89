"""The fd I/O the sans-IO session delegates: what kind of file a received fd is, adopting it
(non-blocking), and signalling an eventfd without ever blocking.

The session calls :func:`check_fd` (injected, so tests can replace it) before it keeps an fd it
was sent; the transport calls :func:`signal_eventfd` to carry out a ``Signal`` action.
"""
from __future__ import annotations

import logging
import os
import stat

from vballoon.errors import FrontendError

log = logging.getLogger(__name__)

_ONE = (1).to_bytes(8, "little")


def fd_kind(fd: int) -> str:
    """``eventfd``, ``socket``, ``file``, ``pipe``, ``dir``, ``anon:<what>`` or ``other``."""
    st = os.fstat(fd)
    mode = st.st_mode
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISFIFO(mode):
        return "pipe"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "other"
    if target == "anon_inode:[eventfd]":
        return "eventfd"
    if target.startswith("anon_inode:"):
        return "anon:" + target[len("anon_inode:"):]
    return "other"


def check_fd(fd: int, want: str, what: str) -> None:
    """Refuse ``fd`` unless it is a ``want`` (``eventfd`` or ``socket``); then make it
    non-blocking, so that no write to it (a full eventfd counter, a full backend channel) can
    ever block the daemon.  ``what`` names the fd in the error."""
    try:
        kind = fd_kind(fd)
    except OSError as e:
        raise FrontendError("fd-bad", f"{what}: fstat failed: {e}") from None
    if kind != want:
        raise FrontendError(f"fd-not-{want}", f"{what} is a {kind}, not an {want}"
                            if want[0] in "aeiou" else f"{what} is a {kind}, not a {want}")
    os.set_blocking(fd, False)


def signal_eventfd(fd: int) -> bool:
    """Add 1 to an eventfd's counter.  A full counter (EAGAIN) means the other side has not
    read the signals already there: it will see one, so nothing is lost.  Returns False if the
    fd could not be written at all (logged)."""
    try:
        os.write(fd, _ONE)
    except BlockingIOError:
        pass
    except OSError as e:
        log.error("eventfd-write-failed: fd %d: %s", fd, e)
        return False
    return True


def close_fds(fds) -> None:
    """Close each fd once; one that is already gone is not an error worth raising."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
