"""vballoon against a real QEMU and a stock Linux guest (issue 6).

QEMU runs the generic vhost-user device as a balloon:

    -chardev socket,id=vb,path=SOCK
    -device vhost-user-test-device-pci,chardev=vb,virtio-id=5,num_vqs=N,config_size=16

with guest RAM a shared memfd (the harness always does that). The daemon runs in
the test's own event loop, so a test drives it through its API (`Balloon.set_target`,
`start_hint_round`) and reads what it recorded; one test runs the real
`vballoon serve` command instead, steered through its control socket. Every test
looks at both sides: the guest (/sys, /proc/meminfo, /proc/vmstat, over the serial
console) and the host (the daemon's state and counters, and how much of the guest
RAM memfd is allocated).

  TestAllFeatures       binding and negotiation, stats, inflate/deflate
  TestWithoutReporting  inflate reclaims exactly its pages; a free page hint round
  test_free_page_reporting_gives_freed_memory_back
                        the same workload against vballoon and QEMU's own
                        virtio-balloon-pci: how much the memfd gives back, how fast
  test_guest_acks_a_subset_and_inflate_still_works
  TestLifecycle         reboot, pause/resume, QEMU exit and kill, a second QEMU
  test_vballoon_serve_command

Guests are shared inside a class where the tests do not disturb each other;
the class fixtures boot them once. Figures (boot times, reclaim speed of
vballoon against QEMU's built-in balloon) are printed in the terminal summary.
Free page reporting is left out where a test needs the guest's free memory to
the page: a report in flight holds up to 128 MiB off the guest's free lists.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from harness import (
    Guest, GuestError, GuestTimeout, Qmp, eventually, set_pdeathsig, wait_until,
)

from vballoon.devices.balloon import ActualChanged
from vballoon.devices.balloon.device import FEATURE_NAMES, Balloon
from vballoon.app.daemon import Daemon

pytestmark = pytest.mark.qemu

KiB, MiB = 1 << 10, 1 << 20
PAGE = 4096
BALLOON = 5  # virtio device id
VERSION_1, PROTOCOL_FEATURES, EVENT_IDX = 32, 30, 29
MUST_TELL_HOST, STATS_VQ, DEFLATE_ON_OOM, FREE_PAGE_HINT, PAGE_POISON, REPORTING = range(6)
HINT_BLOCK_PAGES = 1024  # the Linux driver hints 4 MiB blocks (order MAX_PAGE_ORDER)
ALL_FEATURES = list(FEATURE_NAMES)
NO_REPORTING = [f for f in ALL_FEATURES if f != "free-page-reporting"]
NO_HINT = [f for f in ALL_FEATURES if f != "free-page-hint"]
REPO = Path(__file__).resolve().parents[2]


def bits(word: int) -> frozenset[int]:
    return frozenset(i for i in range(64) if word >> i & 1)


def vhost_balloon_args(sock: str | os.PathLike[str], num_vqs: int) -> list[str]:
    return [
        "-chardev", f"socket,id=vb,path={sock}",
        "-device", f"vhost-user-test-device-pci,chardev=vb,virtio-id=5,num_vqs={num_vqs},"
        "config_size=16",
    ]  # fmt: skip


BUILTIN_REPORTING_BALLOON = [
    "-object", "iothread,id=io0",
    "-device", "virtio-balloon-pci,id=bal0,iothread=io0,free-page-reporting=on",
]  # fmt: skip


def expected_roles(acked: int) -> dict[int, str]:
    """Queue roles as the Linux driver numbers its queues: present ones, compacted."""
    roles = ["inflate", "deflate"]
    for bit, role in ((STATS_VQ, "stats"), (FREE_PAGE_HINT, "hint"), (REPORTING, "reporting")):
        if acked >> bit & 1:
            roles.append(role)
    return dict(enumerate(roles))


async def the_balloon(g: Guest):
    [balloon] = [d for d in await g.virtio_devices() if d.device == BALLOON]
    return balloon


def socket_path(directory: Path) -> str:
    path = str(directory / "vb.sock")
    assert len(path) < 100, f"socket path too long for sun_path: {path}"
    return path


# --------------------------------------------------------------------------- daemon side


class DaemonLog(logging.Handler):
    """Records of the `vballoon` loggers while attached (INFO and up)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @contextlib.contextmanager
    def attached(self) -> Iterator[DaemonLog]:
        logger = logging.getLogger("vballoon")
        old = logger.level
        logger.setLevel(logging.INFO)
        logger.addHandler(self)
        try:
            yield self
        finally:
            logger.removeHandler(self)
            logger.setLevel(old)

    def messages(self, contains: str = "") -> list[str]:
        return [m for r in self.records if contains in (m := r.getMessage())]

    def errors(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= logging.ERROR]

    def tail(self, n: int = 30) -> str:
        return "\n".join(f"{r.levelname} {r.name}: {r.getMessage()}" for r in self.records[-n:])


