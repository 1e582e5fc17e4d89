"""DirtyTracker: every page of a shared RAM file written by any process, since the last look.

    t = DirtyTracker("/dev/shm/vm1-ram", page_size=4096)
    t.start()            # every process with a writable shared mapping of the file is tracked
    ...
    pages = t.collect()  # sorted file page numbers written since start()/the last collect()
    t.stop()

Writers are found in ``/proc/*/maps`` (QEMU, the vballoon daemon, anything else); each gets a
userfaultfd in async write-protect mode on each of its mappings of the file (see uffd.py), and
``collect()`` runs ``PAGEMAP_SCAN`` (written pages, re-protected atomically) over each of them.

It cannot miss a write made through a tracked mapping.  What it refuses instead of missing:
- a writable shared mapping of the file that appears after start() (another process, or a
  remap): ``collect()`` raises TrackingLost;
- a process it cannot ptrace: start() raises TrackingError naming the process and the privilege.
Writes through write(2)/fallocate(2) on the file are not seen; nothing does that to guest RAM.
"""
from __future__ import annotations

import dataclasses
import errno
import os
from pathlib import Path

import numpy as np

import vballoon.migrate.uffd as U
from vballoon.migrate.uffd import TrackingError


class TrackingLost(TrackingError):
    """A write may have gone unseen; every page must be considered dirty."""


@dataclasses.dataclass(frozen=True)
class Mapping:
    pid: int
    start: int
    end: int
    file_offset: int


def _same_file(path: str, st: os.stat_result) -> bool:
    try:
        s = os.stat(path)
    except OSError:
        return False
    return (s.st_dev, s.st_ino) == (st.st_dev, st.st_ino)


def writable_mappings(ram_path: str | os.PathLike[str], *, pids: list[int] | None = None,
                      denied: list[int] | None = None) -> list[Mapping]:
    """Every writable shared mapping of the file, in every process (or in `pids`).
    Processes whose maps this process may not read are appended to `denied`."""
    st = os.stat(ram_path)
    dev_ino = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x} {st.st_ino}"
    found = []
    key = f" {dev_ino}".encode()
    for pid in pids if pids is not None else [int(p) for p in os.listdir("/proc") if p.isdigit()]:
        try:
            with open(f"/proc/{pid}/maps", "rb") as f:
                data = f.read()
        except PermissionError:
            if denied is not None:
                denied.append(pid)
            continue
        except OSError:
            continue
        if key not in data:  # the common case: the process does not map the file at all
            continue
        for line in data.decode(errors="replace").splitlines():
            cols = line.split(maxsplit=5)
            if len(cols) < 5 or f"{cols[3]} {cols[4]}" != dev_ino:
                continue
            if "w" not in cols[1] or "s" not in cols[1]:
                continue
            lo, hi = (int(x, 16) for x in cols[0].split("-"))
            found.append(Mapping(pid, lo, hi, int(cols[2], 16)))
    return found


