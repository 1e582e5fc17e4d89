"""Idle cost of the daemon (issue 14): ``vballoon serve`` with a loopback guest attached and no
round running -- its resident memory and its context switches over a window, against a bare
Python process that imported the same modules, measured in the same run.

    python benchmarks/bench_idle.py [--window 10] [--memory 4G]
    python benchmarks/bench_idle.py --smoke        # a 1 s window (CI: it still runs)

The daemon arms one timer at the device's next deadline (stats interval, round timeout), so
with ``--stats-interval 0`` and no round it should not wake up at all; with the default 5 s
stats interval it wakes for each stats request (and the guest's answer).  Context switches are
voluntary + involuntary, summed over all the daemon's threads (``/proc/PID/task/*/status``).
The guest's RAM is a sparse memfd that the daemon maps; untouched, it costs no RSS.
"""
from __future__ import annotations

import argparse
import asyncio
import glob
import os
import subprocess
import sys
import tempfile

from vballoon.sim import Frontend, GuestRam
from vballoon.sim.guest import BalloonGuest
from vballoon.units import parse_size

MiB = 1 << 20
RUNTIME = "import asyncio, numpy"                       # what any asyncio + numpy daemon needs
IMPORTS = "import vballoon.app.cli, vballoon.app.daemon, vballoon.app.service"   # + vballoon's
SLEEP = "; import time; print('ready', flush=True); time.sleep(3600)"


def status(pid: int) -> tuple[int, int]:
    """(VmRSS bytes, voluntary + involuntary context switches over every thread)."""
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    switches = 0
    for path in glob.glob(f"/proc/{pid}/task/*/status"):
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        switches += int(line.split()[1])
        except FileNotFoundError:           # a thread that just ended
            pass
    return rss, switches


async def probe(proc: subprocess.Popen, window: float) -> tuple[int, int]:
    rss0, sw0 = status(proc.pid)
    await asyncio.sleep(window)
    rss1, sw1 = status(proc.pid)
    return max(rss0, rss1), sw1 - sw0


async def daemon_idle(memory: int, window: float, stats_interval: str) -> tuple[int, int]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "vb.sock")
        proc = subprocess.Popen([sys.executable, "-m", "vballoon", "--log-level", "warning",
                                 "serve", "--socket-path", path, "--stats-interval",
                                 stats_interval], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().startswith("vballoon: ready")
            ram = GuestRam([(0, min(memory, 2 << 30))]
                           + ([(4 << 30, memory - (2 << 30))] if memory > 2 << 30 else []))
            fe = await Frontend.connect(path)
            guest = None
            try:
                await fe.init(6)
                guest = BalloonGuest(fe, ram, driver_at=16 * MiB, driver_bytes=4 * MiB)
                await guest.probe()
                await asyncio.sleep(0.5)             # let the attach settle
                answer = asyncio.ensure_future(answer_stats(guest))
                try:
                    return await probe(proc, window)
                finally:
                    answer.cancel()
            finally:
                await fe.close()
                if guest is not None:
                    guest.close()
                ram.close()
        finally:
            proc.terminate()
            proc.wait(timeout=30)


async def answer_stats(guest: BalloonGuest) -> None:
    """The guest answers each stats request, as Linux's driver does."""
    while True:
        try:
            await guest.answer_stats_request(timeout=3600)
        except TimeoutError:
            pass


async def baseline_idle(code: str, window: float) -> tuple[int, int]:
    proc = subprocess.Popen([sys.executable, "-c", code + SLEEP], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        await asyncio.sleep(0.5)
        return await probe(proc, window)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--window", type=float, default=10.0, help="seconds observed (default 10)")
    ap.add_argument("--memory", default="4G", help="guest RAM (default 4G, sparse)")
    ap.add_argument("--smoke", action="store_true", help="a 1 s window: checks it runs")
    args = ap.parse_args(argv)
    if args.smoke:
        args.window = 1.0
    memory = parse_size(args.memory)
    run_rss, _ = asyncio.run(baseline_idle(RUNTIME, args.window))
    base_rss, base_sw = asyncio.run(baseline_idle(RUNTIME + "; " + IMPORTS, args.window))
    print(f"idle over {args.window:g} s, guest of {memory >> 30} GiB attached, no round running")
    print(f"floors: a python that imported asyncio + numpy: RSS {run_rss / MiB:.1f} MiB; that + "
          f"vballoon's modules (the baseline): {base_rss / MiB:.1f} MiB, {base_sw} context "
          "switches.\n  The daemon's RSS is its imports: vballoon.wire parses the protocol "
          "headers with cffi at run time\n  (pycparser, ~3 MiB) and the CLI imports every "
          "subcommand (migrate, ctl).")
    for interval, note in (("0", "target: <= 40 MiB RSS, 0 wake-ups"),
                           ("5", "a stats request every 5 s: ~2 wake-ups expected")):
        rss, sw = asyncio.run(daemon_idle(memory, args.window, interval))
        print(f"vballoon serve --stats-interval {interval}: RSS {rss / MiB:.1f} MiB = "
              f"x{rss / base_rss:.2f} baseline; {sw} context switches = "
              f"{sw / args.window:.2f}/s ({note})")


if __name__ == "__main__":
    main()
