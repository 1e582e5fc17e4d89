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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vballoon", description=__doc__)
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info")
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

    sub.add_parser("demo", help="run the daemon against the loopback front-end and guest")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "serve":
            from .daemon import serve
            asyncio.run(serve(args.socket_path, features=_features(args.feature),
                              stats_interval=args.stats_interval))
        elif args.command == "demo":
            from .demo import run_demo
            return asyncio.run(run_demo())
    except ConfigError as e:
        print(f"vballoon: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
