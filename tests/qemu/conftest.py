"""Fixtures for tests that boot a real QEMU with a real Linux guest (see harness.py).

When the lab cannot be provided, every test using `lab` is skipped with the
reason, and the reason is repeated at the end of the run. Set
VBALLOON_QEMU_REQUIRED=1 (CI) to make that a failure instead.

Figures worth quoting (boot times, reclaim measurements) go through the
`qemu_report` fixture and are printed in the terminal summary, so they show
without `-s`.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import defaultdict

import pytest
from harness import Guest, Lab, LabUnavailable, ensure_lab

_status: list[str] = []  # one line for the terminal summary, once `lab` was requested
_figures: list[str] = []  # qemu_report lines, in the order reported
_timings: defaultdict[str, list[float]] = defaultdict(list)  # label -> seconds


class QemuReport:
    """Collects figures for the terminal summary (see `qemu_report`)."""

    def line(self, text: str) -> None:
        """One free-form line (e.g. a measurement), printed as given."""
        _figures.append(text)

    def timing(self, label: str, seconds: float) -> None:
        """A duration, summarised per label (n, median, min, max)."""
        _timings[label].append(seconds)

    def boot(self, label: str, seconds: float) -> None:
        """A boot time (QEMU start, or the reboot command, -> guest READY)."""
        self.timing(f"boot to READY: {label}", seconds)


@pytest.fixture(scope="session")
def qemu_report() -> QemuReport:
    """`qemu_report.line(text)`, `.timing(label, seconds)`, `.boot(label, seconds)`:
    figures for the terminal summary."""
    return QemuReport()


@pytest.fixture(scope="session")
def lab() -> Lab:
    started = time.monotonic()
    try:
        lab = ensure_lab()
    except LabUnavailable as e:
        _status.append(f"real-QEMU tests skipped: {e}")
        if os.environ.get("VBALLOON_QEMU_REQUIRED") == "1":
            pytest.fail(f"real QEMU lab unavailable (VBALLOON_QEMU_REQUIRED=1): {e}")
        pytest.skip(f"real QEMU lab unavailable: {e}")
    _status.append(
        f"real-QEMU lab: {lab.qemu_version_text}; guest kernel "
        f"{lab.kernel_release or lab.kernel}; {lab.dir}"
    )
    _timings["lab set-up (ensure_lab, incl. setup.sh)"].append(time.monotonic() - started)
    timings = lab.setup_output.partition("setup.sh: timings\n")[2].rstrip()
    if timings and float(timings.split()[-2]) >= 1.0:  # only when setup had work to do
        _status.append("setup.sh timings:\n" + timings)
    return lab


@pytest.fixture
async def make_guest(lab, tmp_path, qemu_report):
    """Factory: `g = await make_guest(args, qmp=True, ...)` boots a Guest (same
    keywords as Guest) whose logs go to tmp_path; all are killed at teardown.
    `label="..."` (optional) also reports the boot time under that label."""
    guests: list[Guest] = []

    async def make(args=(), *, label: str | None = None, **kw) -> Guest:
        kw.setdefault("workdir", tmp_path / f"guest{len(guests)}")
        kw["workdir"].mkdir(parents=True, exist_ok=True)
        g = Guest(lab, args, **kw)
        guests.append(g)
        await g.start()
        if label:
            qemu_report.boot(label, g.boot_seconds)
        return g

    yield make
    for g in guests:
        await g.close()


def pytest_terminal_summary(terminalreporter):
    for line in _status:
        terminalreporter.write_line(line)
    if _timings:
        terminalreporter.write_line("real-QEMU timings:")
        width = max(map(len, _timings))
        for label, times in _timings.items():
            terminalreporter.write_line(
                f"  {label:<{width}}  n={len(times)}  median {statistics.median(times):.2f} s"
                f"  min {min(times):.2f} s  max {max(times):.2f} s"
            )
    if _figures:
        terminalreporter.write_line("real-QEMU figures:")
        for line in _figures:
            terminalreporter.write_line(f"  {line}")
