"""`vballoon migrate` with real QEMUs and a real guest (MIGRATION.md).

Each test boots a source guest (RAM: memory-backend-file,share=on on /dev/shm, the balloon on a
pcie-root-port, served by a `vballoon serve` process) and a destination QEMU (-incoming defer -S,
same RAM size, no balloon; its own fresh `vballoon serve`).  The guest runs `vbgen`
(guest/vbgen.c): it keeps rewriting a 64 MiB buffer with per-page generation patterns during the
migration and checks every page afterwards, on whichever side it ends up.

  test_migrate_with_hint_map      the engine in-process; both RAM files compared outside the map
                                  while both sides are stopped; the guest's check on the
                                  destination; the balloon re-plugged and answering there
  test_migrate_with_bitmap_map    the guest boots with guest/linux's virtio_balloon_bitmap.ko
                                  (lab.driver=bitmap): the map comes from a bitmap round, which the
                                  guest's driver says it answered; RAM equal outside the map; the
                                  guest's check on the destination
  test_migrate_cli_without_map    the `vballoon migrate` commands, no map
  test_unfinished_round_is_not_used  a round that did not end: no map, RAM equal everywhere
  test_failure_at_pre_switchover  the source keeps running with its balloon back, the destination
                                  QEMU is gone, the guest's check passes on the source
  test_ram_layout_mismatch        a destination with other RAM: refused before anything changed

VBALLOON_MIGRATE_BENCH=1 adds test_figures_1g (MIGRATION.md's table; slow).
"""
from __future__ import annotations

import asyncio
import base64
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from harness import Guest, GuestError, set_pdeathsig

from vballoon.migrate.engine import (DestOptions, MigrationError, SourceOptions,
                                     migrate_destination, migrate_source)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MiB = 1 << 20
PAGE = 4096
WORK_MIB = 64
BITMAP_DRIVER = "virtio_balloon_bitmap"   # guest/linux, loaded by guest-init.sh with ...
BITMAP_BOOT = "lab.driver=bitmap"         # ... this on the kernel command line
BALLOON_DRIVERS = ("virtio_balloon", BITMAP_DRIVER)
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="write tracking needs CAP_SYS_PTRACE (run as root)")


@pytest.fixture(scope="session")
def vbgen(tmp_path_factory) -> bytes:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler for the guest workload (tests/qemu/guest/vbgen.c)")
    out = tmp_path_factory.mktemp("vbgen") / "vbgen"
    subprocess.run([cc, "-O2", "-s", "-static", "-nostdlib", "-fno-stack-protector", "-fno-builtin",
                    "-o", str(out), str(HERE / "guest" / "vbgen.c")], check=True)
    return out.read_bytes()


class Daemon:
    """`vballoon serve` in its own process (so the tracker injects into it, as into QEMU)."""

    def __init__(self, directory: Path, name: str) -> None:
        self.sock = str(directory / f"{name}-vb.sock")
        self.ctl = str(directory / f"{name}-ctl.sock")
        self.proc: asyncio.subprocess.Process | None = None
        self.log = directory / f"{name}-daemon.log"

    async def start(self) -> None:
        self._log = open(self.log, "wb")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "vballoon", "--log-level", "info", "serve", "--socket-path",
            self.sock, "--control-socket", self.ctl, "--stats-interval", "0",
            stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=set_pdeathsig)
        deadline = time.monotonic() + 30
        while not (os.path.exists(self.sock) and os.path.exists(self.ctl)):
            if self.proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vballoon serve did not start: {self.log.read_text()}")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.proc and self.proc.returncode is None:
            self.proc.terminate()
            await asyncio.wait_for(self.proc.wait(), 10)
        self._log.close()


def short_dir() -> Path:
    d = Path(f"/tmp/vbm-{secrets.token_hex(3)}")
    d.mkdir()
    return d


