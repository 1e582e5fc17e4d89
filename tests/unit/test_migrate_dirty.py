"""The write tracker (vballoon/migrate/dirty.py, uffd.py): userfaultfd async write-protect
registered in the writing process (injected with ptrace), PAGEMAP_SCAN read-and-reset.

Needs ptrace rights (root / CAP_SYS_PTRACE) and Linux >= 6.7; skipped otherwise, with the reason."""
from __future__ import annotations

import mmap
import os
import random
import subprocess
import sys
import time

import pytest

from vballoon.migrate import uffd as U
from vballoon.migrate.dirty import DirtyTracker, TrackingLost, writable_mappings
from vballoon.migrate.uffd import TrackingError

PS = 4096
NPAGES = 4096  # 16 MiB

WRITER = r"""
import mmap, os, random, sys
fd = os.open(sys.argv[1], os.O_RDWR)
m = mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED)
extra = None
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "w":
        for p in map(int, args):
            m[p * 4096 + 100] = (m[p * 4096 + 100] + 1) % 256
    elif cmd == "storm":  # random writes until told to stop (a file appears)
        n, rng = 0, random.Random(int(args[0]))
        while not os.path.exists(args[1]):
            p = rng.randrange(len(m) // 4096)
            m[p * 4096 + rng.randrange(4096)] = rng.randrange(1, 256)
            n += 1
    elif cmd == "map":
        extra = mmap.mmap(fd, 4096 * 4, mmap.MAP_SHARED)
    elif cmd == "unmap":
        m.close()
    print("ok", flush=True)
"""


def _tracking_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (ptrace + userfaultfd in another process)"
    try:
        fd = U.userfaultfd_here()
        try:
            U.uffd_enable_wp_async(fd)
        finally:
            os.close(fd)
    except OSError as e:
        return f"no async userfaultfd write-protect here: {e}"
    return None


pytestmark = pytest.mark.skipif(bool(_tracking_unavailable()), reason=str(_tracking_unavailable()))


class Writer:
    def __init__(self, path: str) -> None:
        self.p = subprocess.Popen([sys.executable, "-c", WRITER, path], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)

    def cmd(self, line: str) -> None:
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        assert self.p.stdout.readline() == "ok\n"

    def write(self, pages) -> None:
        self.cmd("w " + " ".join(map(str, pages)))

    def close(self) -> None:
        self.p.kill()
        self.p.wait()
        self.p.stdin.close()
        self.p.stdout.close()


@pytest.fixture
def ram(tmp_path):
    path = f"/dev/shm/vbm-unit-{os.getpid()}-{random.randrange(1 << 30)}"
    with open(path, "wb") as f:
        f.truncate(NPAGES * PS)
    yield path
    os.unlink(path)


@pytest.fixture
def writer(ram):
    w = Writer(ram)
    w.cmd("w")  # mapped and ready
    yield w
    w.close()


def test_exact_pages_of_another_process(ram, writer):
    with DirtyTracker(ram) as t:
        assert t.pids == [writer.p.pid]
        assert len(t.collect()) == 0
        rng = random.Random(1)
        for _ in range(3):
            pages = sorted(rng.sample(range(NPAGES), 50))
            writer.write(pages)
            assert t.collect().tolist() == pages
        assert len(t.collect()) == 0  # read-and-reset: nothing written since
    writer.write([1, 2])  # tracking is gone, the process is unharmed
    assert writer.p.poll() is None


def test_tracks_itself_and_others_together(ram, writer):
    fd = os.open(ram, os.O_RDWR)
    own = mmap.mmap(fd, NPAGES * PS, mmap.MAP_SHARED)
    try:
        with DirtyTracker(ram) as t:
            assert t.pids == sorted([os.getpid(), writer.p.pid])
            writer.write([5, 7])
            own[9 * PS] = 1
            own[4095 * PS + 4095] = 1
            assert t.collect().tolist() == [5, 7, 9, 4095]
    finally:
        own.close()
        os.close(fd)


def test_no_write_is_lost_under_a_storm(ram, writer, tmp_path):
    """The migration invariant: copy everything once, then copy the pages each collect() names
    while a writer keeps writing; after the writer stops and a last collect, the copy equals
    the file."""
    stop = tmp_path / "stop"
    with DirtyTracker(ram) as t:
        with open(ram, "rb") as f:
            copy = bytearray(f.read())
        writer.p.stdin.write(f"storm 7 {stop}\n")
        writer.p.stdin.flush()
        fd = os.open(ram, os.O_RDONLY)
        try:
            copied = 0
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                for p in t.collect():
                    copy[p * PS:(p + 1) * PS] = os.pread(fd, PS, p * PS)
                    copied += 1
            stop.touch()
            assert writer.p.stdout.readline() == "ok\n"
            for p in t.collect():
                copy[p * PS:(p + 1) * PS] = os.pread(fd, PS, p * PS)
            with open(ram, "rb") as f:
                assert bytes(copy) == f.read()
            assert copied > 100
        finally:
            os.close(fd)


def test_a_new_writable_mapping_is_refused(ram, writer):
    with DirtyTracker(ram) as t:
        writer.cmd("map")
        with pytest.raises(TrackingLost, match="untracked writable mapping"):
            t.collect()


def test_a_mapping_that_goes_unannounced_is_refused_and_release_accepts_it(ram, writer):
    with DirtyTracker(ram) as t:
        writer.write([3])
        assert t.collect().tolist() == [3]
        writer.cmd("unmap")
        with pytest.raises(TrackingLost, match="went away unannounced"):
            t.collect()


def test_no_writer_is_an_error(ram):
    with pytest.raises(TrackingError, match="no process maps"):
        DirtyTracker(ram).start()


def test_release_stops_tracking_one_process(ram, writer):
    fd = os.open(ram, os.O_RDWR)
    own = mmap.mmap(fd, NPAGES * PS, mmap.MAP_SHARED)
    try:
        with DirtyTracker(ram) as t:
            writer.write([1])
            assert t.collect().tolist() == [1]
            t.release(writer.p.pid)
            writer.write([2])
            writer.cmd("unmap")  # announced: fine
            own[3 * PS] = 1
            assert t.collect().tolist() == [3]
    finally:
        own.close()
        os.close(fd)


def test_writable_mappings_ignores_other_files(ram, writer, tmp_path):
    other = tmp_path / "other"
    other.write_bytes(b"\0" * PS)
    assert [m.pid for m in writable_mappings(ram)] == [writer.p.pid]
    assert writable_mappings(other) == []


def test_injection_refuses_a_missing_process():
    with pytest.raises(TrackingError):
        U.inject_userfaultfd(2**22 + 12345)


def test_without_ptrace_rights_the_tracker_refuses_clearly(ram, writer):
    """As an unprivileged user the root-owned writer cannot be seen or tracked: a clear
    refusal naming the privilege, never a tracker that silently misses it."""
    code = ("import os, sys; from vballoon.migrate.dirty import DirtyTracker\n"
            "os.setgid(65534); os.setuid(65534)\n"  # imports done as root, then nobody
            "try:\n    DirtyTracker(sys.argv[1]).start()\n"
            "except OSError as e:\n    print(e); sys.exit(3)\n")
    os.chmod(ram, 0o644)
    p = subprocess.run([sys.executable, "-c", code, ram], capture_output=True, text=True)
    assert p.returncode == 3, p.stderr
    assert "CAP_SYS_PTRACE" in p.stdout
