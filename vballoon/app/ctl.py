"""``vballoon ctl``: the control socket from the shell, one command per run.

Every command of ``protocol/control-socket.md`` has a subcommand; the output is for people
unless ``--json`` asks for the QMP reply itself.  Errors go to stderr as one line and the exit
status is 1 (a command failed, or the socket cannot be reached) -- 2 for usage errors.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime
from typing import Any, Sequence, TextIO

from vballoon.control.client import Client, QMPCommandError, QMPConnectionError, RoundInfo
from vballoon.errors import VballoonError
from vballoon.units import FRAME as PAGE, parse_size

PROGRESS_PERIOD = 0.25          # seconds between progress lines of `round start --wait`


def human(nbytes: float) -> str:
    """``8.00 GiB``, ``512.0 MiB``, ``4.0 KiB``, ``12 B``."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if abs(nbytes) >= 1 << shift:
            v = nbytes / (1 << shift)
            return f"{v:.2f} {unit}" if unit in ("TiB", "GiB") else f"{v:.1f} {unit}"
    return f"{int(nbytes)} B"


def _round_id(text: str) -> int | None:
    if text in ("latest", "last"):
        return None
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a round id (a number, or "
                                         "'latest')") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("round ids are positive")
    return value


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[-1]) from None


CONTROL_ENV = "VBALLOON_CONTROL_SOCKET"


