"""`vballoon migrate`: live migration of a QEMU guest whose RAM the engine copies itself,
skipping the pages the guest reported free (protocol/migration-stream.md, MIGRATION.md).

Source (:func:`migrate_source`)                     Destination (:func:`migrate_destination`)
  tracker on (QEMU + daemon)                          QEMU -incoming defer -S, RAM file punched to 0
  free-page round (daemon) -> map
  pass 0: RAM minus map minus zero pages  ------->    pwrite
  dirty passes until they converge        ------->    pwrite
  device_del balloon, collect, chardev-remove
  "incoming"                              ------->    x-ignore-shared, migrate-incoming
  migrate (x-ignore-shared, pause-before-switchover)  QEMU: device state only
  at pre-switchover: final pass            ------->   pwrite; "synced"
  migrate-continue, completed, check pass  ------->   "complete": cont; "resumed"
                                                       chardev-add + device_add, balloon target; "done"

Safety: until migrate-continue, any failure cancels QEMU's migration, re-plugs the balloon on
the source and restores its target, and tells the destination to tear down (it quits its QEMU).
A map is used only from a round that completed and was requested after tracking started; pages
are skipped as zero only if they were never sent and the destination file was punched to zero.
"""
from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import errno
import itertools
import logging
import os
import time
from typing import Any, Callable

import numpy as np

import vballoon.migrate.stream as S
from vballoon.migrate.dirty import DirtyTracker
from vballoon.migrate.qemu import QEMUError, QMP, QMPError, DeviceSpec, plug, unplug
from vballoon.units import FRAME

log = logging.getLogger(__name__)
PAGE_SIZE = FRAME          # the map's frame: the unit the engine tracks, copies and skips
SEEK_DATA, SEEK_HOLE = 3, 4
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


class MigrationError(Exception):
    """The migration failed; the message says where and why (and what state things are in)."""


@dataclasses.dataclass
class PassStats:
    name: str
    candidates: int = 0      # pages this pass had to consider
    data_pages: int = 0      # pages sent with their contents
    zero_pages: int = 0      # pages sent as ZERO (were sent before, now zero)
    zero_skipped: int = 0    # zero pages never sent: skipped
    map_skipped: int = 0     # pages skipped because the round reported them free
    bytes: int = 0           # stream bytes of this pass
    seconds: float = 0.0
    deferred: int = 0        # pages written since the last look, held back for a later pass

    def line(self) -> str:
        return (f"{self.name:<10} {self.candidates:>8} pages considered, {self.data_pages:>8} sent "
                f"({self.bytes / 2**20:8.1f} MiB), {self.zero_skipped:>8} zero skipped, "
                f"{self.map_skipped:>8} free (map), {self.deferred:>7} deferred, {self.seconds * 1000:6.0f} ms")


@dataclasses.dataclass
class Summary:
    ram_pages: int
    passes: list[PassStats]
    map_kind: str | None = None
    map_round: dict[str, Any] | None = None
    downtime_ms: float = 0.0          # source vCPUs stopped -> destination running
    qemu_downtime_ms: int | None = None
    qemu_bytes: int = 0               # QEMU's own stream (device state)
    total_seconds: float = 0.0
    replug_seconds: float = 0.0
    downtime_parts: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def data_pages(self) -> int:
        return sum(p.data_pages for p in self.passes)

    @property
    def stream_bytes(self) -> int:
        return sum(p.bytes for p in self.passes)

    def text(self) -> str:
        lines = [p.line() for p in self.passes]
        free = sum(p.map_skipped for p in self.passes)
        lines.append(
            f"total: {self.stream_bytes / 2**20:.1f} MiB on the stream ({self.data_pages} pages) + "
            f"{self.qemu_bytes / 2**10:.0f} KiB of QEMU device state; RAM {self.ram_pages} pages "
            f"({self.ram_pages * PAGE_SIZE / 2**20:.0f} MiB); map: "
            + (f"{self.map_kind} round, {free} free pages skipped ({free * PAGE_SIZE / 2**20:.1f} MiB)"
               if self.map_kind else "none"))
        parts = ", ".join(f"{k} {v:.0f}" for k, v in self.downtime_parts.items())
        lines.append(f"downtime {self.downtime_ms:.0f} ms ({parts}; QEMU says {self.qemu_downtime_ms} ms); "
                     f"total {self.total_seconds:.2f} s; balloon re-plugged in {self.replug_seconds:.2f} s")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"ram-pages": self.ram_pages, "map-kind": self.map_kind, "stream-bytes": self.stream_bytes,
                "data-pages": self.data_pages, "downtime-ms": self.downtime_ms,
                "qemu-downtime-ms": self.qemu_downtime_ms, "qemu-bytes": self.qemu_bytes,
                "downtime-parts-ms": self.downtime_parts,
                "total-seconds": self.total_seconds,
                "passes": [dataclasses.asdict(p) for p in self.passes]}


