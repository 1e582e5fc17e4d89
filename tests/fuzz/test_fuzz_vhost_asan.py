"""The C chain walk built with AddressSanitizer, fuzzed against the spec model in a subprocess
(``LD_PRELOAD=libasan``, ``PYTHONMALLOC=malloc`` so that every cffi buffer has redzones).

A first run proves the instrumentation works: a walk told the table is bigger than it is must
be reported as a heap-buffer-overflow.  Budget: ``VBALLOON_FUZZ_EXAMPLES`` (default 200)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = int(os.environ.get("VBALLOON_FUZZ_EXAMPLES", "200"))


def _libasan() -> str | None:
    if shutil.which("gcc") is None:
        return None
    path = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True,
                          text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


@pytest.fixture(scope="module")
def asan_build(tmp_path_factory):
    libasan = _libasan()
    if libasan is None:
        pytest.skip("gcc or libasan.so is missing: the sanitizer build cannot be made")
    out = tmp_path_factory.mktemp("asan")
    build = textwrap.dedent(f"""
        from cffi import FFI
        from vballoon.virtio._vring_build import CDEF, SOURCE
        b = FFI()
        b.cdef(CDEF)
        b.set_source("_vring_asan", SOURCE, define_macros=[("_DEFAULT_SOURCE", None)],
                     extra_compile_args=["-O1", "-g", "-std=c99", "-fsanitize=address",
                                         "-fno-omit-frame-pointer"],
                     extra_link_args=["-fsanitize=address"])
        b.compile(tmpdir={str(out)!r})
    """)
    p = subprocess.run([sys.executable, "-c", build], capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        pytest.skip(f"the sanitizer build failed: {p.stderr[-500:]}")
    return str(out), libasan


def _run(asan_build, code: str) -> subprocess.CompletedProcess:
    out, libasan = asan_build
    env = {**os.environ, "LD_PRELOAD": libasan, "PYTHONMALLOC": "malloc",
           "ASAN_OPTIONS": "detect_leaks=0:exitcode=99:allocator_may_return_null=1",
           "PYTHONPATH": os.pathsep.join([out, HERE, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120 + EXAMPLES, env=env)


def test_fuzz_vhost_asan_build_catches_an_over_read(asan_build):
    p = _run(asan_build, textwrap.dedent("""
        from _vring_asan import ffi, lib
        from vhost_vring_model import run_c
        table = bytes(16)                     # one descriptor ...
        run_c(ffi, lib, table, 4, 3, True, [(0x1000, bytes(64))])   # ... walked as four
    """))
    assert p.returncode == 99 and "heap-buffer-overflow" in p.stderr, p.stderr[-1500:]


def test_fuzz_vhost_chain_walk_under_asan(asan_build):
    p = _run(asan_build, textwrap.dedent(f"""
        from hypothesis import HealthCheck, given, settings
        from _vring_asan import ffi, lib
        from test_fuzz_vhost_chain import cases, check
        n = [0]

        @settings(max_examples={EXAMPLES}, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(cases())
        def run(case):
            check(case, ffi, lib)
            n[0] += 1
        run()
        print("cases", n[0])
    """))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "ERROR: AddressSanitizer" not in p.stderr
    assert int(p.stdout.split()[-1]) >= EXAMPLES // 2