class Watch:
    """Await the daemon's device changes (Balloon.on_change: typed events, ActualChanged,
    StatsUpdated, RoundEnded...) instead of polling for them. The daemon's sink stays in place."""

    def __init__(self, device: Balloon) -> None:
        self.device = device
        self.changes: list[tuple[float, Any]] = []
        self._event = asyncio.Event()
        self._chained = device.on_change
        device.on_change = self._changed

    def _changed(self, what: str, *details: Any) -> None:
        self._chained(what, *details)
        self.changes.append((time.monotonic(), what))
        self._event.set()

    async def until(
        self, predicate: Callable[[], Any], *, what: str | Callable[[], str],
        timeout: float = 30.0,
    ) -> Any:
        """The first truthy predicate() after a change (or at once); what: for the timeout
        message (a callable is evaluated then)."""
        try:
            async with asyncio.timeout(timeout):
                while not (value := predicate()):
                    self._event.clear()
                    await self._event.wait()
                return value
        except TimeoutError:
            text = what() if callable(what) else what
            raise GuestTimeout(f"{text}: not within {timeout} s") from None

    async def actual(self, pages: int, *, timeout: float = 60.0) -> None:
        await self.until(lambda: self.device.actual == pages,
                         what=lambda: f"the guest's actual to reach {pages} pages "
                         f"(it is {self.device.actual})", timeout=timeout)

    async def fresh_stats(self, *, after: int, timeout: float = 30.0) -> None:
        """Until the daemon has received stats update number `after` + 2: the second one
        is the guest's answer to a request sent after update `after` arrived."""
        await self.until(lambda: self.device.stats.count >= after + 2,
                         what="fresh stats from the guest", timeout=timeout)


@dataclasses.dataclass
class Setup:
    """A daemon in this event loop and the QEMU guest it serves."""

    daemon: Daemon
    guest: Guest
    log: DaemonLog
    watch: Watch
    sock: str

    @property
    def device(self) -> Balloon:
        return self.daemon.device

    def check_no_daemon_errors(self) -> None:
        assert not self.log.errors(), "daemon logged errors:\n" + "\n".join(self.log.errors())


@contextlib.asynccontextmanager
async def daemon_and_guest(
    lab, workdir: Path, report, label: str, *, features=None, stats_interval: float = 5.0,
    **guest_kw: Any,
):
    """Start the daemon (listening before QEMU starts), then boot QEMU against it.
    On the way out, every fd the daemon and the guest opened must be closed again."""
    workdir.mkdir(parents=True, exist_ok=True)
    sock = socket_path(workdir)
    log = DaemonLog()
    fds_before = open_fds()
    with log.attached():
        t0 = time.monotonic()
        daemon = Daemon(sock, features=features, stats_interval=stats_interval)
        await daemon.start()
        report.timing("vballoon Daemon(...).start() -> listening", time.monotonic() - t0)
        try:
            assert stat.S_ISSOCK(os.stat(sock).st_mode)  # listening before QEMU starts
            watch = Watch(daemon.device)
            guest = Guest(lab, vhost_balloon_args(sock, daemon.device.max_queues()),
                          workdir=workdir, **guest_kw)
            try:
                await guest.start()
                report.boot(label, guest.boot_seconds)
                yield Setup(daemon, guest, log, watch, sock)
            except Exception as e:
                if not isinstance(e, GuestError):  # those carry QEMU's diagnostics already
                    e.add_note(guest.diagnostics())
                e.add_note("--- daemon log (tail) ---\n" + log.tail())
                raise
            finally:
                await guest.close()
        finally:
            await daemon.close()
    leaked = {fd: target for fd in open_fds() - fds_before if (target := _fd_target(fd))}
    assert not leaked, f"fds left open by the daemon or the guest: {leaked}"


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _fd_target(fd: str) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None  # the fd that listed /proc/self/fd


async def dirty_free_memory(g: Guest, *, leave_mib: int = 40) -> int:
    """Write (then free) nearly all of the guest's free memory, so that the guest's free
    pages are backed by the memfd again; returns the MiB written."""
    free_mib = (await g.meminfo())["MemFree"] // 1024
    mib = max(free_mib - leave_mib, 16)
    await g.dirty(mib)
    return mib


# --------------------------------------------------------------------------- reclaim timing


@dataclasses.dataclass
class Reclaim:
    freed_mib: int
    high: int  # memfd bytes allocated with the workload's pages in use
    low: int  # ... once the shrink after freeing them settled
    t_first: float  # seconds from the free until the memfd shrank by 1 MiB
    t90: float  # ... until 90 % of the final shrink
    t_settled: float  # ... until within 1 MiB of the final value
    samples: int

    @property
    def shrunk(self) -> int:
        return self.high - self.low

    def __str__(self) -> str:
        return (f"freed {self.freed_mib} MiB -> memfd shrank {self.shrunk / MiB:.1f} MiB "
                f"({100 * self.shrunk / (self.freed_mib * MiB):.0f} %); shrinking from "
                f"{self.t_first:.2f} s, 90 % at {self.t90:.2f} s, settled at "
                f"{self.t_settled:.2f} s")


async def settle_memfd(g: Guest, *, quiet: float, timeout: float) -> int:
    """Until the memfd allocation stayed within 1 MiB for `quiet` seconds (boot-time
    free page reporting done); returns it."""
    ref = {"v": g.ram_allocated_bytes(), "t": time.monotonic()}

    def quiet_now() -> bool:
        v, now = g.ram_allocated_bytes(), time.monotonic()
        if abs(v - ref["v"]) > MiB:
            ref.update(v=v, t=now)
        return now - ref["t"] >= quiet

    await wait_until(quiet_now, timeout=timeout, what="guest RAM allocation to settle",
                     interval=0.02)
    return g.ram_allocated_bytes()


