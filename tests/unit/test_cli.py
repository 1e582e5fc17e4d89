"""The command line as a user types it: each friction point of issue 13 has a test here, run
through a real subprocess (exit status, stdout, stderr)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def vb(*args: str, env: dict[str, str] | None = None, timeout: float = 60,
       prog: str = "vballoon") -> subprocess.CompletedProcess[str]:
    cmd = [str(BIN / prog), *args] if (BIN / prog).exists() else \
        [sys.executable, "-m", "vballoon", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_version():
    from vballoon import __version__
    p = vb("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"vballoon {__version__}"


def test_help_is_plain_text_with_defaults():
    top = vb("--help")
    assert top.returncode == 0 and "``" not in top.stdout and ":class:" not in top.stdout
    serve = vb("serve", "--help")
    assert "(default: 5.0)" in serve.stdout          # defaults shown
    assert "--fd FDNUM" in serve.stdout and "--print-capabilities" in serve.stdout


@pytest.mark.parametrize("where", ["before", "after"])
def test_log_level_before_or_after_the_subcommand(where):
    args = ["--log-level", "debug", "serve", "--print-capabilities"] if where == "before" \
        else ["serve", "--print-capabilities", "--log-level", "debug"]
    assert vb(*args).returncode == 0


def test_log_level_from_the_environment(tmp_path):
    p = vb("serve", "--print-capabilities", env={"VBALLOON_LOG_LEVEL": "loud"})
    assert p.returncode == 2 and "VBALLOON_LOG_LEVEL='loud'" in p.stderr


@pytest.mark.parametrize("prog", ["vballoon", "vhost-user-balloon"])
def test_print_capabilities(prog):
    args = ("serve", "--print-capabilities") if prog == "vballoon" else ("--print-capabilities",)
    p = vb(*args, prog=prog)
    assert p.returncode == 0 and json.loads(p.stdout) == {"type": "balloon"}


def test_descriptor_file_names_the_conventions_binary():
    d = json.loads((Path(__file__).parents[2] / "examples/vhost-user/50-vballoon.json")
                   .read_text())
    assert d["type"] == "balloon" and d["binary"].endswith("/vhost-user-balloon")


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "soon"])
def test_stats_interval_must_be_finite_and_not_negative(tmp_path, value):
    p = vb("serve", "--socket-path", str(tmp_path / "vb.sock"), "--stats-interval", value)
    assert p.returncode == 2 and "--stats-interval" in p.stderr
    assert not (tmp_path / "vb.sock").exists()


def test_socket_path_and_fd_are_exclusive(tmp_path):
    p = vb("serve", "--socket-path", str(tmp_path / "vb.sock"), "--fd", "3")
    assert p.returncode == 2 and "not allowed with" in p.stderr


def test_no_socket_at_all_is_refused():
    env = {k: v for k, v in os.environ.items() if k not in ("LISTEN_FDS", "LISTEN_PID")}
    p = subprocess.run([str(BIN / "vballoon"), "serve"], capture_output=True, text=True,
                       timeout=60, env=env)
    assert p.returncode == 2 and "--socket-path" in p.stderr


def test_missing_control_socket_dir_fails_before_anything_is_made(tmp_path):
    p = vb("serve", "--socket-path", str(tmp_path / "vb.sock"), "--control-socket",
           str(tmp_path / "nowhere" / "ctl.sock"))
    assert p.returncode == 2 and "socket-dir-missing" in p.stderr
    assert not (tmp_path / "vb.sock").exists()          # no stale vhost-user socket


def test_missing_export_dir_fails_at_start(tmp_path):
    p = vb("serve", "--socket-path", str(tmp_path / "vb.sock"), "--export-dir",
           str(tmp_path / "exports"))
    assert p.returncode == 2 and "export-dir-missing" in p.stderr
    assert not (tmp_path / "vb.sock").exists()


@pytest.mark.parametrize("size,message", [("64M", "128.0 MiB to 1.00 TiB"),
                                          ("100T", "128.0 MiB to 1.00 TiB"),
                                          ("-5G", "negative sizes"), ("lots", "bad-size")])
def test_demo_memory_is_checked_before_it_runs(tmp_path, size, message):
    p = vb("demo", "--memory", size, "--out", str(tmp_path / "out"), timeout=30)
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr
    assert "after_workload" not in p.stderr            # no internal names in the message


def test_demo_out_must_not_be_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    p = vb("demo", "--memory", "256M", "--out", str(f), timeout=30)
    assert p.returncode == 2 and "not a directory" in p.stderr and "Traceback" not in p.stderr


def test_ctl_balloon_negative_size_is_refused_clearly(tmp_path):
    p = vb("ctl", "--control-socket", str(tmp_path / "none.sock"), "balloon", "-5G")
    assert p.returncode == 2 and "negative sizes" in p.stderr


def test_ctl_takes_its_socket_from_the_environment(tmp_path):
    p = vb("ctl", "query-balloon", env={"VBALLOON_CONTROL_SOCKET": str(tmp_path / "none.sock")})
    assert p.returncode != 0 and "required" not in p.stderr
    assert str(tmp_path / "none.sock") in p.stderr and "Traceback" not in p.stderr


def test_native_modules_use_the_limited_api():
    """One abi3 wheel per platform: both cffi modules are built for the stable ABI."""
    from vballoon.fpmap import _fastbits
    from vballoon.virtio import _vring
    assert _fastbits.__file__.endswith(".abi3.so") and _vring.__file__.endswith(".abi3.so")


def test_package_is_typed_and_licensed():
    root = Path(__file__).parents[2]
    assert (root / "vballoon" / "py.typed").exists()
    assert "MIT License" in (root / "LICENSE").read_text()


@pytest.mark.parametrize("width", ["0", "-64", "100", "wide"])
def test_ctl_map_width_is_checked(tmp_path, width):
    p = vb("ctl", "--control-socket", str(tmp_path / "none.sock"), "map", "--png",
           str(tmp_path / "m.png"), "--width", width)
    assert p.returncode == 2 and "--width" in p.stderr