# ----------------------------------------------------------------------------- RAM file


def data_mask(fd: int, npages: int) -> np.ndarray:
    """True for pages in a data extent of the file (holes read as zero)."""
    mask = np.zeros(npages, dtype=bool)
    size = npages * PAGE_SIZE
    off = 0
    while off < size:
        try:
            start = os.lseek(fd, off, SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break
            mask[:] = True  # no SEEK_DATA: assume everything is data
            return mask
        end = min(os.lseek(fd, start, SEEK_HOLE), size)
        mask[start // PAGE_SIZE:(end + PAGE_SIZE - 1) // PAGE_SIZE] = True
        off = end
    return mask


def runs(pages: np.ndarray, limit: int) -> list[tuple[int, int]]:
    """Sorted pages -> (first, count) runs of consecutive pages, each at most `limit` long."""
    if len(pages) == 0:
        return []
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    out = []
    for chunk in np.split(pages, breaks):
        first, n = int(chunk[0]), len(chunk)
        for off in range(0, n, limit):
            out.append((first + off, min(limit, n - off)))
    return out


class Sender:
    """Reads pages from the source RAM file and puts them on the stream; remembers what was sent."""

    def __init__(self, chan: S.Channel, fd: int, npages: int, *, max_bandwidth: float = 0,
                 skip_zero: bool = True) -> None:
        self.chan, self.fd, self.npages = chan, fd, npages
        self.sent = np.zeros(npages, dtype=bool)
        self.max_bandwidth = max_bandwidth
        self.skip_zero = skip_zero
        self.paced = True  # off for the final pass: vCPUs are stopped (QEMU lifts its limit too)
        self._next = 0.0  # when the bytes sent so far may have left at max_bandwidth

    async def _pace(self, nbytes: int) -> None:
        """Hold the stream to max_bandwidth (no credit for idle time: no bursts above it)."""
        if self.max_bandwidth <= 0 or not self.paced:
            return
        now = time.monotonic()
        self._next = max(self._next, now) + nbytes / self.max_bandwidth
        if self._next - now > 0.002:
            await asyncio.sleep(self._next - now)

    async def send(self, pages: np.ndarray, st: PassStats) -> None:
        before = self.chan.bytes_sent
        try:
            await self._send(pages, st)
        finally:
            st.bytes += self.chan.bytes_sent - before

    async def _send(self, pages: np.ndarray, st: PassStats) -> None:
        for first, count in runs(pages, S.MAX_BATCH):
            buf = os.pread(self.fd, count * PAGE_SIZE, first * PAGE_SIZE)
            if len(buf) != count * PAGE_SIZE:
                raise MigrationError(f"short read of the RAM file at page {first}")
            words = np.frombuffer(buf, dtype=np.uint64).reshape(count, PAGE_SIZE // 8)
            nonzero = words.any(axis=1) if self.skip_zero else np.ones(count, dtype=bool)
            sent = self.sent[first:first + count]
            # a page goes as data if non-zero; as ZERO if zero now but sent before; else skipped
            kind = np.where(nonzero, 2, np.where(sent, 1, 0))
            i = 0
            while i < count:
                j = i + 1
                while j < count and kind[j] == kind[i]:
                    j += 1
                if kind[i] == 2:
                    await self.chan.send(S.encode_pages_header(first + i, j - i, PAGE_SIZE),
                                         memoryview(buf)[i * PAGE_SIZE:j * PAGE_SIZE])
                    st.data_pages += j - i
                    await self._pace((j - i) * PAGE_SIZE)
                elif kind[i] == 1:
                    await self.chan.send(S.encode_zero(first + i, j - i))
                    st.zero_pages += j - i
                else:
                    st.zero_skipped += j - i
                i = j
            sent |= kind > 0


# ----------------------------------------------------------------------------- source


@dataclasses.dataclass
class SourceOptions:
    qmp: str                              # source QEMU's QMP socket
    dest: str                             # host:port, or a Unix socket path
    control: str | None = None            # source daemon's control socket (map, balloon target)
    map: str = "auto"                     # none | hint | bitmap | auto
    device_id: str | None = None
    vhost_socket: str | None = None       # the source daemon's vhost-user socket, to re-plug on
                                          # failure (default: what QEMU's chardev connected to)
    round_timeout: float = 60.0
    max_passes: int = 8
    converge_pages: int = 2048            # stop the dirty passes below this many pages
    quiet_window: float = 0.25            # s: a dirty pass sends a page only once it was not
                                          # written for at least this long (the time between
                                          # two looks; a pass that ends sooner waits)
    final_pages: int = 256                # stop converging before the stop below this many
    downtime_limit: float | None = None   # s: converge until the final pass should fit (QEMU's
                                          # downtime-limit); None: stop when passes stop shrinking
    converge_timeout: float = 60.0        # s: give up converging towards downtime_limit
    max_bandwidth: float = 0              # bytes/s on the stream, 0: unlimited
    skip_zero: bool = True
    migrate_timeout: float = 120.0
    progress: Callable[[str], None] | None = None
    fail_at: str | None = None            # tests: raise at this step ("after-unplug", "pre-switchover")
    on_synced: Callable[[np.ndarray], Any] | None = None  # tests: both sides stopped and equal
                                          # outside the map (called with the free-page mask)


async def open_stream(dest: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        if dest.startswith("/") or dest.startswith("unix:"):
            return await asyncio.open_unix_connection(dest.removeprefix("unix:"), limit=1 << 24)
        host, _, port = dest.rpartition(":")
        return await asyncio.open_connection(host.strip("[]") or "127.0.0.1", int(port), limit=1 << 24)
    except (OSError, ValueError) as e:
        raise MigrationError(f"cannot connect to the destination {dest}: {e}") from None


async def migrate_source(opt: SourceOptions) -> Summary:
    say = opt.progress or (lambda s: log.info("%s", s))
    t_start = time.monotonic()
    qmp = await QMP.connect(opt.qmp)
    tracker: DirtyTracker | None = None
    chan: S.Channel | None = None
    spec: DeviceSpec | None = None
    fd = -1
    unplugged = unplug_tried = migrating = continued = False
    client = None
    target: int | None = None
    try:
        status = (await qmp.execute("query-status"))["status"]
        if status != "running":
            raise MigrationError(f"the source guest is {status!r}, not running")
        ram_path, ram_bytes = await qmp.ram_file()
        if ram_bytes % PAGE_SIZE or os.stat(ram_path).st_size != ram_bytes:
            raise MigrationError(f"RAM file {ram_path} is {os.stat(ram_path).st_size} bytes; QEMU says {ram_bytes}")
        npages = ram_bytes // PAGE_SIZE
        spec = await qmp.balloon_device(opt.device_id)
        fd = os.open(ram_path, os.O_RDONLY | os.O_CLOEXEC)

        reader, writer = await open_stream(opt.dest)
        chan = S.Channel(reader, writer, page_size=PAGE_SIZE)
        await chan.send_control(S.hello(page_size=PAGE_SIZE, ram_bytes=ram_bytes, device=spec.to_json()))
        S.check_hello(await chan.recv_control("hello"), page_size=PAGE_SIZE, ram_bytes=ram_bytes)
        sender = Sender(chan, fd, npages, max_bandwidth=opt.max_bandwidth, skip_zero=opt.skip_zero)
        summary = Summary(ram_pages=npages, passes=[])

        # 1. dirty tracking in every process that maps the RAM file writable, before the round
        tracker = DirtyTracker(ram_path, page_size=PAGE_SIZE)
        tracker.start()
        if qmp.pid not in tracker.pids:
            raise MigrationError(f"QEMU (pid {qmp.pid}) does not map {ram_path} shared and writable")
        say(f"tracking writes to {ram_path} in processes {tracker.pids}")

        # 2. the free-page round (its request comes after tracking started: contract rule 1)
        free = np.zeros(npages, dtype=bool)
        if opt.control:
            from vballoon.control.client import AsyncClient
            client = AsyncClient(opt.control)
            await client.connect()
            target = (await client.query_balloon()).actual
        if opt.map != "none" and client is not None:
            t0 = time.monotonic()
            try:
                r = await client.start_round(opt.map, wait=True, timeout=opt.round_timeout)
            except Exception as e:  # no driver, no feature, timeout: migrate without a map
                say(f"free-page round failed ({e}); no map")
                r = None
            if r is not None and r.complete and (r.ram_pages != npages or ram_bytes >= 0xB0000000):
                # pfn == file page only while all RAM sits below the PCI hole (q35/pc: < 2.75 GiB)
                say(f"round {r.id}: guest-physical layout is not the RAM file's; no map")
            elif r is not None and r.complete:
                for start, count in await client.free_ranges(r.id):
                    free[max(0, start):max(0, min(npages, start + count))] = True
                summary.map_kind, summary.map_round = r.kind, {"id": r.id, "free-pages": r.free_pages,
                                                               "coverage": r.coverage}
                say(f"{r.kind} round {r.id}: {int(free.sum())} free pages in {time.monotonic() - t0:.2f} s")
            elif r is not None:
                say(f"round {r.id} ended {r.state} ({r.abort_reason or 'incomplete'}); no map")

        # 3. pass 0: everything but the free pages (and the file's holes: zero, never sent).
        # Pages written while the round ran are still changing: they wait for the dirty passes,
        # like every page written since the last look (step 4).
        pending = np.zeros(npages, dtype=bool)

        def mask(pages: np.ndarray) -> np.ndarray:
            m = np.zeros(npages, dtype=bool)
            m[pages] = True
            return m

        st = PassStats("pass 0")
        t0 = t_look = time.monotonic()
        pending[:] = mask(tracker.collect())
        has_data = data_mask(fd, npages)
        st.map_skipped = int((free & has_data).sum())
        st.zero_skipped = int((~has_data).sum())
        cand = np.flatnonzero(has_data & ~free & ~pending)
        st.candidates = npages
        await sender.send(cand, st)
        st.deferred = int(pending.sum())
        st.seconds = time.monotonic() - t0
        summary.passes.append(st)
        say(st.line())

        # 4. dirty passes.  A page is sent once it has stopped changing: pages written since
        # the last look stay pending (a hot page would only be sent again), pending pages that
        # were not written since are sent now.  What is still pending goes in the final pass.
        async def step(name: str, dirty: np.ndarray, *, flush: bool = False,
                       t0: float | None = None, report: bool = True) -> PassStats:
            t0 = time.monotonic() if t0 is None else t0
            cur = mask(dirty)
            pending[:] |= cur
            go = pending if flush else pending & ~cur
            st = PassStats(name, candidates=len(dirty))
            await sender.send(np.flatnonzero(go), st)
            pending[go] = False
            st.deferred = int(pending.sum())
            st.seconds = time.monotonic() - t0
            if report:
                summary.passes.append(st)
                say(st.line())
            return st

        async def dirty_passes(label: str, limit: int) -> None:
            # "Not written since the last look" means "stopped changing" only if the last look
            # was long enough ago: after a pass that took a millisecond (nothing to send, e.g.
            # right after a bitmap round, which dirties nothing), almost every page of a hot
            # working set looks quiet, is sent, and is rewritten at once.
            nonlocal t_look
            prev = None
            for n in range(1, limit + 1):
                await asyncio.sleep(max(0.0, t_look + opt.quiet_window - time.monotonic()))
                t_look = time.monotonic()
                dirty = tracker.collect()
                await step(f"{label}{n}", dirty)
                # stop once small, or once the written set no longer shrinks by a tenth
                if len(dirty) <= opt.converge_pages or (prev is not None and len(dirty) > 0.9 * prev):
                    break
                prev = len(dirty)

        await dirty_passes("pass ", opt.max_passes)

        # 5. unplug the balloon (it blocks migration); collect the daemon's last writes
        if client is not None:
            target = (await client.query_balloon()).actual
            await client.close()
            client = None
        t0 = time.monotonic()
        unplug_tried = True
        await unplug(qmp, spec)
        unplugged = True
        dirty = tracker.collect()  # the device has stopped: the daemon writes no more
        for pid in tracker.pids:
            if pid != qmp.pid:
                tracker.release(pid)
        await qmp.execute("chardev-remove", {"id": spec.chardev})
        st = await step("unplug", dirty, t0=t0)
        # pages the daemon discarded (free page reporting, inflation) after they were sent read
        # zero here without having been written: the destination must read zero too.  The
        # daemon is disconnected now, and nothing else discards guest RAM.
        punched = np.flatnonzero(sender.sent & ~data_mask(fd, npages))
        for first, count in runs(punched, 1 << 30):
            await chan.send(S.encode_zero(first, count))
            st.zero_pages += count
            st.bytes += S.HEADER.size + S.ZERO_BODY.size
        sender.sent[punched] = False
        if opt.fail_at == "after-unplug":
            raise MigrationError("injected failure after unplug (test)")

        # 6. QEMU migrates device state only
        await chan.send_control({"type": "incoming"})
        uri = (await chan.recv_control("incoming-ready"))["uri"]
        await qmp.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": True},
            {"capability": "pause-before-switchover", "state": True}]})
        # converge before the stop: now every written page goes (classic pre-copy), pass after
        # pass while that shrinks, so the final pass holds only what is written in the moment
        # between the last of these and pre-switchover
        # With a downtime limit, keep going (QEMU's trade: bytes for downtime) until the pages
        # written since the last pass could be sent within it, or converge_timeout runs out.
        prev = None
        t_conv = time.monotonic()
        for n in itertools.count(1):
            dirty = tracker.collect()
            st = await step(f"pre-mig {n}", dirty, flush=True)
            if len(dirty) <= opt.final_pages:
                break
            if opt.downtime_limit is not None:
                rate = opt.max_bandwidth or (st.bytes / st.seconds if st.seconds > 0.01 else 0)
                if len(dirty) * PAGE_SIZE <= opt.downtime_limit * rate:
                    break
                if time.monotonic() - t_conv > opt.converge_timeout:
                    say(f"no pass fits the downtime limit after {opt.converge_timeout:.0f} s; stopping anyway")
                    break
            elif n >= opt.max_passes or (prev is not None and len(dirty) > 0.9 * prev):
                break
            prev = len(dirty)
        await qmp.execute("migrate", {"uri": uri})
        migrating = True
        await qmp.wait_migration({"pre-switchover"}, timeout=opt.migrate_timeout, poll=0.002)
        t_stop = time.monotonic()
        if opt.fail_at == "pre-switchover":
            raise MigrationError("injected failure at pre-switchover (test)")

        # 7. the final pass, vCPUs stopped
        sender.paced = False
        st = await step("final", tracker.collect(), flush=True, t0=t_stop, report=False)
        await chan.send_control({"type": "final"})
        await chan.recv_control("synced")
        st.seconds = time.monotonic() - t_stop
        summary.passes.append(st)
        say(st.line())
        t1 = time.monotonic()
        await qmp.execute("migrate-continue", {"state": "pre-switchover"})
        continued = True
        info = await qmp.wait_migration({"completed"}, timeout=opt.migrate_timeout, poll=0.002)
        t2 = time.monotonic()
        # nothing may write guest RAM on a stopped source; check, and send it if something did
        # (the final pass looked for new writers in /proc, with the source already stopped)
        dirty = tracker.collect(rescan=False)
        st = PassStats("check", candidates=len(dirty))
        await sender.send(dirty, st)
        summary.passes.append(st)
        t3 = time.monotonic()
        if opt.on_synced is not None:
            await chan.send_control({"type": "final"})
            await chan.recv_control("synced")
            t_hook = time.monotonic()
            r = opt.on_synced(free)
            if asyncio.iscoroutine(r):
                await r
            t_stop += time.monotonic() - t_hook  # the test's own look is not downtime
        t4 = time.monotonic()
        await chan.send_control({"type": "complete"})
        await chan.recv_control("resumed")
        t5 = time.monotonic()
        summary.downtime_ms = (t5 - t_stop) * 1000
        summary.downtime_parts = {"final-pass": (t1 - t_stop) * 1000, "qemu-switchover": (t2 - t1) * 1000,
                                  "check": (t3 - t2) * 1000, "resume": (t5 - t4) * 1000}
        summary.qemu_downtime_ms = info.get("downtime")
        summary.qemu_bytes = int((info.get("ram") or {}).get("transferred", 0))
        await chan.send_control({"type": "replug", "target": target})
        done = await chan.recv_control("done")
        summary.replug_seconds = float(done.get("replug-seconds", 0))
        summary.total_seconds = time.monotonic() - t_start
        say(summary.text())
        return summary
    except BaseException as e:
        if continued:
            raise MigrationError(f"failed after migrate-continue (the guest runs on the destination "
                                 f"or stays stopped on the source: check both): {e}") from e
        if client is not None:
            await client.close()
            client = None
        if unplug_tried and not unplugged and spec is not None:
            try:  # device_del went out but DEVICE_DELETED did not come (in time)
                kids = await qmp.execute("qom-list", {"path": "/machine/peripheral"})
                unplugged = spec.id not in {k.get("name") for k in kids}
            except Exception:
                pass
        await _roll_back(qmp, spec, chan, migrating, unplugged, target, opt, say, e)
        if isinstance(e, (MigrationError, asyncio.CancelledError, KeyboardInterrupt)):
            raise
        raise MigrationError(f"migration failed, source guest kept running: {e}") from e
    finally:
        if client is not None:
            await client.close()
        if tracker is not None:
            tracker.stop()
        if fd >= 0:
            os.close(fd)
        if chan is not None:
            await chan.close()
        await qmp.close()


async def _roll_back(qmp: QMP, spec: DeviceSpec | None, chan: S.Channel | None, migrating: bool,
                     unplugged: bool, target: int | None, opt: SourceOptions,
                     say: Callable[[str], None], why: BaseException) -> None:
    say(f"migration failed ({why}); rolling back: the source guest keeps running")
    if chan is not None:
        try:
            await asyncio.wait_for(chan.send_control({"type": "error", "message": str(why)[:1000]}), 5)
        except Exception:
            pass
    try:
        if migrating:
            try:
                await qmp.execute("migrate_cancel")
                await qmp.wait_migration({"cancelled", "failed", "completed"}, timeout=30)
            except QEMUError:
                pass  # wait_migration raises on cancelled/failed: that is what we want
        status = (await qmp.execute("query-status"))["status"]
        if status in ("paused", "postmigrate", "finish-migrate"):
            await qmp.execute("cont")
        if unplugged and spec is not None and (opt.vhost_socket or spec.socket_path):
            try:
                await qmp.execute("chardev-remove", {"id": spec.chardev})
            except QMPError:
                pass
            await plug(qmp, spec, opt.vhost_socket or spec.socket_path)
            if opt.control and target is not None:
                await _restore_target(opt.control, target, timeout=30)
            say("balloon re-plugged on the source")
    except Exception as e:  # report, keep the original error
        say(f"roll-back incomplete: {e}")


async def _restore_target(control: str, target: int | None, *, timeout: float) -> None:
    """Wait for the guest driver to bind to the (re-plugged) device, then set the balloon target."""
    from vballoon.control.client import AsyncClient, QMPCommandError
    deadline = time.monotonic() + timeout
    async with AsyncClient(control) as c:
        while True:
            try:
                actual = (await c.query_balloon()).actual
                break
            except QMPCommandError as e:
                if e.error_class != "DeviceNotActive" or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        if target is not None and target != actual:
            await c.balloon(target)


# ----------------------------------------------------------------------------- destination


@dataclasses.dataclass
class DestOptions:
    qmp: str                              # destination QEMU's QMP socket (-incoming defer -S)
    listen: str                           # host:port or a Unix socket path, for the source
    qemu_uri: str                         # where the destination QEMU listens (migrate-incoming)
    vhost_socket: str | None = None       # the destination daemon's vhost-user socket (re-plug)
    control: str | None = None            # the destination daemon's control socket (target)
    advertise_uri: str | None = None      # the URI the source QEMU should use (default qemu_uri)
    timeout: float = 600.0                # for the whole migration
    progress: Callable[[str], None] | None = None
    ready: Callable[[], None] | None = None  # called once listening


async def migrate_destination(opt: DestOptions) -> dict[str, Any]:
    say = opt.progress or (lambda s: log.info("%s", s))
    qmp = await QMP.connect(opt.qmp)
    got: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = \
        asyncio.get_running_loop().create_future()

    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if got.done():
            w.close()
            return
        got.set_result((r, w))

    try:
        if opt.listen.startswith("/") or opt.listen.startswith("unix:"):
            server = await asyncio.start_unix_server(on_conn, opt.listen.removeprefix("unix:"), limit=1 << 24)
        else:
            host, _, port = opt.listen.rpartition(":")
            server = await asyncio.start_server(on_conn, host.strip("[]") or "127.0.0.1", int(port), limit=1 << 24)
    except (OSError, ValueError) as e:
        await qmp.close()
        raise MigrationError(f"cannot listen on {opt.listen}: {e}") from None
    if opt.ready:
        opt.ready()
    state = {"resumed": False}
    chan = None
    try:
        status = (await qmp.execute("query-status"))["status"]
        if status != "inmigrate":
            raise MigrationError(f"the destination QEMU is {status!r}; start it with -incoming defer -S")
        ram_path, ram_bytes = await qmp.ram_file()
        async with asyncio.timeout(opt.timeout):
            reader, writer = await got
            server.close()
            chan = S.Channel(reader, writer, page_size=PAGE_SIZE)
            return await _serve(qmp, chan, ram_path, ram_bytes, opt, say, state)
    except BaseException as e:
        if not state["resumed"]:
            say(f"migration failed ({e}); tearing the destination down")
            try:
                await qmp.execute("quit", timeout=5)
            except Exception:
                pass
        if isinstance(e, (MigrationError, S.StreamError, asyncio.CancelledError)):
            raise
        raise MigrationError(f"destination failed: {e}") from e
    finally:
        server.close()
        if chan is not None:
            await chan.close()
        await qmp.close()


async def _serve(qmp: QMP, chan: S.Channel, ram_path: str, ram_bytes: int, opt: DestOptions,
                 say: Callable[[str], None], state: dict[str, bool]) -> dict[str, Any]:
    msg = await chan.recv_control("hello")
    try:
        S.check_hello(msg, page_size=PAGE_SIZE, ram_bytes=ram_bytes)
    except S.StreamError as e:
        await chan.send_control({"type": "error", "message": str(e)})
        raise
    device = msg.get("device")
    if not isinstance(device, dict):
        raise S.StreamError("hello: 'device' is missing or not an object")
    spec = _device_from_json(device)
    fd = os.open(ram_path, os.O_RDWR | os.O_CLOEXEC)
    try:
        # a fresh, all-zero RAM file: pages the source skips as zero read as zero here
        if _libc.fallocate(fd, 3, 0, ram_bytes) != 0:  # PUNCH_HOLE | KEEP_SIZE
            raise MigrationError(f"cannot punch {ram_path}: {os.strerror(ctypes.get_errno())}")
        chan.decoder.npages = ram_bytes // PAGE_SIZE
        await chan.send_control(S.hello(page_size=PAGE_SIZE, ram_bytes=ram_bytes))
        pages = zero = 0
        while True:
            frame = await chan.recv()
            if state["resumed"] and not isinstance(frame, S.Control):
                raise S.StreamError("page data after the guest resumed on the destination")
            if isinstance(frame, S.Pages):
                os.pwrite(fd, frame.data, frame.first * PAGE_SIZE)
                pages += frame.count
                continue
            if isinstance(frame, S.Zero):
                if _libc.fallocate(fd, 3, frame.first * PAGE_SIZE, frame.count * PAGE_SIZE) != 0:
                    os.pwrite(fd, bytes(frame.count * PAGE_SIZE), frame.first * PAGE_SIZE)
                zero += frame.count
                continue
            t = frame.type
            if t == "error":
                raise MigrationError(f"the source failed: {frame.msg.get('message', '?')}")
            if t == "incoming":
                await qmp.execute("migrate-set-capabilities", {"capabilities": [
                    {"capability": "x-ignore-shared", "state": True}]})
                await qmp.execute("migrate-incoming", {"uri": opt.qemu_uri})
                await chan.send_control({"type": "incoming-ready", "uri": opt.advertise_uri or opt.qemu_uri})
            elif t == "final":
                await chan.send_control({"type": "synced", "pages": pages})
            elif t == "complete":
                await qmp.wait_migration({"completed"}, timeout=60, poll=0.002)
                status = (await qmp.execute("query-status"))["status"]
                if status != "running":
                    await qmp.execute("cont")
                state["resumed"] = True
                say(f"guest resumed on the destination ({pages} pages, {zero} zeroed)")
                await chan.send_control({"type": "resumed", "pages": pages})
            elif t == "replug":
                t0 = time.monotonic()
                if opt.vhost_socket:
                    await plug(qmp, spec, opt.vhost_socket)
                    target = frame.msg.get("target")
                    if opt.control:
                        await _restore_target(opt.control, target if isinstance(target, int) else None,
                                              timeout=30)
                    say(f"balloon re-plugged in {time.monotonic() - t0:.2f} s")
                await chan.send_control({"type": "done", "replug-seconds": time.monotonic() - t0})
                return {"pages": pages, "zero-pages": zero, 
                        "bytes": chan.bytes_received}
            else:
                raise S.StreamError(f"unexpected control message {t!r}")
    finally:
        os.close(fd)


def _device_from_json(d: dict[str, Any]) -> DeviceSpec:
    try:
        props = d["props"]
        spec = DeviceSpec(str(d["id"]), str(d["driver"]), str(d["bus"]), str(d["chardev"]), "",
                          {k: props[k] for k in ("virtio-id", "num_vqs", "vq_size", "config_size")})
    except (KeyError, TypeError):
        raise S.StreamError("hello: 'device' lacks id/driver/bus/chardev/props") from None
    if not spec.driver.startswith("vhost-user-test-device") or any(
            not isinstance(v, int) or isinstance(v, bool) for v in spec.props.values()):
        raise S.StreamError(f"hello: device {spec.driver!r} is not a vhost-user balloon")
    return spec