async def measure_reclaim(
    g: Guest, mib: int, *, quiet: float = 1.5, timeout: float = 40.0
) -> Reclaim:
    """Dirty `mib` MiB in the guest, free it, and time how the memfd shrinks.

    The clock starts when the guest is told to free the pages. The shrink has
    settled once at least half of `mib` is gone and the allocation then stays
    within 1 MiB for `quiet` seconds.
    """
    await g.dirty(mib, keep=True)
    high = g.ram_allocated_bytes()
    t0 = time.monotonic()
    await g.check("rm /tmp/vb-dirty")
    samples: list[tuple[float, int]] = []
    state = {"since": None}

    def settled() -> bool:
        now, v = time.monotonic() - t0, g.ram_allocated_bytes()
        samples.append((now, v))
        if high - v < mib * MiB // 2:
            return False
        if state["since"] is None or abs(v - samples[state["since"]][1]) > MiB:
            state["since"] = len(samples) - 1
        return now - samples[state["since"]][0] >= quiet

    await wait_until(settled, timeout=timeout,
                     what=f"the memfd to shrink by {mib // 2}+ MiB after freeing {mib} MiB "
                     f"and settle", interval=0.02)
    low = samples[-1][1]
    shrunk = high - low
    t_first = next(t for t, v in samples if high - v >= MiB)
    t90 = next(t for t, v in samples if high - v >= 0.9 * shrunk)
    t_settled = next(t for t, v in samples if v <= low + MiB)
    return Reclaim(mib, high, low, t_first, t90, t_settled, len(samples))


RECLAIM_MIB = 256
RECLAIM_ROUNDS = 2


def report_reclaim(report, label: str, rounds: list[Reclaim]) -> None:
    for i, r in enumerate(rounds, 1):
        report.line(f"reclaim, {label}, round {i}: {r}")
    n = len(rounds)

    def mean(f: Callable[[Reclaim], float]) -> float:
        return sum(map(f, rounds)) / n

    report.line(
        f"reclaim, {label}, mean of {n}: memfd shrank {mean(lambda r: r.shrunk) / MiB:.1f} MiB; "
        f"shrinking from {mean(lambda r: r.t_first):.2f} s, 90 % at {mean(lambda r: r.t90):.2f} s"
        f", settled at {mean(lambda r: r.t_settled):.2f} s; first shrink -> settled "
        f"{mean(lambda r: r.t_settled - r.t_first):.2f} s")


# --------------------------------------------------------------------------- 1, 2, 3: all features


@pytest_asyncio.fixture(scope="class", loop_scope="class")
async def vb_all(lab, tmp_path_factory, qemu_report):
    async with daemon_and_guest(lab, tmp_path_factory.mktemp("all"), qemu_report,
                                "vballoon, all features", stats_interval=0.5) as s:
        yield s


@pytest_asyncio.fixture(scope="class", loop_scope="class")
async def vb_noreport(lab, tmp_path_factory, qemu_report):
    async with daemon_and_guest(lab, tmp_path_factory.mktemp("noreport"), qemu_report,
                                "vballoon, no reporting", features=NO_REPORTING,
                                stats_interval=0) as s:
        yield s


@pytest_asyncio.fixture(scope="class", loop_scope="class")
async def vb_life(lab, tmp_path_factory, qemu_report):
    async with daemon_and_guest(lab, tmp_path_factory.mktemp("life"), qemu_report,
                                "vballoon, no reporting", features=NO_REPORTING,
                                stats_interval=0.5, qmp=True) as s:
        yield s


