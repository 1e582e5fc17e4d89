"""Every benchmark still runs: each in a subprocess with ``--smoke`` (tiny size, one repeat).

Speed targets live in the benchmarks themselves, never here: these only catch breakage (an API
a benchmark used that moved, a hook that went away)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCH.glob("bench_*.py"))


def test_every_benchmark_is_listed():
    assert {"bench_inflate.py", "bench_bitmap_round.py", "bench_fpmap.py",
            "bench_idle.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_smoke(script):
    res = subprocess.run([sys.executable, str(BENCH / script), "--smoke"], capture_output=True,
                         text=True, timeout=120, cwd=BENCH.parent)
    assert res.returncode == 0, f"{script} --smoke failed:\n{res.stdout}\n{res.stderr}"
    assert "x" in res.stdout and res.stdout.strip(), res.stdout
