"""The package type-checks clean (mypy, configured in pyproject.toml) and says so (py.typed)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_mypy_is_clean():
    p = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