@pytest.mark.asyncio(loop_scope="class")
class TestAllFeatures:
    """One guest, the daemon offering everything; stats requested every 0.5 s."""

    @pytest.fixture
    def vb(self, vb_all):
        return vb_all

    async def test_driver_binds_and_acks_what_the_daemon_offered(self, vb: Setup):
        g, dev = vb.guest, vb.device
        assert g.insmod_rc == 0
        balloon = await the_balloon(g)
        assert balloon.driver == "virtio_balloon"
        assert balloon.status == 0xF  # ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
        # Guest and daemon agree bit for bit on the negotiated features ...
        assert balloon.features == bits(dev.acked_features)
        # ... which are a subset of what the daemon offered ...
        assert dev.acked_features & ~dev.features() == 0
        # ... and what a stock 6.12 driver takes: all balloon features but PAGE_POISON
        # (this guest does not poison freed pages), VERSION_1, EVENT_IDX.
        assert bits(dev.acked_features) & set(range(24)) == {
            MUST_TELL_HOST, STATS_VQ, DEFLATE_ON_OOM, FREE_PAGE_HINT, REPORTING}
        assert {VERSION_1, EVENT_IDX} <= bits(dev.acked_features)
        session = vb.daemon.server.connection.session
        assert session.features == dev.acked_features | 1 << PROTOCOL_FEATURES
        # Queue roles follow the acked features, numbered as the driver numbers its queues.
        assert dev.roles == expected_roles(dev.acked_features) == {
            0: "inflate", 1: "deflate", 2: "stats", 3: "hint", 4: "reporting"}
        assert len(session.rings) == dev.max_queues()  # QEMU's num_vqs
        assert all(r.enabled and not r.broken for r in session.rings)
        assert dev.poison_val == 0
        assert vb.daemon.server.connections_served == 1
        vb.check_no_daemon_errors()

    async def test_stats_carry_the_guest_memfree(self, vb: Setup):
        g, dev, watch = vb.guest, vb.device, vb.watch
        await watch.until(lambda: dev.stats.count > 0, what="a first stats buffer")

        async def compare() -> tuple[int, int]:
            before = await g.meminfo()
            await watch.fresh_stats(after=dev.stats.count)
            after = await g.meminfo()
            v = dev.stats.values
            assert v["total-memory"] == before["MemTotal"] * KiB
            lo = min(before["MemFree"], after["MemFree"]) * KiB - 4 * MiB
            hi = max(before["MemFree"], after["MemFree"]) * KiB + 4 * MiB
            assert lo <= v["free-memory"] <= hi, (v, before["MemFree"], after["MemFree"])
            assert abs(v["available-memory"] - after["MemAvailable"] * KiB) <= 8 * MiB
            assert dev.stats.updated is not None and abs(dev.stats.updated - time.time()) < 10
            return v["free-memory"], after["MemFree"] * KiB

        free1, guest1 = await compare()
        # The figures follow the guest: take 96 MiB, and free-memory drops with MemFree.
        await g.dirty(96, keep=True)
        free2, guest2 = await compare()
        assert 88 * MiB <= free1 - free2 <= 104 * MiB
        assert 88 * MiB <= guest1 - guest2 <= 104 * MiB
        reported = dev.counters.reported_bytes
        await g.check("rm /tmp/vb-dirty")
        # Fresh stats keep coming at the daemon's interval (0.5 s).
        count, t0 = dev.stats.count, time.monotonic()
        await watch.until(lambda: dev.stats.count >= count + 4, what="4 more stats updates",
                          timeout=15)
        assert time.monotonic() - t0 < 10
        # Leave no reporting behind for the next test (reports in flight hide free pages):
        # the freed 96 MiB get reported about 2 s after the rm.
        await wait_until(lambda: dev.counters.reported_bytes - reported >= 64 * MiB,
                         timeout=30, what="the freed memory to be reported")
        vb.check_no_daemon_errors()

    async def test_inflate_and_deflate(self, vb: Setup, qemu_report):
        g, dev, watch = vb.guest, vb.device, vb.watch
        target = 128 * MiB // PAGE  # 32768 pages
        before, vm0 = await g.meminfo(), await g.vmstat()
        free0 = await g.free_kib(steady=True)
        discarded = dev.counters.discarded_bytes
        t0 = time.monotonic()
        dev.set_target(target)
        await watch.actual(target)
        inflate_s = time.monotonic() - t0
        assert dev.num_pages == target
        assert dev.counters.inflated_pages == target  # the daemon counted each page once
        # Every inflated page was discarded (among other discards: reporting runs too).
        assert dev.counters.discarded_bytes - discarded >= target * PAGE
        after, vm1 = await g.meminfo(), await g.vmstat()
        free1 = await g.free_kib(steady=True)
        assert vm1["balloon_inflate"] - vm0["balloon_inflate"] == target
        # DEFLATE_ON_OOM is acked: the guest keeps MemTotal; its free memory drops instead.
        assert after["MemTotal"] == before["MemTotal"]
        assert abs(free0 - free1 - 128 * 1024) <= 4 * 1024, (free0, free1)

        t0 = time.monotonic()
        dev.set_target(0)
        await watch.actual(0)
        deflate_s = time.monotonic() - t0
        assert dev.counters.inflated_pages == 0
        assert (await g.vmstat())["balloon_deflate"] - vm0["balloon_deflate"] == target
        assert abs(await g.free_kib(steady=True) - free0) <= 4 * 1024
        qemu_report.timing("vballoon inflate 128 MiB (all features)", inflate_s)
        qemu_report.timing("vballoon deflate 128 MiB (all features)", deflate_s)
        vb.check_no_daemon_errors()


# --------------------------------------------------------------------------- 2, 5: no reporting


