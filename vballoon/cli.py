"""Command line: ``vballoon serve`` (the daemon) and ``vballoon demo`` (no QEMU needed)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from .balloon import FEATURE_NAMES
from .errors import ConfigError

LOG_LEVELS = ("debug", "info", "warning", "error")


def _features(pairs: list[str]) -> list[str]:
    on = dict.fromkeys(FEATURE_NAMES, True)
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in on or value not in ("on", "off"):
            raise ConfigError("bad-feature", f"--feature {pair!r}: expected NAME=on|off with "
                              f"NAME one of {', '.join(FEATURE_NAMES)}")
        on[name] = value == "on"
    return [n for n, v in on.items() if v]


def parse_size(text: str) -> int:
    """``4096``, ``64K``, ``8G``, ``1T`` -> bytes (binary units)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        return int(t[:-1]) * units[t[-1]] if t and t[-1] in units else int(t)
    except ValueError:
        raise ConfigError("bad-size", f"{text!r} is not a size (e.g. 4096, 512M, 8G)") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vballoon", description=__doc__)
    p.add_argument("--log-level", choices=LOG_LEVELS,
                   help="default: info for serve, warning for demo and ctl")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the vhost-user balloon back-end",
                       description="Serve a virtio-balloon device on a vhost-user socket. "
                       "Start it before QEMU: QEMU connects once, at start-up.")
    s.add_argument("--socket-path", required=True, help="Unix socket QEMU's -chardev connects to")
    s.add_argument("--feature", action="append", default=[], metavar="NAME=on|off",
                   help="switch a balloon feature (all on by default): "
                   + ", ".join(FEATURE_NAMES))
    s.add_argument("--stats-interval", type=float, default=5.0, metavar="SECONDS",
                   help="how often to ask the guest for fresh statistics (0: never)")
    s.add_argument("--control-socket", metavar="PATH",
                   help="serve the control socket (QMP; mode 0600) on PATH: `vballoon ctl`, "
                   "vballoon.client, qemu.qmp, socat")
    s.add_argument("--export-dir", metavar="DIR",
                   help="the directory export-free-page-map writes its files in")

    d = sub.add_parser("demo", help="the daemon, a simulated guest and one free-page round, "
                       "over the loopback front-end (no QEMU needed)",
                       description="Start the daemon, attach the loopback front-end (real "
                       "vhost-user, memfd guest RAM, eventfds) and a simulated guest whose "
                       "memory looks like a machine after a memory-hungry workload exited; run "
                       "one free-page-bitmap round, print a summary, write the map to a file.")
    d.add_argument("--memory", default="8G", metavar="SIZE",
                   help="guest RAM, e.g. 8G or 64G (sparse: costs no host memory; default 8G)")
    d.add_argument("--seed", type=int, default=2, help="seed of the simulated guest's layout")
    d.add_argument("--out", default="vballoon-demo", metavar="DIR",
                   help="where the map (and its picture) are written (default ./vballoon-demo)")
    from .ctl import add_parser as add_ctl_parser
    add_ctl_parser(sub)
    from .migrate.cli import add_parser as add_migrate_parser
    add_migrate_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = args.log_level or ("info" if args.command == "serve" else "warning")
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "serve":
            from .daemon import serve
            asyncio.run(serve(args.socket_path, features=_features(args.feature),
                              stats_interval=args.stats_interval,
                              control_path=args.control_socket, export_dir=args.export_dir))
        elif args.command == "demo":
            from .demo import run_demo
            return asyncio.run(run_demo(args.memory, seed=args.seed, out=args.out))
        elif args.command == "ctl":
            from .ctl import run as run_ctl
            return run_ctl(args)
        elif args.command == "migrate":
            from .migrate.cli import run as run_migrate
            return run_migrate(args)
    except ConfigError as e:
        print(f"vballoon: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
