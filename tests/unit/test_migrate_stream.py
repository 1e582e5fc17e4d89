"""The migration stream (vballoon/migrate/stream.py): frames round-trip; a hostile peer gets a
clear StreamError, never a crash, an allocation it chose, or a write outside RAM."""
from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings, strategies as st

from vballoon.migrate import stream as S

PS = 4096
NPAGES = 1000


def dec() -> S.FrameDecoder:
    return S.FrameDecoder(page_size=PS, npages=NPAGES)


def frames(data: bytes, d: S.FrameDecoder | None = None) -> list[S.Frame]:
    return list((d or dec()).feed(data))


def test_round_trip_byte_by_byte():
    data = (S.encode_control({"type": "hello", "x": [1, 2]})
            + S.encode_pages_header(10, 2, PS) + b"\x01" * PS + b"\x02" * PS
            + S.encode_zero(998, 2))
    d = dec()
    got = []
    for i in range(len(data)):
        got.extend(d.feed(data[i:i + 1]))
    assert [type(f) for f in got] == [S.Control, S.Pages, S.Zero]
    assert got[0].msg == {"type": "hello", "x": [1, 2]}
    assert (got[1].first, got[1].count, bytes(got[1].data)) == (10, 2, b"\x01" * PS + b"\x02" * PS)
    assert (got[2].first, got[2].count) == (998, 2)


def test_need_reports_the_missing_bytes():
    d = dec()
    assert d.need() == S.HEADER.size
    head = S.encode_pages_header(0, 1, PS)
    assert list(d.feed(head)) == []
    assert d.need() == PS


@pytest.mark.parametrize("first,count", [(1000, 1), (999, 2), (900, 200), (2**63, 1)])
def test_pages_outside_ram_are_refused(first, count):
    body = S.PAGES_HEAD.pack(first, min(count, S.MAX_BATCH), 0) + b"\0" * (min(count, S.MAX_BATCH) * PS)
    with pytest.raises(S.StreamError, match="outside RAM|at most"):
        frames(S.HEADER.pack(S.PAGES, 0, len(body)) + body)


@pytest.mark.parametrize("first,count", [(1000, 1), (999, 2), (0, 0), (0, 2**64 - 1), (2**64 - 1, 2)])
def test_zero_outside_ram_is_refused(first, count):
    with pytest.raises(S.StreamError, match="outside RAM"):
        frames(S.encode_zero(first, count))


def test_huge_length_is_refused_before_buffering():
    d = dec()
    with pytest.raises(S.StreamError, match="at most"):
        list(d.feed(S.HEADER.pack(S.PAGES, 0, 0xFFFFFFFF)))
    with pytest.raises(S.StreamError, match="at most"):
        frames(S.HEADER.pack(S.CONTROL, 0, S.MAX_CONTROL + 1))


def test_pages_length_must_match_count():
    body = S.PAGES_HEAD.pack(0, 2, 0) + b"\0" * PS
    with pytest.raises(S.StreamError, match="2 pages need"):
        frames(S.HEADER.pack(S.PAGES, 0, len(body)) + body)
    with pytest.raises(S.StreamError, match="shorter than its header"):
        frames(S.HEADER.pack(S.PAGES, 0, 4) + b"\0" * 4)
    body = S.PAGES_HEAD.pack(0, 1, 7) + b"\0" * PS
    with pytest.raises(S.StreamError, match="reserved"):
        frames(S.HEADER.pack(S.PAGES, 0, len(body)) + body)


def test_too_many_pages_in_one_frame():
    n = S.MAX_BATCH + 1
    with pytest.raises(S.StreamError, match="at most"):
        frames(S.HEADER.pack(S.PAGES, 0, S.PAGES_HEAD.size + n * PS))


def test_unknown_type_and_flags():
    with pytest.raises(S.StreamError, match="unknown frame type 9"):
        frames(S.HEADER.pack(9, 0, 0))
    with pytest.raises(S.StreamError, match="flags"):
        frames(S.HEADER.pack(S.CONTROL, 1, 2) + b"{}")


def test_page_frames_before_the_layout_is_agreed():
    with pytest.raises(S.StreamError, match="before the RAM layout"):
        frames(S.encode_zero(0, 1), S.FrameDecoder(page_size=PS))


@pytest.mark.parametrize("body,match", [
    (b"\xff\xfe", "not UTF-8"),
    (b"{", "not JSON"),
    (b"[1]", "not a JSON object"),
    (b'{"x": 1}', "string member 'type'"),
    (b'{"type": 1}', "string member 'type'"),
    (b'{"type": "a", "type": "b"}', "duplicate key"),
    (b'{"type": "a", "v": NaN}', "not JSON"),
    (b"[" * 100000 + b"]" * 100000, "not JSON|nests too deeply|at most"),
])
def test_bad_control_messages(body, match):
    body = body[:S.MAX_CONTROL]
    with pytest.raises(S.StreamError, match=match):
        frames(S.HEADER.pack(S.CONTROL, 0, len(body)) + body)


def test_hello_checks_layout():
    S.check_hello(S.hello(page_size=PS, ram_bytes=NPAGES * PS), page_size=PS, ram_bytes=NPAGES * PS)
    with pytest.raises(S.StreamError, match="RAM layout differs: ram-bytes"):
        S.check_hello(S.hello(page_size=PS, ram_bytes=2 * PS), page_size=PS, ram_bytes=NPAGES * PS)
    with pytest.raises(S.StreamError, match="page-size"):
        S.check_hello(S.hello(page_size=2 << 20, ram_bytes=PS), page_size=PS, ram_bytes=PS)
    with pytest.raises(S.StreamError, match="version"):
        S.check_hello({**S.hello(page_size=PS, ram_bytes=PS), "version": 99}, page_size=PS, ram_bytes=PS)
    with pytest.raises(S.StreamError, match="not a vballoon migration"):
        S.check_hello({"type": "hello"}, page_size=PS, ram_bytes=PS)
    with pytest.raises(S.StreamError, match="not an integer"):
        S.check_hello({**S.hello(page_size=PS, ram_bytes=PS), "ram-bytes": True}, page_size=PS,
                      ram_bytes=PS)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(1, 64))
def test_arbitrary_bytes_never_crash(data, step):
    """Any byte string: frames within bounds, or StreamError; nothing else escapes."""
    d = dec()
    try:
        for i in range(0, len(data), step):
            for f in d.feed(data[i:i + step]):
                if isinstance(f, (S.Pages, S.Zero)):
                    assert 0 < f.count and f.first + f.count <= NPAGES
    except S.StreamError:
        pass


async def test_channel_recv_reports_eof_and_peer_error():
    r = asyncio.StreamReader()
    r.feed_data(S.encode_control({"type": "error", "message": "boom"}))
    r.feed_eof()

    class W:
        def write(self, b): pass
        async def drain(self): pass
        def close(self): pass
        async def wait_closed(self): pass
    ch = S.Channel(r, W())  # type: ignore[arg-type]
    with pytest.raises(S.StreamError, match="peer failed: boom"):
        await ch.recv_control("hello")
    with pytest.raises(S.StreamError, match="closed the migration stream"):
        await ch.recv()


async def test_channel_idle_peer_times_out():
    r = asyncio.StreamReader()
    r.feed_data(S.encode_control({"type": "x"})[:5])  # half a header, then silence

    class W:
        def close(self): pass
        async def wait_closed(self): pass
    ch = S.Channel(r, W(), idle_timeout=0.2)  # type: ignore[arg-type]
    with pytest.raises(S.StreamError, match="sent nothing for"):
        await ch.recv()
