"""The engine without a real QEMU: page selection (runs, holes, zero pages), and the
destination facing a hostile or mismatched source, with a fake QEMU monitor.  Every error is
a clear exception naming the problem; the destination QEMU is told to quit; nothing is written
outside the RAM file's pages."""
from __future__ import annotations

import asyncio
import json
import os
import struct

import numpy as np
import pytest

from vballoon.migrate import cli as mcli
from vballoon.migrate import stream as S
from vballoon.migrate.engine import (DestOptions, MigrationError, PassStats, Sender, SourceOptions,
                                     data_mask, migrate_destination, migrate_source, runs)
from vballoon.migrate.qemu import QEMUError

PS = 4096


def test_runs_split_at_gaps_and_limit():
    assert runs(np.array([], dtype=np.int64), 4) == []
    assert runs(np.array([1, 2, 3, 7, 8, 20]), 2) == [(1, 2), (3, 1), (7, 2), (20, 1)]


def test_data_mask_follows_holes(tmp_path):
    f = tmp_path / "ram"
    with open(f, "wb") as fh:
        fh.truncate(64 * PS)
        fh.seek(5 * PS)
        fh.write(b"x")
        fh.seek(40 * PS + 100)
        fh.write(b"y" * PS)  # spans pages 40 and 41
    fd = os.open(f, os.O_RDONLY)
    try:
        m = data_mask(fd, 64)
    finally:
        os.close(fd)
    assert m[5] and m[40] and m[41]
    assert m.sum() <= 8  # tmpfs/ext4 report data extents at page granularity, not more
    assert not m[0] and not m[63]


class FakeChan:
    def __init__(self) -> None:
        self.data = bytearray()
        self.bytes_sent = 0

    async def send(self, *parts) -> None:
        for p in parts:
            self.data += bytes(p)
            self.bytes_sent += len(p)


async def test_sender_skips_zero_pages_never_sent_and_zeroes_pages_sent_before(tmp_path):
    f = tmp_path / "ram"
    f.write_bytes(bytes(16 * PS))
    fd = os.open(f, os.O_RDWR)
    try:
        os.pwrite(fd, b"a" * PS, 3 * PS)
        ch = FakeChan()
        snd = Sender(ch, fd, 16)  # type: ignore[arg-type]
        st = PassStats("t")
        await snd.send(np.arange(16), st)
        assert (st.data_pages, st.zero_skipped, st.zero_pages) == (1, 15, 0)
        os.pwrite(fd, bytes(PS), 3 * PS)  # page 3 is zero again: the destination must know
        st2 = PassStats("t2")
        await snd.send(np.array([2, 3]), st2)
        assert (st2.data_pages, st2.zero_skipped, st2.zero_pages) == (0, 1, 1)
        frames = list(S.FrameDecoder(page_size=PS, npages=16).feed(bytes(ch.data)))
        assert [(type(x).__name__, x.first, x.count) for x in frames] == [("Pages", 3, 1), ("Zero", 3, 1)]
        assert bytes(frames[0].data) == b"a" * PS
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- fake QEMU


class FakeQemu:
    """Enough of QEMU's monitor for the destination's checks."""

    def __init__(self, path: str, ram_path: str, ram_bytes: int, status: str = "inmigrate") -> None:
        self.path, self.ram_path, self.ram_bytes, self.status = path, ram_path, ram_bytes, status
        self.commands: list[str] = []

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, self.path)

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b'{"QMP": {"version": {}, "capabilities": []}}\n')
        while line := await r.readline():
            msg = json.loads(line)
            cmd, args = msg["execute"], msg.get("arguments", {})
            self.commands.append(cmd)
            ret: object = {}
            if cmd == "query-status":
                ret = {"status": self.status, "running": self.status == "running"}
            elif cmd == "query-memdev":
                ret = [{"id": "mem", "size": self.ram_bytes, "share": True}]
            elif cmd == "qom-get":
                ret = {"type": "memory-backend-file", "mem-path": self.ram_path}[args["property"]]
            w.write(json.dumps({"return": ret, "id": msg.get("id")}).encode() + b"\n")
            await w.drain()
        w.close()

    async def close(self) -> None:
        self.server.close()


