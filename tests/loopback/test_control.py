"""The control socket end to end: the daemon, a real Unix socket, several clients, and the
loopback guest answering rounds.  Raw QMP where the bytes matter, vballoon.client elsewhere."""
from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import stat

import numpy as np
import pytest
from vbtest import attached_guest

from vballoon.app import ctl
from vballoon.control import server as control
from vballoon.control.client import AsyncClient, QMPCommandError
from vballoon.app.daemon import Daemon
from vballoon.errors import ConfigError
from vballoon.fpmap.export import read_export

MiB, GiB = 1 << 20, 1 << 30


class Raw:
    """A QMP client that shows the bytes: one JSON object per line in, raw bytes out."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.events: list[dict] = []

    @classmethod
    async def open(cls, path: str, negotiate: bool = True) -> "Raw":
        self = cls(*await asyncio.open_unix_connection(path))
        self.greeting = await self.recv()
        if negotiate:
            assert await self.cmd("qmp_capabilities") == {"return": {}}
        return self

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self) -> dict:
        line = await self.reader.readline()
        assert line.endswith(b"\r\n"), line
        return json.loads(line)

    async def reply(self) -> dict:
        """The next reply; events met on the way are kept in .events."""
        while "event" in (msg := await self.recv()):
            self.events.append(msg)
        return msg

    async def cmd(self, name: str, args: dict | None = None, **extra) -> dict:
        msg = {"execute": name, **extra}
        if args is not None:
            msg["arguments"] = args
        await self.send(json.dumps(msg).encode())
        return await self.reply()

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


@pytest.fixture
async def guest(daemon):
    """A 3 GiB q35-like guest (a PCI hole from 2 to 4 GiB) with the reference driver."""
    async with attached_guest(daemon, 3 * GiB, seed=11) as g:
        yield g


def error(reply: dict) -> tuple[str, str]:
    return reply["error"]["class"], reply["error"]["desc"]


# -- the socket -----------------------------------------------------------------------------------

async def test_the_socket_is_mode_0600_and_goes_away_on_close(tmp_path):
    d = Daemon(str(tmp_path / "vb.sock"), stats_interval=0,
               control_path=str(tmp_path / "control.sock"))
    await d.start()
    st = os.stat(tmp_path / "control.sock")
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["control.sock", "vb.sock"]   # no temporary name
    await d.close()
    assert not os.path.exists(tmp_path / "control.sock")


async def test_a_control_path_served_by_someone_else_is_refused(tmp_path, daemon):
    other = Daemon(str(tmp_path / "vb2.sock"), stats_interval=0,
                   control_path=daemon.control_path)
    with pytest.raises(ConfigError, match="socket-path-in-use"):
        await other.start()
    await other.close()


async def test_greeting_version_and_commands(daemon):
    c = await Raw.open(daemon.control_path)
    assert c.greeting == {"QMP": {"version": control.version_info(), "capabilities": []}}
    assert (await c.cmd("query-version"))["return"] == control.version_info()
    names = [x["name"] for x in (await c.cmd("query-commands"))["return"]]
    assert names == sorted(["qmp_capabilities", *(cmd.name for cmd in control.COMMANDS)])
    await c.close()


async def test_commands_need_an_attached_guest_device_not_active(daemon):
    c = await Raw.open(daemon.control_path)
    for name, args in (("query-balloon", None), ("balloon", {"value": GiB}),
                       ("query-guest-stats", None), ("start-free-page-round", {})):
        assert error(await c.cmd(name, args)) == ("DeviceNotActive",
                                                  "No balloon device has been activated")
    await c.close()


# -- several clients ----------------------------------------------------------------------------

async def test_several_clients_at_once_each_get_their_own_answers(daemon, guest):
    clients = [await Raw.open(daemon.control_path) for _ in range(8)]
    assert daemon.control.clients == 8

    async def talk(i: int, c: Raw) -> list:
        await c.send(b"".join(json.dumps({"execute": "query-balloon", "id": [i, k]}).encode()
                              for k in range(20)))
        return [await c.reply() for _ in range(20)]

    answers = await asyncio.gather(*(talk(i, c) for i, c in enumerate(clients)))
    for i, replies in enumerate(answers):
        assert [r["id"] for r in replies] == [[i, k] for k in range(20)]
        assert all(r["return"] == {"actual": 3 * GiB} for r in replies)
    for c in clients:
        await c.close()


async def test_one_clients_bad_input_never_reaches_another(daemon):
    bad, good = await Raw.open(daemon.control_path), await Raw.open(daemon.control_path)
    await bad.send(b"\xff{]" + b'{"execute": "' + b"x" * (100 << 10) + b'"}' + b"[" * 1000)
    assert (await good.cmd("query-version", id="g"))["id"] == "g"
    got = [error(await bad.reply())[1] for _ in range(3)]
    assert got == ["JSON parse error, stray '\\xff'",
                   "JSON parse error, expecting property name enclosed in double quotes",
                   "JSON token size limit exceeded"]
    await bad.send(b"\x01")                      # resynchronise (qmp-spec)
    assert error(await bad.reply())[1] == "JSON nesting depth limit exceeded"
    assert error(await bad.reply())[1] == "JSON parse error, stray '\\x01'"
    assert (await bad.cmd("query-version"))["return"]["package"].startswith("vballoon")
    assert (await good.cmd("query-version", id="h"))["id"] == "h"
    await bad.close()
    await good.close()


async def test_a_client_leaving_mid_command_is_cancelled_and_others_go_on(daemon, guest):
    g, model = guest
    waiting, cancelled = asyncio.Event(), asyncio.Event()
    real_wait = daemon.service.wait_round

    async def wait_round(rid, timeout=None):
        waiting.set()
        try:
            return await real_wait(rid, timeout)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    daemon.service.wait_round = wait_round
    leaver, stayer = await Raw.open(daemon.control_path), await Raw.open(daemon.control_path)
    await leaver.send(b'{"execute": "start-free-page-round", "arguments": {"wait": true}}')
    await waiting.wait()
    await leaver.close()
    await asyncio.wait_for(cancelled.wait(), 30)
    r = daemon.service.get_round()
    assert r.active and not daemon.service.waiting     # the round goes on
    assert (await stayer.cmd("query-free-page-round"))["return"]["state"] == "requested"
    await g.answer_bitmap_request(model)
    assert (await stayer.cmd("query-free-page-round"))["return"]["state"] == "done"
    assert stayer.events[0]["event"] == "FREE_PAGE_ROUND_COMPLETED"
    await stayer.close()


async def test_a_half_closed_client_still_gets_every_answer(daemon):
    """As ``echo ... | socat - UNIX-CONNECT:...`` does: send everything, shut down writing,
    read to the end."""
    loop = asyncio.get_running_loop()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    await loop.sock_connect(s, daemon.control_path)
    await loop.sock_sendall(s, b'{"execute":"qmp_capabilities"}\n{"execute":"query-version",'
                               b'"id":1}\n{"execute":"balloon","arguments":{"value":"x"}}\n')
    s.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := await loop.sock_recv(s, 65536):
        data += chunk
    s.close()
    lines = [json.loads(x) for x in data.split(b"\r\n") if x]
    assert "QMP" in lines[0] and lines[1] == {"return": {}}
    assert lines[2]["id"] == 1 and error(lines[3])[1] == \
        "Invalid parameter type for 'value', expected: integer"


async def test_a_client_that_does_not_read_is_disconnected(daemon, monkeypatch):
    monkeypatch.setattr(control, "MAX_OUTPUT_BACKLOG", 64 << 10)
    stuck = await Raw.open(daemon.control_path)
    fine = await Raw.open(daemon.control_path, negotiate=False)     # gets no events yet
    stuck.writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    payload = {"filler": "x" * 4096}
    for _ in range(10_000):
        daemon.service.emit("BALLOON_CHANGE", payload)
        if daemon.control.clients == 1:
            break
        await asyncio.sleep(0)                  # let the server's writes go out
    else:
        pytest.fail("the stuck client was never disconnected")
    assert await fine.cmd("qmp_capabilities") == {"return": {}}
    assert (await fine.cmd("query-version"))["return"]
    await stuck.close()
    await fine.close()


# -- events ---------------------------------------------------------------------------------------

async def test_events_go_to_negotiated_clients_only(daemon, guest):
    g, _ = guest
    ready, waiting = await Raw.open(daemon.control_path), \
        await Raw.open(daemon.control_path, negotiate=False)
    assert (await ready.cmd("balloon", {"value": 3 * GiB - 64 * MiB}))["return"] == {}
    await g.fe.wait_config_change()
    await g.balance()
    ev = await ready.recv()
    assert ev["event"] == "BALLOON_CHANGE" and ev["data"] == {"actual": 3 * GiB - 64 * MiB}
    assert set(ev["timestamp"]) == {"seconds", "microseconds"}
    assert await waiting.cmd("qmp_capabilities") == {"return": {}}   # nothing came before it
    assert waiting.events == []
    await ready.close()
    await waiting.close()


# -- rounds over the socket -----------------------------------------------------------------------

async def test_a_full_round_over_the_socket(no_fd_leak, daemon, guest):
    g, model = guest
    async with AsyncClient(daemon.control_path) as c:
        mark = c.event_serial
        r = await c.start_round("bitmap")
        assert (r.kind, r.state, r.complete) == ("bitmap", "requested", False)
        await g.answer_bitmap_request(model)
        ev = await c.wait_event("FREE_PAGE_ROUND_COMPLETED", after=mark, timeout=30)
        assert ev.data["id"] == r.id and ev.data["complete"] and ev.data["coverage"] == 1.0
        done = await c.wait_round(r.id)
        assert done.state == "done" and done.free_pages == model.free_pages()
        expected = daemon.service.get_round(r.id).map.ranges()
        assert np.array_equal(await c.free_ranges(r.id), expected)
        for fmt in ("ranges", "bitmap", "json"):
            e = await c.export(f"round.{fmt}", fmt, r.id)
            m = read_export(e.path)
            assert e.path == os.path.join(daemon.export_dir, f"round.{fmt}")
            assert np.array_equal(m.ranges, expected) and e.ranges == len(expected)
            assert m.complete and m.free_pages == model.free_pages()


async def test_ranges_come_in_pages(daemon, guest, monkeypatch):
    g, model = guest
    c = await Raw.open(daemon.control_path)
    rid = (await c.cmd("start-free-page-round"))["return"]["id"]
    await g.answer_bitmap_request(model)
    expected = daemon.service.get_round(rid).map.ranges().tolist()
    got, start = [], 0
    while start is not None:
        page = (await c.cmd("query-free-page-round", {"id": rid, "ranges": True,
                                                      "max-ranges": 100, "start-pfn": start}))
        info = page["return"]
        assert len(info["ranges"]) <= 100
        got += [[x["start-pfn"], x["pages"]] for x in info["ranges"]]
        start = info["next-pfn"]
    assert got == expected
    await c.close()


async def test_start_round_with_wait_answers_when_the_round_is_done(daemon, guest):
    g, model = guest
    async with AsyncClient(daemon.control_path) as c:
        info, _ = await asyncio.gather(c.start_round("auto", wait=True, timeout=30),
                                       g.answer_bitmap_request(model))
        assert info.state == "done" and info.complete and info.coverage == 1.0


async def test_start_round_with_wait_gives_up_after_timeout_and_the_round_goes_on(daemon, guest):
    async with AsyncClient(daemon.control_path) as c:
        with pytest.raises(QMPCommandError) as e:
            await c.start_round("bitmap", wait=True, timeout=0.01)
        assert e.value.error_class == "GenericError" and "did not end within" in e.value.desc
        assert (await c.query_round()).state == "requested"


@pytest.mark.parametrize("args,desc", [
    ({"timeout": 5}, "Parameter 'timeout' needs 'wait': true"),
    ({"wait": True, "timeout": 0}, "Parameter 'timeout' expects a positive number of seconds"),
    ({"wait": True, "timeout": -1.5}, "Parameter 'timeout' expects a positive number"),
    ({"kind": "telepathy"}, "Parameter 'kind' does not accept value 'telepathy'"),
])
async def test_start_round_refuses_bad_arguments(daemon, guest, args, desc):
    c = await Raw.open(daemon.control_path)
    r = await c.cmd("start-free-page-round", args)
    assert error(r)[0] == "GenericError" and error(r)[1].startswith(desc)
    assert not daemon.device.rounds                  # validation before any side effect
    await c.close()


async def test_a_round_kind_the_guest_did_not_negotiate_is_refused(daemon, guest):
    g, _ = guest
    c = await Raw.open(daemon.control_path)
    daemon.device.roles = {k: v for k, v in daemon.device.roles.items() if v != "bitmap"}
    assert error(await c.cmd("start-free-page-round", {"kind": "bitmap"}))[1] == \
        "the driver did not ack VIRTIO_BALLOON_F_FREE_PAGE_BITMAP"
    await c.close()


@pytest.mark.parametrize("args,desc", [
    ({"id": 99}, "no round 99"),
    ({"ranges": True, "max-ranges": 65537}, "Parameter 'max-ranges' expects an integer"),
    ({"ranges": True, "max-ranges": -1}, "Parameter 'max-ranges' expects an integer"),
    ({"ranges": True, "start-pfn": -1}, "Parameter 'start-pfn' expects a pfn"),
    ({"ranges": True, "start-pfn": 1 << 40}, "Parameter 'start-pfn' expects a pfn"),
])
async def test_query_round_refuses_bad_arguments(daemon, guest, args, desc):
    c = await Raw.open(daemon.control_path)
    await c.cmd("start-free-page-round")
    assert error(await c.cmd("query-free-page-round", args))[1].startswith(desc)
    await c.close()


async def test_query_round_before_any_round_is_a_generic_error(daemon):
    c = await Raw.open(daemon.control_path)
    assert error(await c.cmd("query-free-page-round")) == \
        ("GenericError", "no free page round has been started")
    await c.close()


# -- exports over the socket --------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../escape", "/tmp/escape", "a/../../escape", "link/x"])
async def test_export_refuses_names_outside_the_export_directory(daemon, guest, tmp_path, name):
    os.symlink(tmp_path, os.path.join(daemon.export_dir, "link"))
    c = await Raw.open(daemon.control_path)
    await c.cmd("start-free-page-round")
    r = await c.cmd("export-free-page-map", {"filename": name, "format": "ranges"})
    assert error(r)[0] == "GenericError"
    assert sorted(os.listdir(tmp_path)) == ["control.sock", "exports", "vb.sock"]
    await c.close()


async def test_export_without_an_export_directory_is_refused(tmp_path):
    d = Daemon(str(tmp_path / "vb.sock"), stats_interval=0,
               control_path=str(tmp_path / "control.sock"))
    await d.start()
    c = await Raw.open(d.control_path)
    assert error(await c.cmd("export-free-page-map", {"filename": "m", "format": "json"})) == \
        ("GenericError", "the daemon has no export directory (start it with --export-dir DIR)")
    await c.close()
    await d.close()


# -- the balloon ----------------------------------------------------------------------------------

async def test_balloon_moves_the_guest_and_query_balloon_follows(daemon, guest):
    g, _ = guest
    async with AsyncClient(daemon.control_path) as c:
        assert (await c.query_balloon()).actual == 3 * GiB
        mark = c.event_serial
        await c.balloon(2 * GiB)
        await g.fe.wait_config_change()
        await g.balance()
        ev = await c.wait_event("BALLOON_CHANGE", after=mark, timeout=30)
        assert ev.data == {"actual": 2 * GiB}
        assert (await c.query_balloon()).actual == 2 * GiB
        stats = await c.guest_stats()
        assert isinstance(stats.stats, dict) and stats.last_update >= 0
        with pytest.raises(QMPCommandError, match="expects a size"):
            await c.balloon(0)


# -- the CLI ----------------------------------------------------------------------------------

async def _ctl(daemon: Daemon, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = await asyncio.to_thread(ctl.main, ["ctl", "--control-socket", daemon.control_path,
                                            *argv], out, err)
    return rc, out.getvalue(), err.getvalue()


async def test_ctl_every_command(daemon, guest, tmp_path):
    g, model = guest
    rc, out, _ = await _ctl(daemon, "query-balloon")
    assert rc == 0 and out == f"actual: 3.00 GiB ({3 * GiB} bytes)\n"
    (rc, out, err), _ = await asyncio.gather(_ctl(daemon, "round", "start", "--wait"),
                                             g.answer_bitmap_request(model))
    assert rc == 0 and "round 1 (bitmap): done, complete" in out and "coverage 100.0" in err
    rc, out, _ = await _ctl(daemon, "--json", "round", "query", "1", "--ranges",
                            "--max-ranges", "3")
    info = json.loads(out)
    assert rc == 0 and len(info["ranges"]) == 3 and info["next-pfn"] is not None
    rc, out, _ = await _ctl(daemon, "round", "query", "--ranges", "--max-ranges", "2")
    assert rc == 0 and "start pfn" in out and "more from pfn" in out
    rc, out, _ = await _ctl(daemon, "export", "latest", "m.json", "--format", "json")
    assert rc == 0 and read_export(os.path.join(daemon.export_dir, "m.json")).round_id == 1
    png = tmp_path / "map.png"
    rc, out, _ = await _ctl(daemon, "map", "--png", str(png), "1", "--width", "256")
    assert rc == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(daemon.export_dir) == ["m.json"]      # the map's export was removed
    rc, out, _ = await _ctl(daemon, "balloon", "2G")
    assert rc == 0 and out.startswith("asked for a guest of 2.00 GiB")
    rc, out, _ = await _ctl(daemon, "stats")
    assert rc == 0
    rc, out, _ = await _ctl(daemon, "commands")
    assert rc == 0 and "start-free-page-round" in out.split()
    rc, out, _ = await _ctl(daemon, "version")
    assert rc == 0 and out.startswith("vballoon ")


async def test_ctl_reports_failures_on_stderr_with_status_1(daemon, tmp_path):
    rc, out, err = await _ctl(daemon, "query-balloon")
    assert (rc, out) == (1, "") and err == \
        "vballoon ctl: query-balloon: DeviceNotActive: No balloon device has been activated\n"
    out, err = io.StringIO(), io.StringIO()
    rc = await asyncio.to_thread(ctl.main, ["ctl", "--control-socket", str(tmp_path / "none"),
                                            "version"], out, err)
    assert rc == 1 and "cannot connect to" in err.getvalue() \
        and "is the daemon running" in err.getvalue()


def test_ctl_events_prints_each_event_once_in_order():
    from vballoon.control.client import Event

    class Session:                                   # the two calls `ctl events` makes
        event_serial = 0
        queue = [Event("BALLOON_CHANGE", {"actual": 1}, 1.5, 1),
                 Event("FREE_PAGE_ROUND_COMPLETED", {"id": 2}, 2.5, 2)]

        def wait_event(self, name=None, *, after=None, match=None, timeout=None):
            return next(e for e in self.queue if e.serial > after)

    out = io.StringIO()
    args = ctl.parser().parse_args(["ctl", "--control-socket", "unused", "--json", "events",
                                    "--count", "2"])
    assert ctl._run(Session(), args, out, io.StringIO()) is None
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [x["event"] for x in lines] == ["BALLOON_CHANGE", "FREE_PAGE_ROUND_COMPLETED"]
    assert lines[0] == {"event": "BALLOON_CHANGE", "data": {"actual": 1}, "timestamp": 1.5}


async def test_item15_hostile_ids_and_file_names_get_clean_errors(daemon, guest):
    g, model = guest
    c = await Raw.open(daemon.control_path)
    await c.send(b'{"execute": "query-balloon", "id": 1e400}')
    assert (await c.reply())["error"]["desc"] == "JSON parse error, number 1e400 is out of range"
    r = await c.cmd("start-free-page-round")
    await g.answer_bitmap_request(model)
    await c.send(b'{"execute": "export-free-page-map", "arguments": {"filename": "m\\ud800", '
                 b'"format": "ranges"}}')
    desc = (await c.reply())["error"]["desc"]
    assert "lone surrogate" in desc and "internal error" not in desc
    assert (await c.cmd("query-free-page-round", {"id": r["return"]["id"]}))["return"]["state"] \
        == "done"
    await c.close()


async def test_item3_an_evicted_round_is_a_clean_error_and_later_rounds_work(daemon, guest):
    g, model = guest
    c = await Raw.open(daemon.control_path)
    first = (await c.cmd("start-free-page-round", {"kind": "bitmap"}))["return"]["id"]
    for _ in range(4):
        assert "return" in await c.cmd("start-free-page-round", {"kind": "hint"})
    err = (await c.cmd("query-free-page-round", {"id": first}))["error"]
    assert err == {"class": "GenericError", "desc": err["desc"]}
    assert err["desc"].startswith(f"no round {first} ")
    nxt = (await c.cmd("start-free-page-round", {"kind": "bitmap"}))["return"]["id"]
    await g.answer_bitmap_request(model)        # the buffer carried the first round's id
    await g.answer_bitmap_request(model)        # reposted: it carries nxt's
    assert (await c.cmd("query-free-page-round", {"id": nxt}))["return"]["state"] == "done"
    ended = [e["data"]["id"] for e in c.events if e["event"] == "FREE_PAGE_ROUND_COMPLETED"]
    assert ended.count(first) == 1
    await c.close()


async def test_item3_and_item14_across_reconnects_with_a_new_layout(no_fd_leak, daemon):
    from vbtest import GiB, attached_guest
    c = await Raw.open(daemon.control_path)
    async with attached_guest(daemon, 1 * GiB, seed=3) as (g, model):
        daemon.device.bitmap.idle_timeout = 0.05
        first = (await c.cmd("start-free-page-round", {"kind": "bitmap"}))["return"]["id"]
        for _ in range(4):
            await c.cmd("start-free-page-round", {"kind": "hint"})
        assert "error" in await c.cmd("query-free-page-round", {"id": first})
        for _ in range(300):                     # the evicted round times out
            if any(e["data"]["id"] == first for e in c.events):
                break
            await c.cmd("query-version")
            await asyncio.sleep(0.01)
    for size in (2 * GiB, 1 * GiB):              # reconnects, each with another layout
        async with attached_guest(daemon, size, seed=4) as (g, model):
            r = (await c.cmd("start-free-page-round", {"kind": "bitmap"}))["return"]["id"]
            await g.answer_bitmap_request(model)
            q = (await c.cmd("query-free-page-round", {"id": r}))["return"]
            assert q["state"] == "done" and q["free-pages"] == model.free_pages()
    await c.cmd("query-version")
    ended = [e["data"]["id"] for e in c.events if e["event"] == "FREE_PAGE_ROUND_COMPLETED"]
    assert len(ended) == len(set(ended)) and first in ended
    await c.close()


async def test_ctl_map_into_a_missing_directory_is_a_clean_error(daemon, guest, tmp_path):
    g, model = guest
    await asyncio.gather(_ctl(daemon, "round", "start", "--wait"), g.answer_bitmap_request(model))
    rc, out, err = await _ctl(daemon, "map", "--png", str(tmp_path / "missing" / "x.png"))
    assert rc == 1 and "does not exist" in err and "Traceback" not in err


async def test_balloon_above_the_guests_ram_empties_the_balloon(daemon, guest, caplog):
    caplog.set_level("INFO")
    rc, out, err = await _ctl(daemon, "balloon", "99T")
    assert rc == 0, err
    assert daemon.device.num_pages == 0
    assert "above the guest's RAM" in caplog.text and "balloon is emptied" in caplog.text
