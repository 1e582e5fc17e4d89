"""Listening Unix sockets that are born in place: used by the vhost-user and control servers."""
from __future__ import annotations

import os
import socket
import stat

from vballoon.errors import ConfigError


def _path_in_use(path: str) -> bool:
    """True if something answers on ``path``; a stale socket file is not in use."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    finally:
        probe.close()


def listen_unix(path: str, mode: int | None = None, group: int | None = None) -> socket.socket:
    """Bind, listen, then rename into place: the path only ever names a listening socket.

    With ``mode`` the socket file is born with it (masked by the umask): Linux gives the file
    the mode of the socket's inode, which fchmod sets before bind.  With ``group`` the file
    gets that group id (and ``mode`` exactly, umask or not) while it still has its temporary
    name.  Refuses a path that another process serves, or that is not a socket.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError("socket-path-not-socket", f"{path} exists and is not a socket")
        if _path_in_use(path):
            raise ConfigError("socket-path-in-use", f"{path} is already served by another "
                              "process")
    tmp = f"{path}.{os.getpid()}.tmp"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if mode is not None:
            os.fchmod(sock.fileno(), mode)
        sock.bind(tmp)
        if group is not None:
            os.chown(tmp, -1, group)
        if mode is not None and group is not None:
            os.chmod(tmp, mode)
        sock.listen(4)
        os.rename(tmp, path)
    except OSError as e:
        sock.close()
        raise ConfigError("socket-path", f"cannot listen on {path}: {e}") from None
    sock.setblocking(False)
    return sock
