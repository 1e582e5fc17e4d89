"""The examples run as a user would run them: as separate processes, from the repository."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from vballoon.devices.balloon.device import Balloon

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_precopy_migration_example_runs_standalone_and_checks_every_page():
    out = subprocess.run([sys.executable, str(EXAMPLES / "precopy_migration.py"),
                          "--memory", "512M", "--seed", "5"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    assert "round 1: done, coverage 100.0 %" in out
    m = re.search(r"without them ([\d,]+) used pages would be stale, ([\d,]+) of them pages "
                  r"the map had reported free", out)
    assert m and int(m[2].replace(",", "")) == 1000       # the contract, made visible
    assert "are identical, byte for byte" in out
    m = re.search(r"bytes sent: ([\d.]+) MiB with the map, ([\d.]+) MiB without it", out)
    assert m and float(m[1]) < float(m[2])


def test_the_qemu_script_starts_the_daemon_before_qemu_with_the_right_queue_count(tmp_path):
    """With QEMU=echo the script prints the command line it would run; the daemon it started
    must be listening by then, and be gone (with its sockets) afterwards."""
    fake = tmp_path / "qemu"
    fake.write_text('#!/bin/sh\nfor a; do case "$a" in socket,*) p=${a#*path=};; esac; done\n'
                    'test -S "$p" && echo "LISTENING $p"\necho "$@"\n')
    fake.chmod(0o755)
    env = dict(os.environ, QEMU=str(fake), PYTHON=sys.executable, RUNDIR=str(tmp_path),
               ACCEL="tcg")
    r = subprocess.run(["sh", str(EXAMPLES / "qemu-vballoon.sh"), "-m", "512M", "--", "-S"],
                       capture_output=True, text=True, timeout=60, env=env, check=True)
    listening, argv = r.stdout.splitlines()
    assert listening.startswith("LISTENING ")
    n = Balloon().max_queues()
    for arg in ("-object memory-backend-memfd,id=mem,size=512M,share=on",
                "-machine q35,memory-backend=mem",
                f"-device vhost-user-test-device-pci,chardev=vb,virtio-id=5,num_vqs={n},"
                "config_size=16", "-accel tcg", " -S"):
        assert arg in argv
    assert "vballoon: ready on" in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["qemu"]        # the run directory is cleaned up