@pytest.fixture
async def dest(tmp_path):
    ram = tmp_path / "ram"
    ram.write_bytes(b"\x55" * (64 * PS))
    q = FakeQemu(str(tmp_path / "q.sock"), str(ram), 64 * PS)
    await q.start()
    listen = str(tmp_path / "stream.sock")
    ready = asyncio.Event()
    task = asyncio.create_task(migrate_destination(DestOptions(
        qmp=q.path, listen=listen, qemu_uri="unix:/nonexistent", ready=ready.set)))
    await asyncio.wait_for(ready.wait(), 5)
    yield q, listen, task, ram
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await q.close()


DEVICE = {"id": "vb0", "driver": "vhost-user-test-device-pci", "bus": "rp0", "chardev": "vbc",
          "props": {"virtio-id": 5, "num_vqs": 6, "vq_size": 64, "config_size": 16}}


async def _hostile(listen: str, payload: bytes, *, hello: dict | None = None) -> bytes:
    r, w = await asyncio.open_unix_connection(listen)
    w.write(S.encode_control(hello or S.hello(page_size=PS, ram_bytes=64 * PS, device=DEVICE)))
    w.write(payload)
    await w.drain()
    w.write_eof()
    try:
        data = await asyncio.wait_for(r.read(), 10)
    finally:
        w.close()
    return data


@pytest.mark.parametrize("payload,match", [
    (S.HEADER.pack(S.PAGES, 0, S.PAGES_HEAD.size + PS) + S.PAGES_HEAD.pack(64, 1, 0) + b"x" * PS,
     "outside RAM"),
    (S.encode_zero(60, 5), "outside RAM"),
    (S.HEADER.pack(S.PAGES, 0, 0xFFFFFFF0), "at most"),
    (b"\xff" * 8, "unknown frame type"),
    (S.encode_control({"type": "rm -rf"}), "unexpected control message"),
    (S.encode_control({"type": "complete"})[:-3], "closed the migration stream"),
])
async def test_destination_refuses_a_hostile_source(dest, payload, match):
    q, listen, task, ram = dest
    await _hostile(listen, payload)
    with pytest.raises(S.StreamError, match=match):
        await asyncio.wait_for(task, 10)
    assert "quit" in q.commands  # torn down
    assert os.path.getsize(ram) == 64 * PS  # nothing written past the RAM


async def test_destination_refuses_another_ram_layout(dest):
    q, listen, task, ram = dest
    answer = await _hostile(listen, b"", hello=S.hello(page_size=PS, ram_bytes=128 * PS, device=DEVICE))
    frames = list(S.FrameDecoder().feed(answer))
    assert frames and frames[0].msg["type"] == "error"
    assert "RAM layout differs: ram-bytes is 524288 there, 262144 here" in frames[0].msg["message"]
    with pytest.raises(S.StreamError, match="RAM layout differs"):
        await asyncio.wait_for(task, 10)
    assert "quit" in q.commands
    assert ram.read_bytes() == b"\x55" * (64 * PS)  # untouched: refused before anything


async def test_destination_refuses_a_bad_device(dest):
    q, listen, task, _ = dest
    bad = {**DEVICE, "driver": "virtio-net-pci"}
    await _hostile(listen, b"", hello=S.hello(page_size=PS, ram_bytes=64 * PS, device=bad))
    with pytest.raises(S.StreamError, match="not a vhost-user balloon"):
        await asyncio.wait_for(task, 10)


async def test_destination_writes_pages_and_zeroes_the_rest(dest):
    q, listen, task, ram = dest
    r, w = await asyncio.open_unix_connection(listen)
    w.write(S.encode_control(S.hello(page_size=PS, ram_bytes=64 * PS, device=DEVICE)))
    w.write(S.encode_pages_header(2, 1, PS) + b"\x07" * PS)
    w.write(S.encode_control({"type": "final"}))
    await w.drain()
    ch = S.Channel(r, w)
    assert (await ch.recv_control("hello"))["ram-bytes"] == 64 * PS
    assert (await ch.recv_control("synced"))["pages"] == 1
    data = ram.read_bytes()
    assert data[2 * PS:3 * PS] == b"\x07" * PS
    assert data[:2 * PS] == bytes(2 * PS) and data[3 * PS:] == bytes(61 * PS)  # punched to zero
    w.close()
    with pytest.raises(S.StreamError):
        await asyncio.wait_for(task, 10)


