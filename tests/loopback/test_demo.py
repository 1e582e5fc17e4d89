"""The README's main command, ``vballoon demo``, end to end (a smaller guest, same code)."""
from __future__ import annotations

import subprocess
import sys

from vballoon.fpmap.export import read_export


def test_demo_runs_a_round_and_writes_the_map_and_its_picture(tmp_path):
    p = subprocess.run([sys.executable, "-m", "vballoon", "demo", "--memory", "4G",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "free-page round 1 (bitmap queue): done" in out
    assert "coverage 100.0%" in out
    assert "guest RAM backing fell by 64.0 MiB" in out
    m = read_export(str(tmp_path / "round-1.vbmap"))
    assert m.round_id == 1 and m.complete and m.free_pages > 0.9 * m.ram_pages
    assert (tmp_path / "round-1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_refuses_a_bad_size():
    p = subprocess.run([sys.executable, "-m", "vballoon", "demo", "--memory", "lots"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "bad-size" in p.stderr
