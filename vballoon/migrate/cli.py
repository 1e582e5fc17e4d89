"""`vballoon migrate` (source) and `vballoon migrate --incoming` (destination)."""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any, Sequence


def add_parser(sub: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    m = sub.add_parser(
        "migrate", parents=list(parents), help="live-migrate a QEMU guest, skipping the pages the guest reports free",
        description="Source: vballoon migrate --qmp SRC.qmp --control SRC-ctl.sock --to HOST:PORT. "
        "Destination (start first; QEMU with -incoming defer -S and the same RAM size, no balloon "
        "device; a fresh `vballoon serve` listening): vballoon migrate --incoming HOST:PORT --qmp "
        "DST.qmp --qemu-uri tcp:0:4444 --vhost-socket DST-vb.sock --control DST-ctl.sock. "
        "Guest RAM must be -object memory-backend-file,share=on,mem-path=/dev/shm/... "
        "Needs CAP_SYS_PTRACE (write tracking injects userfaultfd into QEMU and the daemon).")
    m.add_argument("--qmp", required=True, help="this side's QEMU QMP socket")
    m.add_argument("--control", help="this side's vballoon control socket")
    m.add_argument("--to", metavar="HOST:PORT|PATH", help="source: the destination's stream address")
    m.add_argument("--incoming", metavar="HOST:PORT|PATH", help="destination: listen here")
    m.add_argument("--map", choices=("auto", "bitmap", "hint", "none"), default="auto",
                   help="source: the free-page round to use (default auto)")
    m.add_argument("--device-id", help="source: the balloon's QEMU device id (default: the only one)")
    m.add_argument("--max-passes", type=int, default=8)
    m.add_argument("--converge-pages", type=int, default=2048,
                   help="source: end the dirty passes below this many written pages")
    m.add_argument("--quiet-window", type=float, default=250, metavar="MS",
                   help="source: before the unplug, send a written page only once it was not "
                        "written for this long (default 250)")
    m.add_argument("--final-pages", type=int, default=256,
                   help="source: converge before the stop until fewer pages than this are written")
    m.add_argument("--downtime-limit", type=float, metavar="MS",
                   help="source: keep converging until the final pass should take at most MS "
                   "(QEMU's trade of bytes for downtime); default: stop when passes stop shrinking")
    m.add_argument("--converge-timeout", type=float, default=60.0, metavar="S",
                   help="source: give up converging towards --downtime-limit after S seconds")
    m.add_argument("--max-bandwidth", default="0", help="source: stream bytes/s cap (e.g. 128M); 0: none")
    m.add_argument("--no-skip-zero", action="store_true", help="source: send zero pages too")
    m.add_argument("--qemu-uri", help="destination: QEMU's migrate-incoming URI")
    m.add_argument("--advertise-uri", help="destination: the URI the source QEMU connects to")
    m.add_argument("--vhost-socket", help="destination: the fresh daemon's vhost-user socket; "
                   "source: the daemon's socket to re-plug on failure (default: QEMU's chardev)")
    m.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    from vballoon.units import parse_size
    from vballoon.migrate.engine import DestOptions, MigrationError, SourceOptions, migrate_destination, migrate_source
    from vballoon.migrate.qemu import QEMUError
    from vballoon.migrate.stream import StreamError
    from vballoon.migrate.uffd import TrackingError

    def progress(line: str) -> None:
        print(f"vballoon migrate: {line}", file=sys.stderr, flush=True)

    if bool(args.to) == bool(args.incoming):
        print("vballoon migrate: error: give exactly one of --to (source) and --incoming "
              "(destination)", file=sys.stderr)
        return 2
    try:
        if args.to:
            summary = asyncio.run(migrate_source(SourceOptions(
                qmp=args.qmp, dest=args.to, control=args.control, map=args.map,
                device_id=args.device_id, vhost_socket=args.vhost_socket, max_passes=args.max_passes,
                converge_pages=args.converge_pages, final_pages=args.final_pages,
                quiet_window=args.quiet_window / 1000,
                downtime_limit=None if args.downtime_limit is None else args.downtime_limit / 1000,
                converge_timeout=args.converge_timeout, max_bandwidth=parse_size(args.max_bandwidth),
                skip_zero=not args.no_skip_zero, progress=progress)))
            if args.json:
                print(json.dumps(summary.to_json(), indent=1))
            else:
                print(summary.text())
        else:
            if not args.qemu_uri:
                print("vballoon migrate: error: --incoming needs --qemu-uri", file=sys.stderr)
                return 2
            result = asyncio.run(migrate_destination(DestOptions(
                qmp=args.qmp, listen=args.incoming, qemu_uri=args.qemu_uri,
                advertise_uri=args.advertise_uri, vhost_socket=args.vhost_socket,
                control=args.control, progress=progress,
                ready=lambda: progress(f"listening on {args.incoming}"))))
            print(json.dumps(result) if args.json else
                  f"received {result['pages']} pages ({result['bytes'] / 2**20:.1f} MiB)")
    except (MigrationError, QEMUError, StreamError, TrackingError) as e:
        print(f"vballoon migrate: error: {e}", file=sys.stderr)
        return 1
    return 0