async def test_destination_refuses_pages_after_the_guest_resumed(tmp_path):
    """Once the guest runs on the destination, page data would overwrite its live memory."""
    ram = tmp_path / "ram"
    ram.write_bytes(bytes(8 * PS))
    q = FakeQemu(str(tmp_path / "q.sock"), str(ram), 8 * PS)

    async def wait_migration(*a, **k):
        return {"status": "completed"}
    await q.start()
    listen = str(tmp_path / "s.sock")
    ready = asyncio.Event()
    import vballoon.migrate.qemu as Q
    orig = Q.QMP.wait_migration
    Q.QMP.wait_migration = wait_migration  # the fake QEMU has no migration to complete
    try:
        task = asyncio.create_task(migrate_destination(DestOptions(
            qmp=q.path, listen=listen, qemu_uri="unix:/x", ready=ready.set)))
        await asyncio.wait_for(ready.wait(), 5)
        r, w = await asyncio.open_unix_connection(listen)
        ch = S.Channel(r, w)
        await ch.send_control(S.hello(page_size=PS, ram_bytes=8 * PS, device=DEVICE))
        await ch.recv_control("hello")
        await ch.send_control({"type": "complete"})
        await ch.recv_control("resumed")
        await ch.send(S.encode_pages_header(0, 1, PS), b"\x01" * PS)
        with pytest.raises(S.StreamError, match="after the guest resumed"):
            await asyncio.wait_for(task, 10)
        assert ram.read_bytes() == bytes(8 * PS)
        assert "cont" in q.commands and "quit" not in q.commands  # the guest keeps running
        await ch.close()
    finally:
        Q.QMP.wait_migration = orig
        await q.close()


async def test_destination_refuses_a_running_qemu(tmp_path):
    ram = tmp_path / "ram"
    ram.write_bytes(bytes(PS))
    q = FakeQemu(str(tmp_path / "q.sock"), str(ram), PS, status="running")
    await q.start()
    try:
        with pytest.raises(MigrationError, match="-incoming defer -S"):
            await migrate_destination(DestOptions(qmp=q.path, listen=str(tmp_path / "s.sock"),
                                                  qemu_uri="unix:/x"))
    finally:
        await q.close()


async def test_source_refuses_a_guest_that_is_not_running(tmp_path):
    q = FakeQemu(str(tmp_path / "q.sock"), "/dev/null", PS, status="paused")
    await q.start()
    try:
        with pytest.raises(MigrationError, match="source guest is 'paused', not running"):
            await migrate_source(SourceOptions(qmp=q.path, dest=str(tmp_path / "nobody")))
    finally:
        await q.close()


async def test_source_without_qemu_is_a_clear_error(tmp_path):
    with pytest.raises(QEMUError, match="cannot connect to QEMU's QMP socket"):
        await migrate_source(SourceOptions(qmp=str(tmp_path / "none"), dest="127.0.0.1:1"))


@pytest.mark.parametrize("argv,code,msg", [
    (["migrate", "--qmp", "q"], 2, "exactly one of --to"),
    (["migrate", "--qmp", "q", "--to", "x", "--incoming", "y"], 2, "exactly one of --to"),
    (["migrate", "--qmp", "q", "--incoming", "y"], 2, "needs --qemu-uri"),
    (["migrate", "--qmp", "/nonexistent/q", "--to", "127.0.0.1:1"], 1, "cannot connect to QEMU"),
    (["migrate", "--qmp", "q", "--to", "x", "--max-bandwidth", "fast"], 2, "bad-size"),
])
def test_cli_errors(argv, code, msg, capsys):
    from vballoon.app.cli import main
    assert main(argv) == code
    assert msg in capsys.readouterr().err


_ = (struct, mcli)
