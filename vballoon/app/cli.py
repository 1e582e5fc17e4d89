"""The command line: ``vballoon serve`` (the daemon), ``vballoon ctl`` (its control socket),
``vballoon migrate`` (a live migration that skips free pages), ``vballoon demo`` (the whole
path with a simulated guest, no QEMU needed).

``vhost-user-balloon`` is ``vballoon serve`` under the name and conventions of QEMU's
"Backend program conventions" (``docs/interop/vhost-user.rst``), for management tools that
start back-ends from a JSON descriptor (``share/qemu/vhost-user/50-vballoon.json``).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import re
import sys
from typing import Any

from vballoon import __version__
from vballoon.devices.balloon.device import FEATURE_NAMES
from vballoon.errors import ConfigError

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_ENV = "VBALLOON_LOG_LEVEL"
DEMO_MIN, DEMO_MAX = 128 << 20, 1 << 40       # the demo's simulated guest, 128 MiB to 1 TiB
CAPABILITIES = {"type": "balloon"}            # vhost-user.json: VHostUserBackendCapabilities

DESCRIPTION = """\
A virtio-balloon vhost-user back-end that maps the guest's free pages for live migration.

  vballoon serve --socket-path /run/vb.sock --control-socket /run/vb-ctl.sock
  vballoon ctl balloon 3G            (with VBALLOON_CONTROL_SOCKET=/run/vb-ctl.sock)
  vballoon demo                      (daemon + simulated guest, no QEMU needed)
"""


class _Parser(argparse.ArgumentParser):
    """argparse reads ``-5G`` as an unknown option; here a token that starts with a minus and
    a digit is a value, so a negative size gets the size parser's clear refusal."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._negative_number_matcher = re.compile(r"^-\.?\d[\w.]*$")


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written, and each option's default shown."""


def _features(pairs: list[str]) -> list[str]:
    on = dict.fromkeys(FEATURE_NAMES, True)
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in on or value not in ("on", "off"):
            raise ConfigError("bad-feature", f"--feature {pair!r}: expected NAME=on|off with "
                              f"NAME one of {', '.join(FEATURE_NAMES)}")
        on[name] = value == "on"
    return [n for n, v in on.items() if v]


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number of seconds >= 0")
    return value


def _fd(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a file descriptor number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: file descriptors are >= 0")
    return value


def _mode(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode (e.g. 0660)") from None
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r}: a mode is 0 to 0777")
    return value


def _group(text: str) -> int:
    import grp
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        pass
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"{text!r} is not a group name or id on this host")


def _common() -> "_Parser":
    """Options every subcommand accepts, before or after its name."""
    p = _Parser(add_help=False)
    p.add_argument("--log-level", choices=LOG_LEVELS, default=argparse.SUPPRESS,
                   help=f"default: ${LOG_ENV}, else info for serve, warning otherwise")
    return p


def add_serve_options(s: argparse.ArgumentParser) -> None:
    where = s.add_mutually_exclusive_group()
    where.add_argument("--socket-path", metavar="PATH",
                       help="the vhost-user Unix socket QEMU's -chardev connects to (made here)")
    where.add_argument("--fd", type=_fd, metavar="FDNUM",
                       help="serve an already listening Unix socket inherited as this fd "
                       "(from libvirt, a jailer, a test harness); systemd socket activation "
                       "(LISTEN_FDS) is used by itself when present")
    s.add_argument("--socket-group", type=_group, metavar="GROUP",
                   help="group of the socket made with --socket-path (name or id), so that "
                   "QEMU running as another user can connect")
    s.add_argument("--socket-mode", type=_mode, metavar="MODE",
                   help="mode of the socket made with --socket-path, octal (e.g. 0660); "
                   "default: from the umask")
    s.add_argument("--print-capabilities", action="store_true",
                   help="print the back-end's capabilities as JSON (QEMU's vhost-user.json) "
                   "and exit")
    s.add_argument("--feature", action="append", default=[], metavar="NAME=on|off",
                   help="switch a balloon feature; all are on by default: "
                   + ", ".join(FEATURE_NAMES))
    s.add_argument("--stats-interval", type=_seconds, default=5.0, metavar="SECONDS",
                   help="how often to ask the guest for fresh statistics (0: never)")
    s.add_argument("--control-socket", metavar="PATH",
                   help="serve the control socket (QMP, mode 0600) on PATH: `vballoon ctl`, "
                   "vballoon.control.client, qemu.qmp, socat")
    s.add_argument("--export-dir", metavar="DIR",
                   help="the only directory export-free-page-map writes files in (must exist)")


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    p = _Parser(prog="vballoon", description=DESCRIPTION,
                                formatter_class=_Formatter, parents=[common])
    p.add_argument("--version", action="version", version=f"vballoon {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="{serve,ctl,migrate,demo}")

    s = sub.add_parser("serve", parents=[common], formatter_class=_Formatter,
                       help="run the vhost-user balloon back-end",
                       description="Serve a virtio-balloon device on a vhost-user socket.  "
                       "Start it before QEMU: QEMU connects once, at start-up.")
    add_serve_options(s)

    from vballoon.app.ctl import add_parser as add_ctl_parser
    add_ctl_parser(sub, parents=[common])
    from vballoon.migrate.cli import add_parser as add_migrate_parser
    add_migrate_parser(sub, parents=[common])

    d = sub.add_parser("demo", parents=[common], formatter_class=_Formatter,
                       help="the daemon, a simulated guest and one free-page round over the "
                       "loopback front-end (no QEMU needed)",
                       description="Start the daemon, attach the loopback front-end (real "
                       "vhost-user, memfd guest RAM, eventfds) and a simulated guest whose "
                       "memory looks like a machine after a memory-hungry workload exited; run "
                       "one free-page-bitmap round, print a summary, write the map and its "
                       "picture.")
    d.add_argument("--memory", default="8G", metavar="SIZE",
                   help="guest RAM, 128M to 1T (sparse: costs no host memory)")
    d.add_argument("--seed", type=int, default=2, help="seed of the simulated guest's layout")
    d.add_argument("--out", default="vballoon-demo", metavar="DIR",
                   help="directory the map (round-N.vbmap) and its picture (round-N.png) are "
                   "written to; made if missing")
    return p


def _log_level(args: argparse.Namespace) -> str:
    level = getattr(args, "log_level", None) or os.environ.get(LOG_ENV, "").lower() or \
        ("info" if args.command == "serve" else "warning")
    if level not in LOG_LEVELS:
        raise ConfigError("bad-log-level", f"${LOG_ENV}={level!r}: expected one of "
                          f"{', '.join(LOG_LEVELS)}")
    return level


def _setup_logging(level: str) -> None:
    # Under systemd (JOURNAL_STREAM set) the journal stamps each line itself.
    fmt = "%(levelname)s %(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM") \
        else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level.upper(), format=fmt)