def _width(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of pixels") from None
    if not (64 <= value <= 16384 and value % 64 == 0):
        raise argparse.ArgumentTypeError(f"{text}: the width is a multiple of 64 from 64 to "
                                         "16384")
    return value


def add_parser(sub: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
    """The ``ctl`` subcommand, for ``vballoon.app.cli``'s parser."""
    default = os.environ.get(CONTROL_ENV) or None
    p = sub.add_parser("ctl", parents=list(parents), help="talk to a running daemon's control socket",
                       description="Send one command to the daemon's control socket (QMP) "
                       "and print the reply.")
    p.add_argument("--control-socket", required=default is None, default=default,
                   metavar="PATH", help=f"the daemon's --control-socket (default: ${CONTROL_ENV})")
    p.add_argument("--json", action="store_true",
                   help="print the QMP reply as JSON instead of text")
    cmds = p.add_subparsers(dest="ctl_command", required=True, metavar="COMMAND")

    b = cmds.add_parser("balloon", help="ask for a guest of SIZE (QEMU's balloon)")
    b.add_argument("size", type=_size, metavar="SIZE",
                   help="the guest's memory after ballooning: bytes, or 512M, 7G, ...")
    cmds.add_parser("query-balloon", help="the guest's memory size after ballooning")
    cmds.add_parser("stats", help="the guest's last memory statistics")

    r = cmds.add_parser("round", help="free-page rounds: start one, or query one")
    rc = r.add_subparsers(dest="round_command", required=True, metavar="start|query")
    rs = rc.add_parser("start", help="ask the guest for its free pages (start dirty "
                       "tracking first)")
    rs.add_argument("--kind", choices=("bitmap", "hint", "auto"), default="auto",
                    help="the bitmap queue, free page hinting, or the bitmap queue when the "
                    "guest has it (default)")
    rs.add_argument("--wait", action="store_true",
                    help="wait until the round ends; progress on stderr")
    rs.add_argument("--timeout", type=float, metavar="SECONDS",
                    help="with --wait: give up after this long (the round goes on)")
    rq = rc.add_parser("query", help="a round's summary, and with --ranges its free ranges")
    rq.add_argument("id", nargs="?", type=_round_id, default=None, metavar="ID",
                    help="round id (default: the latest)")
    rq.add_argument("--ranges", action="store_true", help="list the free ranges")
    rq.add_argument("--max-ranges", type=int, default=None, metavar="N",
                    help="list at most N ranges (default 1024, at most 65536)")

    e = cmds.add_parser("export", help="write a round's map into the daemon's export directory")
    e.add_argument("id", type=_round_id, metavar="ID", help="round id, or 'latest'")
    e.add_argument("file", metavar="FILE", help="file name inside the export directory")
    e.add_argument("--format", required=True, choices=("ranges", "bitmap", "json"),
                   help="ranges (for migration engines), bitmap (free, covered, ballooned), "
                   "json (small maps)")

    m = cmds.add_parser("map", help="draw a round's map of guest memory as a PNG (needs the "
                        "daemon's --export-dir on this host)")
    m.add_argument("--png", required=True, metavar="FILE", help="the picture to write")
    m.add_argument("id", nargs="?", type=_round_id, default=None, metavar="ID",
                   help="round id (default: the latest)")
    m.add_argument("--width", type=_width, default=1024, metavar="PIXELS",
                   help="width of the map (a multiple of 64; default 1024)")

    cmds.add_parser("commands", help="the commands the daemon accepts")
    cmds.add_parser("version", help="the daemon's version")
    ev = cmds.add_parser("events", help="print events as they come, until interrupted")
    ev.add_argument("--count", type=int, default=None, metavar="N",
                    help="stop after N events")
    return p


# -- output -------------------------------------------------------------------------------------

def _when(t: float | None) -> str:
    return "-" if not t else datetime.fromtimestamp(t).isoformat(sep=" ", timespec="seconds")


def round_text(r: RoundInfo) -> str:
    lines = [f"round {r.id} ({r.kind}): {r.state}"
             + (f" ({r.abort_reason})" if r.abort_reason else "")
             + (", complete" if r.complete else "")]
    lines.append(f"  coverage  {100 * r.coverage:6.2f} %  ({r.covered_pages:,} of "
                 f"{r.ram_pages:,} pages)")
    lines.append(f"  free      {human(r.free_bytes)} ({r.free_pages:,} pages, "
                 f"{100 * r.free_pages / r.ram_pages if r.ram_pages else 0:.1f} % of RAM)"
                 + (f" in {r.range_count:,} ranges" if r.range_count is not None else ""))
    lines.append(f"  requested {_when(r.requested_at)}"
                 + (f", ended after {1000 * r.duration:.1f} ms" if r.duration is not None
                    else ""))
    if r.ranges is not None:
        lines.append(f"  {'start pfn':>14} {'pages':>12}  guest-physical bytes")
        for a, n in r.ranges.tolist():
            lines.append(f"  {a:>#14x} {n:>12,}  [{a * PAGE:#x}, {(a + n) * PAGE:#x})")
        if r.next_pfn is not None:
            lines.append(f"  ... more from pfn {r.next_pfn:#x} (--max-ranges)")
    return "\n".join(lines)


def _progress(r: RoundInfo, t0: float, err: TextIO) -> None:
    text = (f"round {r.id}: {r.state:<9} coverage {100 * r.coverage:5.1f} %  "
            f"free {human(r.free_bytes):>10}  {time.monotonic() - t0:5.1f} s")
    err.write(("\r" + text) if err.isatty() else text + "\n")
    err.flush()


def _start_round(c: Client, args: argparse.Namespace, err: TextIO) -> RoundInfo:
    if not args.wait:
        return c.start_round(args.kind)
    mark = c.event_serial                          # events after this are this round's
    r = c.start_round(args.kind)
    t0 = time.monotonic()
    deadline = None if args.timeout is None else t0 + args.timeout
    last_state = None
    while True:
        try:
            ev = c.wait_event("FREE_PAGE_ROUND_COMPLETED", after=mark, timeout=PROGRESS_PERIOD,
                              match=lambda e: e.data.get("id") == r.id)
            r = RoundInfo.from_qmp(ev.data)
        except TimeoutError:
            r = c.query_round(r.id)
        if not r.active or err.isatty() or r.state != last_state:
            _progress(r, t0, err)
            last_state = r.state
        if not r.active:
            if err.isatty():
                err.write("\n")
            return r
        if deadline is not None and time.monotonic() >= deadline:
            if err.isatty():
                err.write("\n")
            raise QMPCommandError("GenericError", f"free page round {r.id} did not end within "
                                  f"{args.timeout:g} s; it goes on", "start-free-page-round")


def _map(c: Client, args: argparse.Namespace, out: TextIO) -> Any:
    from vballoon.fpmap.export import read_export
    from vballoon.fpmap.picture import render_png
    where = os.path.dirname(os.path.abspath(args.png))
    if not os.path.isdir(where):
        raise VballoonError("png-dir-missing", f"--png {args.png}: directory {where} does not "
                            "exist")
    tmp = f".vballoon-ctl-map-{os.getpid()}.bin"
    info = c.export(tmp, "bitmap", args.id)
    try:
        m = read_export(info.path)
    finally:
        os.unlink(info.path)
    title = (f"ROUND {m.round_id} ({m.kind}, {m.state})  COVERAGE {100 * m.coverage:.1f}%  "
             f"FREE {human(m.free_bytes)} OF {human(m.ram_pages * PAGE)}")
    pic = render_png(m, m.ballooned, args.png, width=args.width, title=title)
    result = {"path": os.path.abspath(args.png), "width": pic.width, "height": pic.height,
              "pages-per-pixel": pic.pages_per_pixel, "round": m.round_id}
    if not args.json:
        out.write(f"wrote {args.png}: {pic.width}x{pic.height}, round {m.round_id}, 1 pixel = "
                  f"{pic.pages_per_pixel} page(s), 1 row = {human(pic.row_bytes)}\n")
    return result


def _run(c: Client, args: argparse.Namespace, out: TextIO, err: TextIO) -> Any:
    """Run the command; print the human text, and return the JSON-able reply."""
    cmd = args.ctl_command
    if cmd == "balloon":
        c.balloon(args.size)
        now = c.query_balloon()
        text = f"asked for a guest of {human(args.size)}; it has {human(now.actual)} now"
        reply: Any = {}
    elif cmd == "query-balloon":
        reply = c.execute("query-balloon")
        text = f"actual: {human(reply['actual'])} ({reply['actual']} bytes)"
    elif cmd == "stats":
        reply = c.execute("query-guest-stats")
        rows = [f"  {k.removeprefix('stat-'):<22} "
                + (human(v) if k.endswith("-memory") or k == "stat-disk-caches" else f"{v:,}")
                for k, v in sorted(reply["stats"].items())]
        text = "\n".join([f"guest stats (updated {_when(reply['last-update'])})"] + rows
                         if rows else ["the guest has not sent statistics"])
    elif cmd == "round":
        if args.round_command == "start":
            r = _start_round(c, args, err)
        else:
            r = c.query_round(args.id, ranges=args.ranges, max_ranges=args.max_ranges)
        reply, text = _round_json(r), round_text(r)
    elif cmd == "export":
        e = c.export(args.file, args.format, args.id)
        reply = e.to_qmp()
        text = (f"wrote {e.path}: round {e.id}, {e.format}, {human(e.bytes)}, "
                f"{e.ranges:,} free ranges")
    elif cmd == "map":
        return _map(c, args, out)
    elif cmd == "commands":
        reply = c.execute("query-commands")
        text = "\n".join(sorted(x["name"] for x in reply))
    elif cmd == "version":
        reply = c.execute("query-version")
        text = reply["package"]
    elif cmd == "events":
        mark, n = c.event_serial, 0
        while args.count is None or n < args.count:
            ev = c.wait_event(after=mark)
            mark, n = ev.serial, n + 1
            line = {"event": ev.name, "data": ev.data, "timestamp": ev.timestamp}
            out.write((json.dumps(line) if args.json else
                       f"{_when(ev.timestamp)} {ev.name} {json.dumps(ev.data)}") + "\n")
            out.flush()
        return None
    else:  # pragma: no cover - argparse refuses it
        raise AssertionError(cmd)
    if not args.json:
        out.write(text + "\n")
    return reply


def _round_json(r: RoundInfo) -> dict[str, Any]:
    return r.to_qmp()


def run(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """``vballoon ctl``: 0 on success, 1 with a one-line message on stderr on failure."""
    try:
        with Client(args.control_socket) as c:
            reply = _run(c, args, out, err)
    except QMPConnectionError as e:
        hint = ""
        if e.rule == "control-connect":
            hint = " (is the daemon running with --control-socket?)"
        err.write(f"vballoon ctl: error: {str(e).split(': ', 1)[-1]}{hint}\n")
        return 1
    except QMPCommandError as e:
        err.write(f"vballoon ctl: {e.command or 'error'}: {e.error_class}: {e.desc}\n")
        return 1
    except VballoonError as e:
        err.write(f"vballoon ctl: error: {e}\n")
        return 1
    except OSError as e:               # writing the picture: a full disk, a read-only dir, ...
        err.write(f"vballoon ctl: error: {e.filename or ''}: {e.strerror}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    if args.json and reply is not None:
        out.write(json.dumps(reply, indent=2) + "\n")
    return 0


def parser() -> argparse.ArgumentParser:
    """A parser of ``ctl ...`` alone (``vballoon.app.cli`` adds the subcommand to its own)."""
    p = argparse.ArgumentParser(prog="vballoon")
    add_parser(p.add_subparsers(dest="command", required=True))
    return p


def main(argv: list[str] | None = None, out: TextIO = sys.stdout,
         err: TextIO = sys.stderr) -> int:
    """``vballoon ctl ...`` without the rest of the CLI (tests, ``python -m``)."""
    return run(parser().parse_args(argv), out, err)