@pytest.mark.asyncio(loop_scope="class")
class TestWithoutReporting:
    """The daemon offers everything but free page reporting, so nothing but
    the test's own actions discards guest memory: memfd figures are exact."""

    @pytest.fixture
    def vb(self, vb_noreport):
        return vb_noreport

    async def test_roles_without_reporting(self, vb: Setup):
        dev = vb.device
        assert REPORTING not in (await the_balloon(vb.guest)).features
        assert dev.roles == expected_roles(dev.acked_features) == {
            0: "inflate", 1: "deflate", 2: "stats", 3: "hint"}

    async def test_inflate_discards_exactly_the_inflated_pages(self, vb: Setup, qemu_report):
        g, dev, watch = vb.guest, vb.device, vb.watch
        target = 128 * MiB // PAGE
        await dirty_free_memory(g)  # the pages the balloon will take are backed now
        before, free0 = await g.meminfo(), await g.free_kib(steady=True)
        high = g.ram_allocated_bytes()
        discarded, calls = dev.counters.discarded_bytes, dev.counters.discard_calls
        t0 = time.monotonic()
        dev.set_target(target)
        await watch.actual(target)
        inflate_s = time.monotonic() - t0
        low = g.ram_allocated_bytes()
        after, free1 = await g.meminfo(), await g.free_kib(steady=True)
        # Host: the daemon discarded exactly the inflated pages, coalesced into ranges,
        # and the memfd gave back (nearly) that much.
        assert dev.counters.inflated_pages == target
        assert dev.counters.discarded_bytes - discarded == target * PAGE
        assert 0 < dev.counters.discard_calls - calls < target // 4
        assert 120 * MiB <= high - low <= 130 * MiB, (high - low) / MiB
        # Guest: free memory fell by the balloon's size (DEFLATE_ON_OOM: MemTotal stays).
        assert after["MemTotal"] == before["MemTotal"]
        assert abs(free0 - free1 - 128 * 1024) <= 4 * 1024, (free0, free1)

        t0 = time.monotonic()
        dev.set_target(0)
        await watch.actual(0)
        deflate_s = time.monotonic() - t0
        assert dev.counters.inflated_pages == 0
        assert dev.counters.discarded_bytes - discarded == target * PAGE  # deflate discards nothing
        assert abs(await g.free_kib(steady=True) - free0) <= 4 * 1024
        qemu_report.timing("vballoon inflate 128 MiB (no reporting)", inflate_s)
        qemu_report.timing("vballoon deflate 128 MiB (no reporting)", deflate_s)
        qemu_report.line(f"vballoon inflate 128 MiB after dirtying the guest: memfd -"
                         f"{(high - low) / MiB:.1f} MiB, {dev.counters.discard_calls - calls} "
                         f"discard calls")
        vb.check_no_daemon_errors()

    async def test_free_page_hint_round_records_hints_and_discards_nothing(
        self, vb: Setup, qemu_report
    ):
        g, dev, watch = vb.guest, vb.device, vb.watch
        await dirty_free_memory(g)  # free pages backed: a discard would show in the memfd
        before, free0 = await g.meminfo(), await g.free_kib(steady=True)
        high = g.ram_allocated_bytes()
        discarded, hinted = dev.counters.discarded_bytes, dev.counters.hinted_bytes
        t0 = time.monotonic()
        r = dev.start_hint_round()
        assert r.state == "requested" and dev.cmd_id == r.id
        await watch.until(lambda: r.state == "done",
                          what=lambda: f"hint round {r.id:#x} done (it is {r.state})")
        round_s = time.monotonic() - t0
        # Host: hints recorded, whole 4 MiB blocks inside guest RAM, none discarded.
        ranges = [(int(pfn), int(n)) for pfn, n in r.map.ranges()]
        hinted_pages = sum(n for _, n in ranges)
        assert ranges and hinted_pages > 0
        assert dev.counters.hinted_bytes - hinted == hinted_pages * PAGE
        ram_pages = g.mem_mib * MiB // PAGE
        for pfn, n in ranges:  # runs of adjacent blocks
            assert pfn % HINT_BLOCK_PAGES == 0 and n % HINT_BLOCK_PAGES == 0, (pfn, n)
            assert 0 < n and pfn + n <= ram_pages
        assert all(a + n <= b for (a, n), (b, _) in zip(sorted(ranges), sorted(ranges)[1:]))
        # The driver hints (nearly) all its free memory.
        assert hinted_pages * PAGE >= before["MemFree"] * KiB // 2
        assert dev.counters.discarded_bytes == discarded
        assert g.ram_allocated_bytes() >= high - MiB
        assert dev.cmd_id == 1  # VIRTIO_BALLOON_CMD_ID_DONE: the guest may reuse the pages
        # Guest: after DONE the driver gives the hinted pages back to the allocator.
        await eventually(lambda: _free_at_least(g, free0 - 4 * 1024), timeout=30,
                         what="the guest to free the hinted pages after DONE")
        assert g.ram_allocated_bytes() >= high - MiB
        qemu_report.timing("vballoon hint round, request -> done", round_s)
        qemu_report.line(f"vballoon hint round: {hinted_pages * PAGE / MiB:.0f} MiB hinted "
                         f"({len(ranges)} ranges), memfd unchanged")
        vb.check_no_daemon_errors()


async def _free_at_least(g: Guest, kib: int) -> bool:
    return await g.free_kib() >= kib


# --------------------------------------------------------------------------- 4, 8: vs QEMU


@pytest.mark.parametrize("backend", ["vballoon", "qemu-builtin"])
async def test_free_page_reporting_gives_freed_memory_back(
    backend, lab, make_guest, tmp_path, qemu_report
):
    """Same workload on a fresh guest for both back-ends: boot, let boot-time reporting
    settle, then RECLAIM_ROUNDS times dirty RECLAIM_MIB MiB and free it."""
    async with contextlib.AsyncExitStack() as stack:
        if backend == "vballoon":
            s = await stack.enter_async_context(daemon_and_guest(
                lab, tmp_path / "vb", qemu_report, "vballoon, all features", stats_interval=0))
            g, dev = s.guest, s.device
            assert dev.roles[4] == "reporting"
        else:
            g = await make_guest(BUILTIN_REPORTING_BALLOON, label="QEMU virtio-balloon-pci")
            s = dev = None
            assert REPORTING in (await the_balloon(g)).features
        await settle_memfd(g, quiet=2.5, timeout=30)
        rounds = []
        for _ in range(RECLAIM_ROUNDS):
            free_before = await g.free_kib(steady=True)
            counters = dataclasses.replace(dev.counters) if dev else None
            r = await measure_reclaim(g, RECLAIM_MIB)
            rounds.append(r)
            # Host: the memfd gave back (nearly) all the freed memory.
            assert r.shrunk >= 0.8 * RECLAIM_MIB * MiB, str(r)
            if dev is not None:
                # Daemon: the pages came in as reports, were discarded (coalesced), and
                # every byte the memfd shrank by went through a discard.
                reported = dev.counters.reported_bytes - counters.reported_bytes
                discarded = dev.counters.discarded_bytes - counters.discarded_bytes
                assert reported >= 0.8 * RECLAIM_MIB * MiB
                assert discarded == reported  # poison_val is 0: every report is discarded
                assert discarded >= r.shrunk - MiB
                assert dev.counters.discard_calls > counters.discard_calls
            # Guest: the freed memory is free again (reported pages go back to the guest).
            await eventually(lambda: _free_at_least(g, free_before - 4 * 1024), timeout=30,
                             what="the guest's free memory back after the reports")
        report_reclaim(qemu_report, f"{backend} ({RECLAIM_MIB} MiB)", rounds)
        if s is not None:
            s.check_no_daemon_errors()


