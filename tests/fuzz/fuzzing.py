"""The fuzz budget: a few seconds per target in the suite; more by hand with
``VBALLOON_FUZZ_EXAMPLES=20000 python -m pytest tests/fuzz -p no:cacheprovider``."""
from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

EXAMPLES = int(os.environ.get("VBALLOON_FUZZ_EXAMPLES", "60"))


def budget(scale: float = 1.0):
    return settings(max_examples=max(1, int(EXAMPLES * scale)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