class DirtyTracker:
    def __init__(self, ram_path: str | os.PathLike[str], *, page_size: int = 4096,
                 pids: list[int] | None = None, vec_len: int = 4096) -> None:
        self.ram_path = str(ram_path)
        self.page_size = page_size
        self.size = os.stat(self.ram_path).st_size
        self.npages = self.size // page_size
        self._pids = pids
        self.mappings: list[Mapping] = []
        self._uffd: dict[int, int] = {}  # pid -> our userfaultfd for its mm
        self._pagemap: dict[int, int] = {}
        self._vec = (U.page_region * vec_len)()
        self.started = False
        self.scans = 0
        self._released: set[int] = set()

    @property
    def pids(self) -> list[int]:
        return sorted(self._uffd)

    def start(self) -> None:
        denied: list[int] = []
        maps = writable_mappings(self.ram_path, pids=self._pids, denied=denied)
        if denied and not maps and not _has_cap_sys_ptrace():
            # the writers are there (QEMU maps the file) but invisible to us: say why
            raise TrackingError(errno.EPERM, f"cannot read the memory maps of process(es) "
                                f"{', '.join(map(str, denied[:5]))}{' ...' if len(denied) > 5 else ''}: "
                                "write tracking needs CAP_SYS_PTRACE (or the same uid) to find "
                                "and track every process that writes guest RAM")
        if not maps:
            raise TrackingError(errno.ENOENT, f"no process maps {self.ram_path} writable and shared")
        try:
            for m in maps:
                if m.pid not in self._uffd:
                    fd = U.userfaultfd_here() if m.pid == os.getpid() else U.inject_userfaultfd(m.pid)
                    self._uffd[m.pid] = fd
                    U.uffd_enable_wp_async(fd)
                    self._pagemap[m.pid] = os.open(f"/proc/{m.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
                U.uffd_register_wp(self._uffd[m.pid], m.start, m.end - m.start)
                self.mappings.append(m)
        except BaseException:
            self.stop()
            raise
        self.started = True

    def _check_mappings(self) -> None:
        now = [m for m in writable_mappings(self.ram_path, pids=self._pids)
               if m.pid not in self._released]
        if set(now) != set(self.mappings):
            new = sorted(set(now) - set(self.mappings), key=lambda m: (m.pid, m.start))
            gone = sorted(set(self.mappings) - set(now), key=lambda m: (m.pid, m.start))
            if new:
                raise TrackingLost(errno.ESTALE, f"untracked writable mapping(s) of {self.ram_path}: "
                                   + ", ".join(f"pid {m.pid} {m.start:#x}-{m.end:#x}" for m in new))
            if gone:
                raise TrackingLost(errno.ESTALE, f"tracked mapping(s) of {self.ram_path} went away "
                                   "unannounced (writes since the last scan unknown): "
                                   + ", ".join(f"pid {m.pid} {m.start:#x}-{m.end:#x}" for m in gone))

    def collect(self, *, rescan: bool = True) -> np.ndarray:
        """Sorted unique file page numbers written since start() or the last collect().
        rescan=False skips looking for new writers in /proc (a few ms): only for a scan right
        after one that did, with every writer stopped."""
        if not self.started:
            raise TrackingError(errno.EINVAL, "tracker not started")
        if rescan:
            self._check_mappings()
        ps = self.page_size
        parts = []
        for m in self.mappings:
            try:
                ranges = U.pagemap_scan_written(self._pagemap[m.pid], m.start, m.end, self._vec)
            except TrackingError as e:
                if e.errno == errno.ESRCH or not os.path.exists(f"/proc/{m.pid}"):
                    continue  # the process exited: it writes no more
                raise
            for lo, hi in ranges:
                first = (lo - m.start + m.file_offset) // ps
                parts.append(np.arange(first, first + (hi - lo) // ps, dtype=np.int64))
        self.scans += 1
        if not parts:
            return np.zeros(0, dtype=np.int64)
        pages = np.unique(np.concatenate(parts))
        return pages[pages < self.npages]

    def release(self, pid: int) -> None:
        """Stop tracking process `pid`, whose writes so far the caller has collected and which
        writes no more (the daemon after its device stopped, before its mapping goes)."""
        for m in [m for m in self.mappings if m.pid == pid]:
            try:
                U.uffd_unregister(self._uffd[pid], m.start, m.end - m.start)
            except OSError:
                pass
            self.mappings.remove(m)
        for table in (self._uffd, self._pagemap):
            fd = table.pop(pid, None)
            if fd is not None:
                os.close(fd)
        if self._pids is not None and pid in self._pids:
            self._pids = [p for p in self._pids if p != pid]
        self._released.add(pid)

    def stop(self) -> None:
        """Unregister and close everything (idempotent).  Closing our userfaultfd, the only
        reference, ends the tracking in the target even if unregistering failed."""
        for m in self.mappings:
            fd = self._uffd.get(m.pid)
            if fd is not None:
                try:
                    U.uffd_unregister(fd, m.start, m.end - m.start)
                except OSError:
                    pass
        for fd in [*self._uffd.values(), *self._pagemap.values()]:
            try:
                os.close(fd)
            except OSError:
                pass
        self._uffd.clear()
        self._pagemap.clear()
        self.mappings = []
        self.started = False

    def __enter__(self) -> "DirtyTracker":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _has_cap_sys_ptrace() -> bool:
    try:
        with open("/proc/self/status") as f:
            caps = next(int(l.split()[1], 16) for l in f if l.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        return False
    return bool(caps >> 19 & 1)


def check_privileges() -> str | None:
    """None when write tracking can work here; else why not."""
    if not _has_cap_sys_ptrace():
        try:
            scope = int(Path("/proc/sys/kernel/yama/ptrace_scope").read_text())
        except OSError:
            scope = 0
        if scope >= 2:
            return "ptrace is restricted (kernel.yama.ptrace_scope >= 2) and CAP_SYS_PTRACE is missing"
    return None


