"""How the daemon is started by others: a listening socket handed over (``--fd``, systemd's
``LISTEN_FDS``), and readiness told back (systemd's ``NOTIFY_SOCKET``).

Management tools make the socket themselves so that QEMU can be started the moment the socket
exists, with no race against the daemon's start-up (QEMU's "Backend program conventions",
libvirt, systemd socket units).  Readiness follows ``sd_notify(3)``; no libsystemd is needed.
"""
from __future__ import annotations

import os
import socket
import stat

from vballoon.errors import ConfigError

SD_LISTEN_FDS_START = 3


def listener_from_fd(fd: int, origin: str = "--fd") -> socket.socket:
    """The inherited fd as a listening, non-blocking ``AF_UNIX`` stream socket, or a clear
    refusal: not open, not a socket, the wrong family or type, or not listening."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise ConfigError("listen-fd", f"{origin} {fd}: not an open file descriptor ({e.strerror})"
                          ) from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError("listen-fd", f"{origin} {fd}: not a socket")
    sock = socket.socket(fileno=fd)
    try:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise ConfigError("listen-fd", f"{origin} {fd}: not a Unix stream socket "
                              f"({sock.family.name}, {sock.type.name})")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ConfigError("listen-fd", f"{origin} {fd}: the socket is not listening")
    except ConfigError:
        sock.detach()               # not ours to close: the caller's fd stays as it was
        raise
    sock.setblocking(False)
    os.set_inheritable(fd, False)
    return sock


def systemd_listener(environ: dict[str, str] | None = None) -> socket.socket | None:
    """The socket systemd passed (``LISTEN_PID`` is this process, ``LISTEN_FDS`` is 1), or None
    when the daemon was not socket-activated.  The variables are removed, as sd_listen_fds(1)
    does, so that children do not inherit them."""
    env = os.environ if environ is None else environ
    if "LISTEN_FDS" not in env:
        return None
    pid, count = env.get("LISTEN_PID", ""), env.get("LISTEN_FDS", "")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(name, None)
    if pid != str(os.getpid()):
        return None                 # meant for another process (our parent, say)
    if count != "1":
        raise ConfigError("listen-fds", f"LISTEN_FDS={count!r}: vballoon serves exactly one "
                          "socket (one daemon per VM: use a template unit, vballoon@.socket)")
    return listener_from_fd(SD_LISTEN_FDS_START, "LISTEN_FDS")


def notify(state: str, environ: dict[str, str] | None = None) -> bool:
    """Send ``state`` (``READY=1``, ``STOPPING=1``, ``STATUS=...``) to the service manager if
    ``NOTIFY_SOCKET`` names one; True if it was sent.  Never raises: readiness is a courtesy."""
    env = os.environ if environ is None else environ
    path = env.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]      # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(path)
            s.sendall(state.encode())
        return True
    except OSError:
        return False