class Pair:
    """A source guest with vballoon, running vbgen, and an incoming destination QEMU."""

    def __init__(self, lab, tmp_path: Path, *, mem_mib: int = 512, dst_mem_mib: int | None = None,
                 append: str = "") -> None:
        self.lab, self.tmp, self.mem_mib, self.append = lab, tmp_path, mem_mib, append
        self.dst_mem_mib = dst_mem_mib or mem_mib
        self.dir = short_dir()
        tag = secrets.token_hex(3)
        self.src_ram, self.dst_ram = f"/dev/shm/vbm-{tag}-src", f"/dev/shm/vbm-{tag}-dst"
        self.src_daemon, self.dst_daemon = Daemon(self.dir, "src"), Daemon(self.dir, "dst")
        self.src_qmp, self.dst_qmp = str(self.dir / "src.qmp"), str(self.dir / "dst.qmp")
        self.stream = str(self.dir / "stream.sock")
        self.qemu_uri = f"unix:{self.dir / 'qemu-mig.sock'}"
        self.src: Guest | None = None
        self.dst: Guest | None = None

    def common(self, qmp: str) -> list[str]:
        return ["-qmp", f"unix:{qmp},server=on,wait=off",
                "-device", "pcie-root-port,id=rp0,bus=pcie.0,chassis=1"]

    async def start(self, vbgen: bytes, *, dirty_mib: int = 200, hot_rate: int = 0) -> None:
        await self.src_daemon.start()
        await self.dst_daemon.start()
        self.src = Guest(self.lab, [*self.common(self.src_qmp),
                                    "-chardev", f"socket,id=vbc,path={self.src_daemon.sock}",
                                    "-device", "vhost-user-test-device-pci,id=vb0,chardev=vbc,bus=rp0,"
                                    "virtio-id=5,num_vqs=6,config_size=16"],
                         mem_mib=self.mem_mib, mem_path=self.src_ram, qmp=True,
                         append=self.append, workdir=self.tmp / "src")
        (self.tmp / "src").mkdir(exist_ok=True)
        await self.src.start()
        self.dst = Guest(self.lab, [*self.common(self.dst_qmp), "-incoming", "defer", "-S"],
                         mem_mib=self.dst_mem_mib, mem_path=self.dst_ram, qmp=True,
                         append=self.append, workdir=self.tmp / "dst")
        (self.tmp / "dst").mkdir(exist_ok=True)
        await self.dst.start(wait_ready=False)
        if BITMAP_BOOT in self.append.split():
            await require_bitmap_driver(self.src)
        await start_workload(self.src, vbgen, fill_mib=dirty_mib, hot_rate=hot_rate)

    async def guest_check(self, g: Guest) -> str:
        return await guest_check(g)

    async def close(self) -> None:
        for g in (self.src, self.dst):
            if g is not None:
                await g.close()
        for d in (self.src_daemon, self.dst_daemon):
            if d.proc is not None:
                await d.stop()
        for f in (self.src_ram, self.dst_ram):
            if os.path.exists(f):
                os.unlink(f)
        shutil.rmtree(self.dir, ignore_errors=True)


async def start_workload(g: Guest, vbgen: bytes, *, fill_mib: int, hot_rate: int = 0) -> None:
    """Copy vbgen in; a workload fills `fill_mib` and exits; then vbgen keeps rewriting
    WORK_MIB (at most `hot_rate` MiB/s; 0: as fast as the vCPU goes) until told to check."""
    b64 = base64.b64encode(vbgen).decode()
    await g.check("rm -f /tmp/vbgen.b64 /tmp/vbstop")
    for i in range(0, len(b64), 3000):
        await g.check(f"echo -n {b64[i:i + 3000]} >> /tmp/vbgen.b64")
    await g.check("base64 -d /tmp/vbgen.b64 > /bin/vbgen && chmod 755 /bin/vbgen && rm /tmp/vbgen.b64")
    # a workload filled memory with non-zero data and exited (the free pages a map is for)
    if fill_mib:
        await g.check(f"vbgen {fill_mib} /tmp/none once", timeout=600)
    await g.check(f"vbgen {WORK_MIB} /tmp/vbstop {hot_rate or ''} > /tmp/vbgen.out 2>&1 &")
    await asyncio.sleep(1.0)


async def guest_check(g: Guest) -> str:
    """Stop vbgen; its verdict on every page of its buffer."""
    await g.check("touch /tmp/vbstop")
    deadline = time.monotonic() + 120
    while True:
        out = await g.check("cat /tmp/vbgen.out")
        if "errors" in out:
            return out.strip()
        if time.monotonic() > deadline:
            raise GuestError(f"vbgen printed no result: {out!r}")
        await asyncio.sleep(0.5)


