"""Fuzz: the QMP server core and the control commands, with the balloon's service on a
socket-less device.  Streams of well-formed commands with hostile arguments, raw JSON with
numbers and escapes no parser likes, garbage bytes and arbitrary splits.

Invariants: nothing raises; every reply is ``{"return"}`` or ``{"error": {class, desc}}`` with a
known class and never an "internal error"; input held stays bounded; the session still answers
a plain command at the end.
"""
from __future__ import annotations

import asyncio
import json

from balloonrig import Rig
from fuzzing import budget
from hypothesis import event, given, strategies as st

from vballoon.app.service import BalloonService
from vballoon.control import qmp
from vballoon.control.server import COMMANDS, ControlServer, version_info

NAMES = [c.name for c in COMMANDS] + ["qmp_capabilities", "nope"]
ARGS = ["value", "kind", "wait", "timeout", "id", "ranges", "max-ranges", "start-pfn",
        "filename", "format", "enable", "extra"]
RAW_VALUES = [b"1e400", b"-1e400", b"1" + b"0" * 30, b"-9223372036854775809", b"0.5", b"null",
              b'"\\ud800"', b'"\\udfff x"', b'"../x"', b'"/abs"', b'"a/b"', b'"m.vbmap"',
              b'"bitmap"', b'"hint"', b'"json"', b'"ranges"', b"true", b"[]", b"{}", b"NaN",
              b'"\\u0000"', b"0", b"1", b"65536", b"65537", b"-1", b"1e-400", b"4294967296"]

json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=8)


big_int = st.one_of(st.integers(-5, 70000), st.integers(-(1 << 63), (1 << 63) - 1),
                    st.sampled_from([0x80000000, 1, 2, 1 << 36, 16 << 20]))
FILENAMES = ["m", "a/b", "../x", "/abs", ".", "m\ud800", "\udfff", "x" * 300, "", "ok.vbmap",
             "sub/", "m\u0000"]
TYPED = {
    "balloon": {"value": big_int},
    "start-free-page-round": {"kind": st.sampled_from(["bitmap", "hint", "auto", "x"]),
                              "wait": st.booleans(),
                              "timeout": st.sampled_from([0.001, 0, -1, 1e300, 0.5])},
    "query-free-page-round": {"id": big_int, "ranges": st.booleans(), "max-ranges": big_int,
                              "start-pfn": big_int},
    "export-free-page-map": {"id": big_int, "filename": st.sampled_from(FILENAMES),
                             "format": st.sampled_from(["ranges", "bitmap", "json", "png"])},
}


@st.composite
def typed(draw):
    name = draw(st.sampled_from(sorted(TYPED)))
    args = {k: draw(v) for k, v in TYPED[name].items() if draw(st.booleans())}
    text = json.dumps(args)
    return json.dumps({"execute": name, "id": draw(st.integers(0, 99))})[:-1].encode() + \
        b', "arguments": ' + text.encode() + b"}"


@st.composite
def message(draw):
    kind = draw(st.sampled_from(["cmd", "typed", "typed", "typed", "raw", "garbage"]))
    if kind == "typed":
        return draw(typed())
    if kind == "garbage":
        return draw(st.binary(max_size=40))
    name = json.dumps(draw(st.sampled_from(NAMES))).encode()
    pairs = []
    for key in draw(st.lists(st.sampled_from(ARGS), max_size=4, unique=True)):
        if kind == "raw":
            v = draw(st.sampled_from(RAW_VALUES))
        else:
            v = json.dumps(draw(json_value)).encode()
        pairs.append(json.dumps(key).encode() + b": " + v)
    msg = b'{"execute": ' + name + b', "arguments": {' + b", ".join(pairs) + b"}"
    if draw(st.booleans()):
        msg += b', "id": ' + draw(st.sampled_from(RAW_VALUES + [b'"x"', b"7"]))
    return msg + b"}"


class FakeClient:
    def __init__(self) -> None:
        self.name = "fuzz"
        self.conn = qmp.ServerConnection(COMMANDS, version_info())
        self.out = bytearray()

    def flush(self) -> None:
        self.out += self.conn.data_to_send()


@budget()
@given(msgs=st.lists(message(), max_size=10), cuts=st.lists(st.integers(1, 64), max_size=8),
       round_first=st.booleans())
def test_fuzz_qmp_commands_never_crash_nor_answer_internal_error(tmp_path_factory, msgs, cuts,
                                                                 round_first):
    export_dir = str(tmp_path_factory.mktemp("exports"))

    async def main():
        with Rig() as rig:
            svc = BalloonService(rig.dev, export_dir=export_dir)
            rig.dev.on_change = svc.handle_event
            if round_first:
                rig.dev.start_round("bitmap")
            server = ControlServer("/nonexistent", svc)
            c = FakeClient()
            stream = b'{"execute": "qmp_capabilities"}' + b"".join(msgs) + \
                b'\x01{"execute": "query-balloon", "id": "last"}'
            at = 0
            for n in cuts + [len(stream)]:
                c.conn.receive_data(stream[at:at + n])
                at += n
                while isinstance(ev := c.conn.next_event(), qmp.Execute):
                    event(ev.command)
                    task = asyncio.ensure_future(server._run(c, ev))
                    await asyncio.sleep(0)
                    if not task.done():           # a wait: time passes, the round ends
                        rig.clock.now += 60
                        rig.dev.handle_timer(rig.clock.now)
                    await asyncio.wait_for(task, 5)
                assert c.conn.buffered <= 4 * qmp.MAX_MESSAGE_SIZE
                if at >= len(stream):
                    break
            c.flush()
            replies = [json.loads(line) for line in c.out.split(b"\r\n") if line]
            return replies

    replies = asyncio.run(main())
    assert "QMP" in replies[0]
    for r in replies[1:]:
        assert set(r) <= {"return", "error", "id"} and ("return" in r) != ("error" in r), r
        if "error" in r:
            assert r["error"]["class"] in ("GenericError", "CommandNotFound", "DeviceNotActive")
            assert "internal error" not in r["error"]["desc"], r
    assert replies[-1] == {"return": {"actual": 64 << 20}, "id": "last"}
