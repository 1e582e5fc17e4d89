"""`vballoon serve` started the ways management tools start back-ends: on a socket they made
(--fd), by systemd socket activation (LISTEN_FDS + readiness on NOTIFY_SOCKET), and on a socket
it makes for another user's QEMU (--socket-group, --socket-mode).  Each as a real process."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from vballoon.sim import Frontend

BIN = Path(sys.executable).parent / "vballoon"


def listening(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen()
    return s


async def answers_vhost_user(path: Path) -> int:
    """Connect as QEMU does and ask GET_FEATURES; the features offered."""
    fe = await Frontend.connect(str(path))
    try:
        await asyncio.wait_for(fe.init(3), 20)
        return fe.features
    finally:
        await fe.close()


def stop(p: subprocess.Popen) -> tuple[int, str]:
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=20)
    return p.returncode, out


async def test_serve_on_an_inherited_fd(tmp_path):
    path = tmp_path / "made-by-libvirt.sock"
    s = listening(path)
    p = subprocess.Popen([str(BIN), "serve", "--fd", str(s.fileno())], pass_fds=[s.fileno()],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    s.close()                       # the daemon holds it now
    try:
        assert await answers_vhost_user(path) >> 32 & 1       # VERSION_1 offered
    finally:
        rc, out = stop(p)
    assert rc == 0, out
    assert path.exists()            # not the daemon's to remove: whoever made it does


def test_serve_refuses_an_fd_that_is_not_a_listening_socket(tmp_path):
    r, w = os.pipe()
    p = subprocess.run([str(BIN), "serve", "--fd", str(r)], pass_fds=[r], capture_output=True,
                       text=True, timeout=30)
    os.close(r)
    os.close(w)
    assert p.returncode == 2 and "not a socket" in p.stderr and "Traceback" not in p.stderr


async def test_systemd_socket_activation_and_readiness(tmp_path):
    path = tmp_path / "vb.sock"
    s = listening(path)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(20)
    fd = s.fileno()

    def as_systemd_does() -> None:           # in the child, before exec (fd 3 is kept open)
        os.dup2(fd, 3)
        os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()),
                          NOTIFY_SOCKET=str(tmp_path / "notify"), JOURNAL_STREAM="8:1")

    p = subprocess.Popen([str(BIN), "serve", "--control-socket", str(tmp_path / "ctl.sock")],
                         preexec_fn=as_systemd_does, pass_fds=[fd, 3], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    s.close()
    try:
        ready = notify.recv(256).decode()
        assert ready.startswith("READY=1\n") and "STATUS=serving" in ready
        assert await answers_vhost_user(path)
        rc, out = stop(p)
        assert notify.recv(256) == b"STOPPING=1"
    finally:
        if p.returncode is None:
            p.kill()
            p.communicate()
        notify.close()
    assert rc == 0, out
    # under the journal, lines carry no timestamp of their own
    lines = [line for line in out.splitlines() if " vballoon." in line]
    assert lines and all(line.split()[0] in ("INFO", "WARNING", "ERROR") for line in lines), out


def test_socket_group_and_mode_for_qemus_user(tmp_path):
    path = tmp_path / "vb.sock"
    gid = os.getgroups()[-1] if os.getgroups() else os.getgid()
    p = subprocess.Popen([str(BIN), "serve", "--socket-path", str(path), "--socket-mode", "0660",
                          "--socket-group", str(gid)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        lines = [p.stdout.readline() for _ in range(2)]
        assert any("ready on" in line for line in lines), lines
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == gid
    finally:
        rc, out = stop(p)
    assert rc == 0, out
    assert not path.exists()            # made here, removed here


@pytest.mark.parametrize("args,message", [
    (["--fd", "3", "--socket-mode", "0660"], "apply to the socket made with --socket-path"),
    (["--socket-path", "x.sock", "--socket-mode", "999"], "octal mode"),
    (["--socket-path", "x.sock", "--socket-group", "no-such-group-here"], "not a group"),
])
def test_socket_options_are_checked(tmp_path, args, message):
    p = subprocess.run([str(BIN), "serve", *args], capture_output=True, text=True, timeout=30,
                       cwd=tmp_path)
    assert p.returncode == 2 and message in p.stderr