# --------------------------------------------------------------------------- 7: feature subsets


@pytest.mark.parametrize("features", [["stats"], ["free-page-reporting"]], ids="+".join)
async def test_guest_acks_a_subset_and_inflate_still_works(features, lab, tmp_path, qemu_report):
    async with daemon_and_guest(lab, tmp_path / "vb", qemu_report,
                                "vballoon, feature subset", features=features,
                                stats_interval=0.5) as s:
        g, dev, watch = s.guest, s.device, s.watch
        balloon = await the_balloon(g)
        offered_balloon_bits = {FEATURE_NAMES[f] for f in features}
        assert balloon.driver == "virtio_balloon"
        assert balloon.features == bits(dev.acked_features)
        assert bits(dev.acked_features) & set(range(24)) == offered_balloon_bits
        assert dev.roles == expected_roles(dev.acked_features)
        assert len(s.daemon.server.connection.session.rings) == dev.max_queues()

        # No DEFLATE_ON_OOM: the driver takes inflated pages out of MemTotal.
        before = await g.meminfo()
        dev.set_target(64 * MiB // PAGE)
        await watch.actual(64 * MiB // PAGE)
        assert dev.counters.inflated_pages == 64 * MiB // PAGE
        assert before["MemTotal"] - (await g.meminfo())["MemTotal"] == 64 * 1024
        dev.set_target(0)
        await watch.actual(0)
        assert (await g.meminfo())["MemTotal"] == before["MemTotal"]
        assert dev.counters.inflated_pages == 0

        if "stats" in features:  # on queue 2, as without the feature it is absent
            count = dev.stats.count
            await watch.fresh_stats(after=count)
            assert abs(dev.stats.values["free-memory"]
                       - (await g.meminfo())["MemFree"] * KiB) <= 8 * MiB
        if "free-page-reporting" in features:  # reporting moved down to queue 2
            assert dev.roles[2] == "reporting"
            reported = dev.counters.reported_bytes
            r = await measure_reclaim(g, 128, quiet=0.5)
            assert r.shrunk >= 96 * MiB
            assert dev.counters.reported_bytes - reported >= 96 * MiB
        s.check_no_daemon_errors()


# --------------------------------------------------------------------------- 6: lifecycle


@pytest.mark.asyncio(loop_scope="class")
class TestLifecycle:
    """Reboots and QEMU exits, with one daemon that outlives them. No free page reporting,
    so that the guest's free memory is exact (reports in flight hide free pages)."""

    @pytest.fixture
    def vb(self, vb_life):
        return vb_life

    async def test_reboot_reinitialises_the_device(self, vb: Setup, qemu_report):
        g, dev, watch, log = vb.guest, vb.device, vb.watch, vb.log
        dev.set_target(16384)
        await watch.actual(16384)
        session = vb.daemon.server.connection.session
        acks = len(log.messages("features acked"))
        stats = dev.stats.count
        old_boot = g.boot_id
        assert await g.reboot() != old_boot
        qemu_report.timing("guest reboot (vballoon) -> READY", g.boot_seconds)
        assert g.insmod_rc == 0
        # The same connection carried the reset: the new driver negotiated again and
        # the rings were set up and enabled again.
        assert vb.daemon.server.connection.session is session
        assert vb.daemon.server.connections_served == 1
        assert len(log.messages("features acked")) == acks + 1
        balloon = await the_balloon(g)
        assert balloon.driver == "virtio_balloon" and balloon.status == 0xF
        assert balloon.features == bits(dev.acked_features)
        assert all(r.enabled and not r.broken for r in session.rings)
        # Rings work after the restart: stats flow, and the balloon follows the target.
        await watch.fresh_stats(after=max(stats, dev.stats.count))
        dev.set_target(0)
        await watch.actual(0)
        free0 = await g.free_kib(steady=True)
        dev.set_target(8192)
        await watch.actual(8192)
        assert abs(free0 - await g.free_kib(steady=True) - 32 * 1024) <= 4 * 1024
        dev.set_target(0)
        await watch.actual(0)
        vb.check_no_daemon_errors()

    async def test_reboot_starts_the_daemon_with_an_empty_balloon(self, vb: Setup):
        """QEMU's generic device sends no reset when the guest reboots: it stops every ring
        (GET_VRING_BASE) and starts them again for the new driver. The daemon must still
        forget the old driver's balloon, or the pages the new driver inflates that were in
        the old one are neither counted nor discarded (found by this test, fixed in 8c66a1f)."""
        g, dev, watch = vb.guest, vb.device, vb.watch
        dev.set_target(16384)
        await watch.actual(16384)
        discarded = dev.counters.discarded_bytes
        rebooted = time.monotonic()
        await g.reboot()
        # The target survives the reset (as with QEMU's own balloon), so the new driver
        # inflates 16384 pages again. Wait for it to say so itself (a SET_CONFIG after
        # the reboot), not for the daemon's possibly stale copy of `actual`.
        await watch.until(lambda: dev.actual == 16384 and any(
            t > rebooted and isinstance(w, ActualChanged) for t, w in watch.changes),
            what="the new driver to inflate to the persisting target")
        assert dev.counters.inflated_pages == dev.actual == 16384
        # ... and those pages (of a new driver) were discarded again.
        assert dev.counters.discarded_bytes - discarded >= 16384 * PAGE
        dev.set_target(0)
        await watch.actual(0)
        assert dev.counters.inflated_pages == 0

    async def test_pause_and_resume_keep_the_balloon(self, vb: Setup):
        """QMP stop/cont stops the rings and starts them again at the indices
        GET_VRING_BASE gave: the same driver goes on, with its balloon."""
        g, dev, watch = vb.guest, vb.device, vb.watch
        dev.set_target(16384)
        await watch.actual(16384)
        discarded = dev.counters.discarded_bytes
        session = vb.daemon.server.connection.session
        restarts = len(vb.log.messages("a new driver"))
        await g.qmp.execute("stop")
        await g.qmp.wait_event("STOP")
        # QEMU stopped the device: every ring answered GET_VRING_BASE.
        await wait_until(lambda: not any(r.running or r.kick_fd for r in session.rings),
                         timeout=10, what="QEMU to stop the rings")
        await g.qmp.execute("cont")
        await g.qmp.wait_event("RESUME")
        assert len(vb.log.messages("a new driver")) == restarts
        assert dev.actual == dev.counters.inflated_pages == 16384
        # The rings run again and the balloon still follows the target.
        dev.set_target(8192)
        await watch.actual(8192)
        assert dev.counters.inflated_pages == 8192
        dev.set_target(0)
        await watch.actual(0)
        assert dev.counters.inflated_pages == 0
        assert dev.counters.discarded_bytes == discarded  # deflating discards nothing
        vb.check_no_daemon_errors()

    async def test_daemon_survives_qemu_exit_and_serves_the_next_qemu(
        self, vb: Setup, lab, tmp_path_factory, qemu_report
    ):
        daemon, dev, watch = vb.daemon, vb.device, vb.watch
        if dev.num_pages:  # left over by a failing test before
            dev.set_target(0)
            await watch.actual(0)
        # 1. The guest powers off: QEMU exits, the daemon closes that session.
        assert await vb.guest.poweroff() == 0
        await wait_until(lambda: daemon.server.connection is None, timeout=15,
                         what="the daemon to drop the connection of the exited QEMU")
        assert dev.acked_features == 0 and dev.roles == {} and dev.actual == 0
        assert os.path.exists(vb.sock)
        # 2. A second QEMU on the same socket (the daemon kept listening).
        workdir = tmp_path_factory.mktemp("life2")
        async with contextlib.AsyncExitStack() as stack:
            g2 = Guest(lab, vhost_balloon_args(vb.sock, dev.max_queues()), workdir=workdir)
            stack.push_async_callback(g2.close)
            await g2.start()
            qemu_report.boot("vballoon, no reporting", g2.boot_seconds)
            assert daemon.server.connections_served == 2
            assert (await the_balloon(g2)).features == bits(dev.acked_features)
            free0 = await g2.free_kib(steady=True)
            dev.set_target(16384)
            await watch.actual(16384)
            assert abs(free0 - await g2.free_kib(steady=True) - 64 * 1024) <= 4 * 1024
            assert dev.counters.inflated_pages == 16384
            # 3. That QEMU is killed (no orderly stop of the rings at all).
            assert await g2.kill() == -signal.SIGKILL
            await wait_until(lambda: daemon.server.connection is None, timeout=15,
                             what="the daemon to drop the connection of the killed QEMU")
        assert dev.acked_features == 0 and dev.counters.inflated_pages == 0
        # 4. Still serving: a third front-end is accepted (and may leave at once).
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(10)
            probe.connect(vb.sock)
            await wait_until(lambda: daemon.server.connections_served == 3, timeout=10,
                             what="the daemon to accept a third front-end")
        await wait_until(lambda: daemon.server.connection is None, timeout=10,
                         what="the daemon to drop the probe connection")
        vb.check_no_daemon_errors()


# --------------------------------------------------------------------------- the real command


class CliDaemon:
    """`python -m vballoon serve ...` as a child process; stdout and stderr collected."""

    def __init__(self, args: list[str]):
        self.argv = [sys.executable, "-m", "vballoon", *args]
        self.proc: asyncio.subprocess.Process | None = None
        self.out = bytearray()
        self._more = asyncio.Event()
        self._readers: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, cwd=REPO, preexec_fn=set_pdeathsig,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._readers = [asyncio.create_task(self._read(s))
                         for s in (self.proc.stdout, self.proc.stderr)]

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while data := await stream.read(1 << 16):
            self.out += data
            self._more.set()
        self._more.set()

    @property
    def text(self) -> str:
        return self.out.decode(errors="replace")

    async def wait_for(self, pattern: str, *, timeout: float = 30.0) -> re.Match[str]:
        try:
            async with asyncio.timeout(timeout):
                while not (m := re.search(pattern, self.text)):
                    if self.proc.returncode is not None:
                        raise AssertionError(f"vballoon exited ({self.proc.returncode}) "
                                             f"before printing {pattern!r}:\n{self.text}")
                    self._more.clear()
                    await self._more.wait()
                return m
        except TimeoutError:
            raise GuestTimeout(f"vballoon did not print {pattern!r} within {timeout} s:\n"
                               f"{self.text[-3000:]}") from None

    async def stop(self, *, timeout: float = 15.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.wait_for(asyncio.gather(*self._readers), timeout)
        return rc

    async def kill(self) -> None:
        if self.proc and self.proc.returncode is None:
            self.proc.kill()
            await asyncio.wait_for(self.proc.wait(), 15)
        for t in self._readers:
            t.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)


async def test_vballoon_serve_command(lab, make_guest, tmp_path, qemu_report):
    """The shipped command with a feature switched off: QEMU's num_vqs follows, and the
    reporting queue moves down to index 3. Steered through its control socket with QEMU's
    own QMP commands; freed guest memory leaves the memfd."""
    sock, ctl_sock = socket_path(tmp_path), str(tmp_path / "ctl.sock")
    cli = CliDaemon(["--log-level", "info", "serve", "--socket-path", sock,
                     "--control-socket", ctl_sock,
                     "--feature", "free-page-hint=off", "--stats-interval", "0.5"])
    t0 = time.monotonic()
    await cli.start()
    try:
        await cli.wait_for(r"vballoon: ready on " + re.escape(sock))
        ready_s = time.monotonic() - t0
        m = await cli.wait_for(r"queues: (\d+), features offered: (0x[0-9a-f]+)")
        num_vqs, offered = int(m[1]), int(m[2], 16)
        assert num_vqs == Balloon(NO_HINT).max_queues()
        g = await make_guest(vhost_balloon_args(sock, num_vqs), label="vballoon serve (CLI)")
        balloon = await the_balloon(g)
        assert balloon.driver == "virtio_balloon"
        assert FREE_PAGE_HINT not in balloon.features and REPORTING in balloon.features
        assert balloon.features <= bits(offered)
        m = await cli.wait_for(r"features acked (0x[0-9a-f]+); queues: (.*)")
        assert bits(int(m[1], 16)) == balloon.features
        assert m[2] == "0=inflate, 1=deflate, 2=stats, 3=reporting"
        # The control socket: QEMU's balloon / query-balloon / BALLOON_CHANGE, in bytes of
        # guest memory after ballooning.
        ctl = await Qmp.connect(ctl_sock)
        try:
            ram = g.mem_mib * MiB
            assert await ctl.execute("query-balloon") == {"actual": ram}
            vm0, free0 = await g.vmstat(), (await g.meminfo())["MemFree"] * KiB
            await ctl.execute("balloon", {"value": ram - 64 * MiB})
            await ctl.wait_event("BALLOON_CHANGE", match=lambda d: d["actual"] == ram - 64 * MiB)
            assert await ctl.execute("query-balloon") == {"actual": ram - 64 * MiB}
            assert (await g.vmstat())["balloon_inflate"] - vm0["balloon_inflate"] == 16384

            async def stats_show_the_balloon() -> bool:
                stats = (await ctl.execute("query-guest-stats"))["stats"]
                return stats["stat-free-memory"] <= free0 - 56 * MiB

            # The guest's stats (requested every 0.5 s) show the 64 MiB gone from MemFree.
            await eventually(stats_show_the_balloon, timeout=15, interval=0.1,
                             what="query-guest-stats to show the inflated balloon")
            await ctl.execute("balloon", {"value": ram})
            await ctl.wait_event("BALLOON_CHANGE", match=lambda d: d["actual"] == ram)
            assert (await g.vmstat())["balloon_deflate"] - vm0["balloon_deflate"] == 16384
        finally:
            await ctl.close()
        # Free page reporting through the command: the memfd gives the memory back.
        r = await measure_reclaim(g, 192, quiet=0.5)
        assert r.shrunk >= 150 * MiB, str(r)
        # QEMU exits; the daemon stays up for the next one, and stops cleanly on SIGTERM.
        assert await g.poweroff() == 0
        await cli.wait_for(r"front-end disconnected")
        assert cli.proc.returncode is None and os.path.exists(sock)
        assert await cli.stop() == 0
        assert not os.path.exists(sock) and not os.path.exists(ctl_sock)
        assert not re.search(r"ERROR|Traceback", cli.text), cli.text
        qemu_report.timing("vballoon serve: exec -> ready", ready_s)
        qemu_report.line(f"reclaim, vballoon serve (CLI, 192 MiB): {r}")
    except Exception as e:
        e.add_note(f"--- vballoon serve output (tail) ---\n{cli.text[-4000:]}")
        raise
    finally:
        await cli.kill()
