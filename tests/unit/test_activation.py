"""Inherited listening sockets (--fd, LISTEN_FDS) and readiness (NOTIFY_SOCKET)."""
from __future__ import annotations

import os
import socket

import pytest

from vballoon.app.activation import listener_from_fd, notify, systemd_listener
from vballoon.errors import ConfigError


def test_a_listening_unix_socket_is_taken(tmp_path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(tmp_path / "vb.sock"))
    s.listen()
    got = listener_from_fd(s.detach())
    try:
        assert got.family == socket.AF_UNIX and not got.getblocking()
        assert not os.get_inheritable(got.fileno())
    finally:
        got.close()


@pytest.mark.parametrize("kind", ["pipe", "closed", "datagram", "not-listening", "tcp"])
def test_anything_else_is_refused_and_left_open(tmp_path, kind):
    keep = []
    if kind == "pipe":
        r, w = os.pipe()
        fd, keep = r, [r, w]
    elif kind == "closed":
        r, w = os.pipe()
        os.close(r)
        os.close(w)
        fd = r
    else:
        fam, typ = (socket.AF_INET, socket.SOCK_STREAM) if kind == "tcp" else \
            (socket.AF_UNIX, socket.SOCK_DGRAM if kind == "datagram" else socket.SOCK_STREAM)
        s = socket.socket(fam, typ)
        if kind == "tcp":
            s.bind(("127.0.0.1", 0))
            s.listen()
        fd = s.detach()
        keep = [fd]
    with pytest.raises(ConfigError) as e:
        listener_from_fd(fd)
    assert e.value.rule == "listen-fd"
    for k in keep:                  # a refused fd is not closed behind the caller's back
        os.fstat(k)
        os.close(k)


def test_systemd_variables_for_another_process_are_ignored_and_removed():
    env = {"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDNAMES": "vb"}
    assert systemd_listener(env) is None
    assert env == {}


def test_systemd_with_more_than_one_socket_is_refused():
    with pytest.raises(ConfigError, match="exactly one socket"):
        systemd_listener({"LISTEN_FDS": "2", "LISTEN_PID": str(os.getpid())})


def test_not_socket_activated():
    assert systemd_listener({}) is None


def test_notify_sends_the_state(tmp_path):
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(str(tmp_path / "notify"))
    try:
        assert notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "notify")})
        assert srv.recv(64) == b"READY=1"
    finally:
        srv.close()


def test_notify_without_a_manager_or_with_a_dead_one():
    assert not notify("READY=1", {})
    assert not notify("READY=1", {"NOTIFY_SOCKET": "/nonexistent/notify"})


def test_systemd_units_verify(tmp_path):
    """The shipped template units pass `systemd-analyze verify` (ExecStart pointed at this
    installation's vballoon)."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    src = Path(__file__).parents[2] / "examples" / "systemd"
    exe = str(Path(sys.executable).parent / "vballoon")
    for name in ("vballoon@.socket", "vballoon@.service"):
        text = (src / name).read_text().replace("/usr/local/bin/vballoon", exe)
        (tmp_path / name.replace("@", "@guest1")).write_text(text)
        (tmp_path / name).write_text(text)
    p = subprocess.run([tool, "verify", "--man=no", str(tmp_path / "vballoon@guest1.service"),
                        str(tmp_path / "vballoon@guest1.socket")], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "Unknown" not in p.stderr and "Invalid" not in p.stderr, p.stderr