def check_serve_args(args: argparse.Namespace) -> None:
    """What can be checked before anything is created: a bad option leaves nothing behind."""
    if args.socket_path is None and args.fd is None and "LISTEN_FDS" not in os.environ:
        raise ConfigError("socket-missing", "give --socket-path PATH or --fd FDNUM (or start "
                          "under systemd socket activation)")
    if args.socket_path is None and (args.socket_group is not None or
                                     args.socket_mode is not None):
        raise ConfigError("socket-options", "--socket-group and --socket-mode apply to the "
                          "socket made with --socket-path, not to an inherited one")
    for opt, path in (("--socket-path", args.socket_path), ("--control-socket",
                                                             args.control_socket)):
        if path is not None:
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                raise ConfigError("socket-dir-missing", f"{opt} {path}: directory {parent} "
                                  "does not exist")
    if args.export_dir is not None and not os.path.isdir(args.export_dir):
        raise ConfigError("export-dir-missing", f"--export-dir {args.export_dir}: not an "
                          "existing directory")


def _serve(args: argparse.Namespace) -> int:
    if args.print_capabilities:
        print(json.dumps(CAPABILITIES))
        return 0
    check_serve_args(args)
    from vballoon.app.daemon import serve
    asyncio.run(serve(args.socket_path, fd=args.fd, socket_mode=args.socket_mode,
                      socket_group=args.socket_group, features=_features(args.feature),
                      stats_interval=args.stats_interval, control_path=args.control_socket,
                      export_dir=args.export_dir))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from vballoon.units import format_size, parse_size
    size = parse_size(args.memory)
    if not DEMO_MIN <= size <= DEMO_MAX:
        raise ConfigError("demo-memory", f"--memory {args.memory}: the demo's guest is "
                          f"{format_size(DEMO_MIN)} to {format_size(DEMO_MAX)}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ConfigError("demo-out", f"--out {args.out}: exists and is not a directory")
    from vballoon.app.demo import run_demo
    return asyncio.run(run_demo(size, seed=args.seed, out=args.out))


def run(args: argparse.Namespace) -> int:
    _setup_logging(_log_level(args))
    if args.command == "serve":
        return _serve(args)
    if args.command == "demo":
        return _demo(args)
    if args.command == "migrate":
        from vballoon.migrate.cli import run as run_migrate
        return run_migrate(args)
    from vballoon.app.ctl import run as run_ctl
    return run_ctl(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ConfigError as e:
        print(f"vballoon: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def backend_main(argv: list[str] | None = None) -> int:
    """``vhost-user-balloon``: the serve options alone, as QEMU's back-end conventions have
    them (``--socket-path``/``--fd``, ``--print-capabilities``)."""
    p = _Parser(prog="vhost-user-balloon", formatter_class=_Formatter,
                                parents=[_common()],
                                description="vballoon's daemon (`vballoon serve`) under QEMU's "
                                "vhost-user back-end program conventions.")
    p.add_argument("--version", action="version", version=f"vballoon {__version__}")
    add_serve_options(p)
    args = p.parse_args(argv)
    args.command = "serve"
    try:
        return run(args)
    except ConfigError as e:
        print(f"vhost-user-balloon: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