def compare_outside_map(src: str, dst: str, free: np.ndarray) -> tuple[int, int]:
    """(pages that differ outside the map, pages compared)."""
    differ = compared = 0
    with open(src, "rb") as a, open(dst, "rb") as b:
        page = 0
        while True:
            x, y = a.read(16 * MiB), b.read(16 * MiB)
            if not x:
                break
            n = len(x) // PAGE
            xa = np.frombuffer(x, np.uint64).reshape(n, -1)
            ya = np.frombuffer(y, np.uint64).reshape(n, -1)
            diff = (xa != ya).any(axis=1) & ~free[page:page + n]
            differ += int(diff.sum())
            compared += int((~free[page:page + n]).sum())
            page += n
    return differ, compared


async def balloon_bound(g: Guest, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        devs = await g.virtio_devices()
        if any(d.device == 5 and d.driver in BALLOON_DRIVERS for d in devs):
            return True
        await asyncio.sleep(0.2)
    return False


async def require_bitmap_driver(g: Guest) -> None:
    """The guest loaded guest/linux's driver, it bound the balloon and acked the bitmap queue
    (feature bit 16).  A lab without the module fails here: setup.sh builds it."""
    assert g.insmod_rc == 0, (f"insmod {BITMAP_DRIVER}.ko failed in the guest (rc {g.insmod_rc}); "
                              "re-run tests/qemu/setup.sh as root")
    devs = [d for d in await g.virtio_devices() if d.device == 5]
    assert len(devs) == 1 and devs[0].driver == BITMAP_DRIVER and 16 in devs[0].features, devs


async def driver_round(g: Guest) -> dict[str, int]:
    """The guest driver's own account of its last bitmap round (its module parameters)."""
    out = await g.check(f"cd /sys/module/{BITMAP_DRIVER}/parameters && grep . last_round_* rounds_*")
    return {k: int(v) for k, v in (line.split(":", 1) for line in out.split())}


async def run_engine(p: Pair, **source_kw) -> tuple:
    ready = asyncio.Event()
    dest = asyncio.create_task(migrate_destination(DestOptions(
        qmp=p.dst_qmp, listen=p.stream, qemu_uri=p.qemu_uri, vhost_socket=p.dst_daemon.sock,
        control=p.dst_daemon.ctl, ready=ready.set, progress=lambda s: print("dst:", s))))
    await asyncio.wait_for(ready.wait(), 10)
    try:
        summary = await migrate_source(SourceOptions(
            qmp=p.src_qmp, dest=p.stream, control=p.src_daemon.ctl,
            progress=lambda s: print("src:", s), **source_kw))
    except BaseException:
        await asyncio.gather(dest, return_exceptions=True)
        raise
    return summary, await dest


async def test_migrate_with_hint_map(lab, vbgen, tmp_path, qemu_report):
    p = Pair(lab, tmp_path)
    try:
        await p.start(vbgen)
        compared = {}

        def on_synced(free: np.ndarray) -> None:
            compared["result"] = compare_outside_map(p.src_ram, p.dst_ram, free)
            compared["free"] = int(free.sum())

        t0 = time.monotonic()
        summary, dest = await run_engine(p, map="hint", on_synced=on_synced)
        took = time.monotonic() - t0
        print(summary.text())
        differ, n = compared["result"]
        assert differ == 0, f"{differ} of {n} pages outside the map differ"
        assert summary.map_kind == "hint" and compared["free"] > 10 * MiB // PAGE
        out = await p.guest_check(p.dst)
        assert re.search(r"errors 0$", out), out
        assert await balloon_bound(p.dst)
        from vballoon.control.client import AsyncClient
        async with AsyncClient(p.dst_daemon.ctl) as c:
            assert (await c.query_balloon()).actual == p.mem_mib * MiB
        assert p.src.qmp is not None
        assert (await p.src.qmp.execute("query-status"))["status"] == "postmigrate"
        qemu_report.line(f"migrate 512 MiB, hint map: {summary.stream_bytes / MiB:.1f} MiB stream, "
                         f"{compared['free']} free pages skipped, downtime {summary.downtime_ms:.0f} ms, "
                         f"{took:.1f} s; RAM equal outside the map ({n} pages); guest: {out}")
    finally:
        await p.close()


async def test_migrate_with_bitmap_map(lab, vbgen, tmp_path, qemu_report):
    """(d): the guest runs guest/linux's driver, so the map comes from a bitmap round, which
    allocates nothing in the guest (no init_on_alloc rewrite of the reported pages)."""
    if os.environ.get("VBALLOON_GUEST_INITRD"):
        pytest.skip("VBALLOON_GUEST_INITRD: a user-provided initrd has no guest driver")
    p = Pair(lab, tmp_path, append=BITMAP_BOOT)
    try:
        await p.start(vbgen)
        compared = {}

        def on_synced(free: np.ndarray) -> None:
            compared["result"] = compare_outside_map(p.src_ram, p.dst_ram, free)
            compared["free"] = int(free.sum())

        t0 = time.monotonic()
        summary, _ = await run_engine(p, map="bitmap", on_synced=on_synced)
        took = time.monotonic() - t0
        print(summary.text())
        differ, n = compared["result"]
        assert differ == 0, f"{differ} of {n} pages outside the map differ"
        assert summary.map_kind == "bitmap", summary.map_kind
        # the guest's driver answered that very round, with that many free pages
        mine = await driver_round(p.dst)
        assert mine["last_round_id"] == summary.map_round["id"], (mine, summary.map_round)
        assert mine["last_round_free_pages"] == summary.map_round["free-pages"], (mine, summary.map_round)
        assert mine["rounds_abandoned"] == 0, mine
        # 200 MiB filled and freed, in a 512 MiB guest: most of the RAM is free
        assert compared["free"] > 200 * MiB // PAGE, compared["free"]
        out = await p.guest_check(p.dst)
        assert re.search(r"errors 0$", out), out
        assert await balloon_bound(p.dst)
        assert (await p.src.qmp.execute("query-status"))["status"] == "postmigrate"
        p0 = summary.passes[0]
        qemu_report.line(f"migrate 512 MiB, bitmap map: {summary.stream_bytes / MiB:.1f} MiB stream, "
                         f"{compared['free']} free pages skipped ({p0.zero_skipped} zero in pass 0), "
                         f"downtime {summary.downtime_ms:.0f} ms, {took:.1f} s; RAM equal outside the "
                         f"map ({n} pages); guest: {out}")
    finally:
        await p.close()


async def test_migrate_cli_without_map(lab, vbgen, tmp_path, qemu_report):
    p = Pair(lab, tmp_path)
    try:
        await p.start(vbgen)
        base = [sys.executable, "-m", "vballoon", "migrate"]
        dst = await asyncio.create_subprocess_exec(
            *base, "--incoming", p.stream, "--qmp", p.dst_qmp, "--qemu-uri", p.qemu_uri,
            "--vhost-socket", p.dst_daemon.sock, "--control", p.dst_daemon.ctl,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=set_pdeathsig)
        deadline = time.monotonic() + 30
        while not os.path.exists(p.stream):
            assert time.monotonic() < deadline and dst.returncode is None
            await asyncio.sleep(0.05)
        t0 = time.monotonic()
        src = await asyncio.create_subprocess_exec(
            *base, "--to", p.stream, "--qmp", p.src_qmp, "--control", p.src_daemon.ctl,
            "--map", "none", stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=set_pdeathsig)
        sout, serr = await asyncio.wait_for(src.communicate(), 300)
        dout, derr = await asyncio.wait_for(dst.communicate(), 60)
        took = time.monotonic() - t0
        assert src.returncode == 0, serr.decode()
        assert dst.returncode == 0, derr.decode()
        text = sout.decode()
        assert "map: none" in text and "pass 0" in text and "downtime" in text, text
        out = await p.guest_check(p.dst)
        assert re.search(r"errors 0$", out), out
        assert await balloon_bound(p.dst)
        total = re.search(r"total: ([\d.]+) MiB", text)[1]
        qemu_report.line(f"migrate 512 MiB, CLI, no map: {total} MiB stream, {took:.1f} s; guest: {out}")
    finally:
        await p.close()


async def test_unfinished_round_is_not_used(lab, vbgen, tmp_path):
    """A round that does not end in time gives no map: every page is considered, and the
    destination equals the source everywhere."""
    p = Pair(lab, tmp_path)
    try:
        await p.start(vbgen, dirty_mib=100)
        compared = {}

        def on_synced(free: np.ndarray) -> None:
            compared["free"] = int(free.sum())
            compared["result"] = compare_outside_map(p.src_ram, p.dst_ram, free)

        summary, _ = await run_engine(p, map="hint", round_timeout=0.001, on_synced=on_synced)
        assert summary.map_kind is None and compared["free"] == 0
        assert summary.passes[0].map_skipped == 0
        differ, n = compared["result"]
        assert differ == 0 and n == p.mem_mib * MiB // PAGE, f"{differ} pages differ"
        out = await p.guest_check(p.dst)
        assert re.search(r"errors 0$", out), out
    finally:
        await p.close()


async def test_failure_at_pre_switchover_keeps_the_source(lab, vbgen, tmp_path):
    p = Pair(lab, tmp_path)
    try:
        await p.start(vbgen, dirty_mib=0)
        with pytest.raises(MigrationError, match="injected failure"):
            await run_engine(p, map="hint", fail_at="pre-switchover")
        assert p.src.qmp is not None
        assert (await p.src.qmp.execute("query-status"))["status"] == "running"
        assert await balloon_bound(p.src), "balloon not re-plugged on the source"
        from vballoon.control.client import AsyncClient
        async with AsyncClient(p.src_daemon.ctl) as c:
            assert (await c.query_balloon()).actual == p.mem_mib * MiB
        # the destination QEMU was told to quit
        assert p.dst is not None and p.dst._proc is not None
        await asyncio.wait_for(p.dst._proc.wait(), 10)
        out = await p.guest_check(p.src)
        assert re.search(r"errors 0$", out), out
    finally:
        await p.close()


async def test_ram_layout_mismatch_is_refused(lab, vbgen, tmp_path):
    p = Pair(lab, tmp_path, mem_mib=512, dst_mem_mib=256)
    try:
        await p.start(vbgen, dirty_mib=0)
        with pytest.raises(Exception, match="RAM layout differs: ram-bytes"):
            await run_engine(p, map="none")
        assert (await p.src.qmp.execute("query-status"))["status"] == "running"
        assert await balloon_bound(p.src, timeout=1)  # never unplugged
        out = await p.guest_check(p.src)
        assert re.search(r"errors 0$", out), out
    finally:
        await p.close()


# ----------------------------------------------------------------------------- figures

BENCH = os.environ.get("VBALLOON_MIGRATE_BENCH") == "1"
FIG_MIB = int(os.environ.get("VBALLOON_MIGRATE_BENCH_MIB", "1024"))
FIG_FILL_MIB = FIG_MIB * 7 // 10   # a workload filled 70% of RAM and exited
FIG_HOT_RATE = int(os.environ.get("VBALLOON_MIGRATE_BENCH_HOT_RATE", "32"))
                                   # then vbgen rewrites 64 MiB at <= this many MiB/s (0: flat out)
FIG_BANDWIDTH = 128 * MiB          # QEMU's default max-bandwidth, for both
FIG_QEMU_GIVE_UP = 120             # s: QEMU's own migration may not converge
_figures: list[dict] = []


def _record(qemu_report, row: dict) -> None:
    row["hot-rate"] = FIG_HOT_RATE
    _figures.append(row)
    qemu_report.line(
        f"figures {FIG_MIB} MiB guest, hot {FIG_HOT_RATE or 'max'} MiB/s, {row['config']:<19} sent {row['mib']:7.1f} MiB, "
        f"{row['seconds']:5.1f} s, downtime {row['downtime_ms']:4.0f} ms; guest: {row['guest']}")
    out = os.environ.get("VBALLOON_MIGRATE_BENCH_OUT")
    if out:
        import json
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


@pytest.mark.skipif(not BENCH, reason="figures: set VBALLOON_MIGRATE_BENCH=1 (slow; MIGRATION.md)")
async def test_figures_qemu_builtin_free_page_hint(lab, vbgen, tmp_path, qemu_report):
    """(a) QEMU's own migration, built-in virtio-balloon-pci with free-page-hint=on."""
    d = short_dir()
    devs = ["-object", "iothread,id=io0",
            "-device", "virtio-balloon-pci,id=bal0,iothread=io0,free-page-hint=on"]
    src = Guest(lab, devs, mem_mib=FIG_MIB, qmp=True, workdir=tmp_path / "src")
    dst = Guest(lab, [*devs, "-incoming", "defer"], mem_mib=FIG_MIB, qmp=True, workdir=tmp_path / "dst")
    (tmp_path / "src").mkdir()
    (tmp_path / "dst").mkdir()
    try:
        await src.start()
        await dst.start(wait_ready=False)
        await start_workload(src, vbgen, fill_mib=FIG_FILL_MIB, hot_rate=FIG_HOT_RATE)
        uri = f"unix:{d / 'q.sock'}"
        await dst.qmp.execute("migrate-incoming", {"uri": uri})
        await src.qmp.execute("migrate-set-parameters", {"max-bandwidth": FIG_BANDWIDTH})
        t0 = time.monotonic()
        await src.qmp.execute("migrate", {"uri": uri})
        while True:
            info = await src.qmp.execute("query-migrate")
            if info["status"] in ("completed", "failed", "cancelled"):
                break
            if time.monotonic() - t0 > FIG_QEMU_GIVE_UP:
                qemu_report.line(f"figures: QEMU's own migration did not converge in "
                                 f"{FIG_QEMU_GIVE_UP} s: {info['ram']['transferred'] / MiB:.0f} MiB sent, "
                                 f"{info['ram'].get('dirty-sync-count')} dirty syncs")
                _record(qemu_report, {"config": "qemu free-page-hint", "mib": info["ram"]["transferred"] / MiB,
                                      "seconds": time.monotonic() - t0, "downtime_ms": -1,
                                      "guest": "did not converge"})
                await src.qmp.execute("migrate_cancel")
                return
            await asyncio.sleep(0.05)
        assert info["status"] == "completed", info
        out = await guest_check(dst)
        assert re.search(r"errors 0$", out), out
        _record(qemu_report, {"config": "qemu free-page-hint", "mib": info["ram"]["transferred"] / MiB,
                              "seconds": info["total-time"] / 1000, "downtime_ms": info["downtime"],
                              "guest": out, "dirty-syncs": info["ram"].get("dirty-sync-count")})
    finally:
        await src.close()
        await dst.close()
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.skipif(not BENCH, reason="figures: set VBALLOON_MIGRATE_BENCH=1 (slow; MIGRATION.md)")
@pytest.mark.parametrize("map_kind", ["none", "hint", "bitmap", "hint+300ms"])
async def test_figures_vballoon_migrate(map_kind, lab, vbgen, tmp_path, qemu_report):
    """(b) no map, (c) a hint-round map, (d) a bitmap-round map: that guest boots with
    guest/linux's virtio_balloon_bitmap.ko (lab.driver=bitmap); (c) again with a 300 ms downtime
    limit (QEMU's default)."""
    kind = map_kind.split("+")[0]
    if kind == "bitmap" and os.environ.get("VBALLOON_GUEST_INITRD"):
        pytest.skip("VBALLOON_GUEST_INITRD: a user-provided initrd has no guest driver")
    p = Pair(lab, tmp_path, mem_mib=FIG_MIB, append=BITMAP_BOOT if kind == "bitmap" else "")
    limit = {"downtime_limit": 0.3} if map_kind.endswith("+300ms") else {}
    try:
        await p.start(vbgen, dirty_mib=FIG_FILL_MIB, hot_rate=FIG_HOT_RATE)
        summary, _ = await run_engine(p, map=kind, max_bandwidth=FIG_BANDWIDTH, **limit)
        assert summary.map_kind == (None if kind == "none" else kind), summary.map_kind
        if kind == "bitmap":
            assert (await driver_round(p.dst))["last_round_id"] == summary.map_round["id"]
        out = await guest_check(p.dst)
        assert re.search(r"errors 0$", out), out
        _record(qemu_report, {
            "config": f"vballoon {map_kind}",
            "mib": (summary.stream_bytes + summary.qemu_bytes) / MiB,
            "seconds": summary.total_seconds, "downtime_ms": summary.downtime_ms,
            "qemu_downtime_ms": summary.qemu_downtime_ms, "guest": out,
            "map": summary.map_kind, "map_round": summary.map_round,
            "downtime_parts": summary.downtime_parts,
            "passes": [(s.name, s.data_pages, s.zero_skipped, s.map_skipped) for s in summary.passes]})
    finally:
        await p.close()
