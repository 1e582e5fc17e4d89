"""The QMP server core (vballoon.qmp), without I/O: one named test per rule of qmp-spec and per
hostile-input rule, with QEMU's error classes and texts."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vballoon.control import qmp
from vballoon.control.server import COMMANDS, version_info
from vballoon.control.qmp import (CLOSED, COMMAND_NOT_FOUND, GENERIC_ERROR, NEED_DATA, PAUSED, Command,
                          Enum, Execute, Framer, ServerConnection)

SCHEMA = (
    Command("balloon", {"value": "int"}),
    Command("query-balloon"),
    Command("pick", {"kind": Enum("Kind", ("a", "b")), "*n": "number", "*on": "bool",
                     "*names": ["str"], "*label": "str"}),
)


def replies(conn: ServerConnection) -> list[dict]:
    data = conn.data_to_send()
    assert data.endswith(b"\r\n") or not data
    return [json.loads(line) for line in data.split(b"\r\n") if line]


def connect(negotiate: bool = True) -> ServerConnection:
    conn = ServerConnection(SCHEMA, version_info())
    replies(conn)                                   # the greeting
    if negotiate:
        conn.receive_data(b'{"execute": "qmp_capabilities"}')
        assert conn.next_event() is NEED_DATA
        assert replies(conn) == [{"return": {}}]
    return conn


def run(conn: ServerConnection, data: bytes) -> list[dict]:
    """Feed bytes; answer every command with its own name; return everything sent."""
    conn.receive_data(data)
    while isinstance(ev := conn.next_event(), Execute):
        conn.send_return({"ran": ev.command})
    return replies(conn)


def error(msg: dict) -> tuple[str, str]:
    return msg["error"]["class"], msg["error"]["desc"]


# -- greeting and negotiation (qmp-spec "Server Greeting", "Capabilities Negotiation") ----------

def test_greeting_comes_first_with_the_version_and_no_capabilities():
    conn = ServerConnection(COMMANDS, version_info())
    (greeting,) = replies(conn)
    assert greeting == {"QMP": {"version": version_info(), "capabilities": []}}
    assert set(greeting["QMP"]["version"]["qemu"]) == {"major", "minor", "micro"}


def test_commands_before_qmp_capabilities_are_command_not_found():
    conn = connect(negotiate=False)
    for name in ("query-balloon", "no-such-command"):
        (r,) = run(conn, json.dumps({"execute": name, "id": name}).encode())
        assert error(r) == (COMMAND_NOT_FOUND,
                            "Expecting capabilities negotiation with 'qmp_capabilities'")
        assert r["id"] == name
    assert not conn.negotiated


def test_qmp_capabilities_a_second_time_is_command_not_found():
    conn = connect()
    (r,) = run(conn, b'{"execute": "qmp_capabilities"}')
    assert error(r) == (COMMAND_NOT_FOUND,
                        "Capabilities negotiation is already complete, command ignored")


def test_qmp_capabilities_refuses_capabilities_it_did_not_offer():
    conn = connect(negotiate=False)
    (r,) = run(conn, b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}')
    assert error(r) == (GENERIC_ERROR, "Capability oob not available")
    (r,) = run(conn, b'{"execute": "qmp_capabilities", "arguments": {"enable": ["x"]}}')
    assert error(r) == (GENERIC_ERROR, "Parameter 'enable[0]' does not accept value 'x'")
    assert not conn.negotiated
    assert run(conn, b'{"execute": "qmp_capabilities", "arguments": {"enable": []}}') \
        == [{"return": {}}]


def test_malformed_input_before_negotiation_gets_its_own_error_not_command_not_found():
    conn = connect(negotiate=False)
    (r,) = run(conn, b"[]")
    assert error(r) == (GENERIC_ERROR, "QMP input must be a JSON object")


def test_events_are_not_sent_before_negotiation():
    conn = connect(negotiate=False)
    assert conn.send_event("BALLOON_CHANGE", {"actual": 1}, 1.5) is False
    assert replies(conn) == []
    run(conn, b'{"execute": "qmp_capabilities"}')
    assert conn.send_event("BALLOON_CHANGE", {"actual": 1}, 1.5) is True
    assert replies(conn) == [{"timestamp": {"seconds": 1, "microseconds": 500000},
                              "event": "BALLOON_CHANGE", "data": {"actual": 1}}]


def test_event_without_a_clock_has_timestamp_minus_one():
    conn = connect()
    conn.send_event("X", None, float("nan"))
    assert replies(conn) == [{"timestamp": {"seconds": -1, "microseconds": -1}, "event": "X"}]


# -- commands and responses (qmp-spec "Issuing Commands", "Commands Responses") -----------------

@pytest.mark.parametrize("id", [1, "abc", None, {"a": [1, 2]}, [3], 2.5, False])
def test_id_is_echoed_on_success_and_on_error(id):
    conn = connect()
    ok = {"execute": "query-balloon", "id": id}
    bad = {"execute": "balloon", "id": id}
    (r1, r2) = run(conn, json.dumps(ok).encode() + json.dumps(bad).encode())
    assert r1 == {"return": {"ran": "query-balloon"}, "id": id}
    assert r2["id"] == id and error(r2) == (GENERIC_ERROR, "Parameter 'value' is missing")


def test_no_id_no_id_in_the_response():
    conn = connect()
    assert run(conn, b'{"execute": "query-balloon"}') == [{"return": {"ran": "query-balloon"}}]


def test_a_command_without_a_result_returns_an_empty_object():
    conn = connect()
    conn.receive_data(b'{"execute": "query-balloon", "id": 7}')
    conn.next_event()
    conn.send_return(None)
    assert replies(conn) == [{"return": {}, "id": 7}]


def test_unknown_command_is_command_not_found():
    conn = connect()
    (r,) = run(conn, b'{"execute": "system_reset", "id": 3}')
    assert error(r) == (COMMAND_NOT_FOUND, "The command system_reset has not been found")
    assert r["id"] == 3


def test_execute_must_be_a_string():
    (r,) = run(connect(), b'{"execute": 42, "id": 1}')
    assert error(r) == (GENERIC_ERROR, "QMP input member 'execute' must be a string")
    assert r["id"] == 1


def test_missing_execute_is_refused():
    (r,) = run(connect(), b'{"arguments": {}, "id": 1}')
    assert error(r) == (GENERIC_ERROR, "QMP input lacks member 'execute'")


def test_arguments_must_be_an_object():
    (r,) = run(connect(), b'{"execute": "balloon", "arguments": [1]}')
    assert error(r) == (GENERIC_ERROR, "QMP input member 'arguments' must be an object")


@pytest.mark.parametrize("member", ["exec-oob", "argument", "Execute"])
def test_unexpected_members_are_refused(member):
    (r,) = run(connect(), json.dumps({"execute": "query-balloon", member: 1}).encode())
    assert error(r) == (GENERIC_ERROR, f"QMP input member '{member}' is unexpected")


@pytest.mark.parametrize("text", [b"[]", b"42", b'"execute"', b"true", b"null", b"[{}]"])
def test_input_that_is_not_an_object_is_refused(text):
    (r,) = run(connect(), text + b"\n")       # a bare token ends at the next delimiter
    assert r == {"error": {"class": GENERIC_ERROR, "desc": "QMP input must be a JSON object"}}


@pytest.mark.parametrize("text,desc", [
    (b'{"execute": }', "JSON parse error, expecting value"),
    (b'{"execute" "x"}', "JSON parse error, expecting ':' delimiter"),
    (b"{'execute': 'x'}", "JSON parse error, expecting property name enclosed in double quotes"),
    (b"}", "JSON parse error, expecting value"),
    (b"nul\n", "JSON parse error, expecting value"),
])
def test_malformed_json_is_a_generic_error_without_id(text, desc):
    (r,) = run(connect(), text)
    assert r == {"error": {"class": GENERIC_ERROR, "desc": desc}}


def test_duplicate_keys_are_refused():
    # Otherwise {"value": 1, "value": 2} would mean whichever key the parser kept.
    (r,) = run(connect(), b'{"execute": "balloon", "arguments": {"value": 1, "value": 2}}')
    assert error(r) == (GENERIC_ERROR, "JSON parse error, duplicate key")


@pytest.mark.parametrize("word", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json(word):
    (r,) = run(connect(), b'{"execute": "pick", "arguments": {"kind": "a", "n": %s}}'
               % word.encode())
    assert error(r) == (GENERIC_ERROR, f"JSON parse error, invalid keyword '{word}'")


def test_invalid_utf8_is_refused():
    (r,) = run(connect(), b'{"execute": "pick", "arguments": {"label": "\xc3\x28"}}')
    assert error(r) == (GENERIC_ERROR, "JSON parse error, invalid UTF-8 sequence")


def test_non_ascii_input_is_accepted_and_output_is_ascii():
    conn = connect()
    conn.receive_data('{"execute": "pick", "arguments": {"kind": "a", "label": "é"}}'.encode())
    ev = conn.next_event()
    assert ev.arguments["label"] == "é"
    conn.send_return({"label": "é"})
    data = conn.data_to_send()
    assert data == b'{"return": {"label": "\\u00e9"}}\r\n'


# -- arguments (qmp-spec "Compatibility Considerations"; QEMU's input visitor) -------------------

def test_missing_argument():
    (r,) = run(connect(), b'{"execute": "balloon"}')
    assert error(r) == (GENERIC_ERROR, "Parameter 'value' is missing")


def test_unknown_argument():
    (r,) = run(connect(), b'{"execute": "balloon", "arguments": {"value": 1, "target": 2}}')
    assert error(r) == (GENERIC_ERROR, "Parameter 'target' is unexpected")


def test_a_missing_argument_is_reported_before_an_unknown_one():
    (r,) = run(connect(), b'{"execute": "balloon", "arguments": {"valeu": 1}}')
    assert error(r) == (GENERIC_ERROR, "Parameter 'value' is missing")


@pytest.mark.parametrize("value", ['"1"', "1.0", "1.5", "true", "null", "[1]", "{}",
                                   str(1 << 63), str(-(1 << 63) - 1)])
def test_integer_arguments_refuse_everything_else(value):
    (r,) = run(connect(), b'{"execute": "balloon", "arguments": {"value": %s}}' % value.encode())
    assert error(r) == (GENERIC_ERROR, "Invalid parameter type for 'value', expected: integer")


@pytest.mark.parametrize("value", [str((1 << 63) - 1), str(-(1 << 63)), "0"])
def test_integer_arguments_take_the_int64_range(value):
    conn = connect()
    conn.receive_data(b'{"execute": "balloon", "arguments": {"value": %s}}' % value.encode())
    assert conn.next_event().arguments == {"value": int(value)}


@pytest.mark.parametrize("args,desc", [
    ({"kind": 1}, "Invalid parameter type for 'kind', expected: string"),
    ({"kind": "c"}, "Parameter 'kind' does not accept value 'c'"),
    ({"kind": "a", "n": "1"}, "Invalid parameter type for 'n', expected: number"),
    ({"kind": "a", "n": True}, "Invalid parameter type for 'n', expected: number"),
    ({"kind": "a", "on": 1}, "Invalid parameter type for 'on', expected: boolean"),
    ({"kind": "a", "label": 5}, "Invalid parameter type for 'label', expected: string"),
    ({"kind": "a", "names": "x"}, "Invalid parameter type for 'names', expected: array"),
    ({"kind": "a", "names": ["x", 2]}, "Invalid parameter type for 'names[1]', expected: string"),
])
def test_wrongly_typed_arguments(args, desc):
    (r,) = run(connect(), json.dumps({"execute": "pick", "arguments": args}).encode())
    assert error(r) == (GENERIC_ERROR, desc)


def test_well_typed_arguments_reach_the_command_unchanged():
    conn = connect()
    args = {"kind": "b", "n": 2.5, "on": False, "names": ["x"], "label": ""}
    conn.receive_data(json.dumps({"execute": "pick", "arguments": args, "id": 9}).encode())
    assert conn.next_event() == Execute("pick", args, 9)


# -- one command at a time (qmp-spec "Out-of-band execution") ---------------------------------

def test_commands_run_one_at_a_time_and_responses_keep_their_order():
    conn = connect()
    conn.receive_data(b'{"execute": "query-balloon", "id": 1}'
                      b'{"execute": "nope", "id": 2}'
                      b'{"execute": "query-balloon", "id": 3}')
    first = conn.next_event()
    assert first.id == 1
    assert conn.next_event() is PAUSED and conn.pending is first
    assert replies(conn) == []              # 2's error waits for 1's answer
    conn.send_error(GENERIC_ERROR, "slow")
    third = conn.next_event()
    assert third.id == 3
    conn.send_return(3)
    assert [r["id"] for r in replies(conn)] == [1, 2, 3]


def test_answering_with_no_command_pending_is_a_bug():
    with pytest.raises(RuntimeError):
        connect().send_return({})


def test_end_of_file_closes_after_the_complete_commands():
    conn = connect()
    conn.receive_data(b'{"execute": "query-balloon", "id": 1} {"execute": "query-ball')
    conn.receive_data(b"")
    ev = conn.next_event()
    assert ev.id == 1
    conn.send_return(None)
    assert conn.next_event() is CLOSED        # the partial command is dropped
    conn.receive_data(b'oon"}')
    assert conn.next_event() is CLOSED


# -- framing and limits (QEMU's json-streamer; qmp-spec "Forcing the JSON parser ...") ---------

def test_commands_need_no_newline_and_may_span_reads():
    conn = connect()
    out = []
    for byte in b'{"execute":\n"query-balloon"}{"execute": "query-balloon"}':
        out += run(conn, bytes([byte]))
    assert out == [{"return": {"ran": "query-balloon"}}] * 2


def test_braces_inside_strings_do_not_end_a_message():
    conn = connect()
    conn.receive_data(b'{"execute": "pick", "arguments": {"kind": "a", "label": "}]\\"{["}}')
    assert conn.next_event().arguments["label"] == '}]"{['


def test_oversized_message_is_refused_and_the_next_one_is_served():
    conn = connect()
    big = b'{"execute": "pick", "arguments": {"kind": "a", "label": "' \
        + b"x" * qmp.MAX_MESSAGE_SIZE + b'"}}'
    out = run(conn, big + b'{"execute": "query-balloon", "id": 2}')
    assert out == [{"error": {"class": GENERIC_ERROR, "desc": "JSON token size limit exceeded"}},
                   {"return": {"ran": "query-balloon"}, "id": 2}]
    assert conn.buffered == 0


def test_oversized_bare_token_is_refused():
    (r, *_) = run(connect(), b"1" * (qmp.MAX_MESSAGE_SIZE + 10) + b" ")
    assert error(r) == (GENERIC_ERROR, "JSON token size limit exceeded")


def test_nesting_beyond_the_limit_is_refused_and_the_stream_goes_on():
    conn = connect()
    deep = b"[" * (qmp.MAX_NESTING + 1) + b"]" * (qmp.MAX_NESTING + 1)
    out = run(conn, deep + b'{"execute": "query-balloon"}')
    assert out == [{"error": {"class": GENERIC_ERROR,
                              "desc": "JSON nesting depth limit exceeded"}},
                   {"return": {"ran": "query-balloon"}}]


@pytest.mark.parametrize("byte", [0x00, 0x01, 0x1B, 0x7F - 0x60, 0xFF])
def test_a_control_character_resets_the_parser(byte):
    conn = connect()
    out = run(conn, b'{"execute": "query-balloon", "argu' + bytes([byte])
              + b'{"execute": "query-balloon"}')
    assert out == [{"error": {"class": GENERIC_ERROR,
                              "desc": f"JSON parse error, stray '\\x{byte:02x}'"}},
                   {"return": {"ran": "query-balloon"}}]


def test_a_control_character_ends_skipping_an_oversized_message():
    conn = connect()
    out = run(conn, b'["' + b"x" * (qmp.MAX_MESSAGE_SIZE + 1) + b"\x01"
              + b'{"execute": "query-balloon"}')
    assert [r.get("error", {}).get("desc") for r in out] == [
        "JSON token size limit exceeded", "JSON parse error, stray '\\x01'", None]


def test_input_is_not_taken_after_end_of_file():
    conn = connect()
    conn.receive_data(b"")
    conn.receive_data(b'{"execute": "query-balloon"}')
    assert conn.next_event() is CLOSED and conn.buffered == 0


# -- properties -----------------------------------------------------------------------------------

_messages = st.lists(st.fixed_dictionaries(
    {"execute": st.sampled_from(["query-balloon", "balloon", "nope"]),
     "id": st.one_of(st.integers(), st.text(max_size=8))},
    optional={"arguments": st.dictionaries(st.sampled_from(["value", "x"]),
                                           st.one_of(st.integers(-5, 5), st.text(max_size=4)))}),
    min_size=1, max_size=6)


@settings(max_examples=200, deadline=None)
@given(msgs=_messages, cuts=st.lists(st.integers(0, 400), max_size=10))
def test_any_split_of_a_stream_gives_the_same_replies(msgs, cuts):
    stream = b"\n".join(json.dumps(m).encode() for m in msgs)
    whole = run(connect(), stream)
    conn, out, last = connect(), [], 0
    for cut in sorted(c % (len(stream) + 1) for c in cuts) + [len(stream)]:
        if cut > last:                          # b"" would mean end of file
            out += run(conn, stream[last:cut])
            last = cut
    assert out == whole
    assert [r.get("id") for r in whole] == [m["id"] for m in msgs]


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=2000))
def test_arbitrary_bytes_never_crash_the_parser_and_memory_stays_bounded(data):
    conn = connect()
    out = run(conn, data + b"\x01" + b'{"execute": "query-balloon", "id": "last"}')
    assert out[-1] == {"return": {"ran": "query-balloon"}, "id": "last"}
    assert all(set(r) <= {"return", "error", "id"} for r in out)
    assert conn.buffered == 0


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=5000))
def test_the_framer_never_holds_more_than_the_limit(data):
    f = Framer(max_size=64)
    f.feed(data)
    assert len(f._buf) <= 64


# -- issue 10 ----------------------------------------------------------------------------------

def test_item4_framing_errors_count_against_the_buffer_limit():
    """Stray bytes while a command is pending: the reader stops at its bound of ``buffered``
    (as the control server does, at 4 * the message limit) and memory stays bounded."""
    import tracemalloc
    conn = ServerConnection(SCHEMA, version_info(), max_size=4096)
    run(conn, b'{"execute": "qmp_capabilities"}')
    limit = 4 * 4096
    conn.receive_data(b'{"execute": "query-balloon"}')
    assert isinstance(conn.next_event(), Execute)           # pending: nothing is answered
    tracemalloc.start()
    fed = 0
    while fed < 1 << 20 and conn.buffered < limit:
        conn.receive_data(b"\x01" * 4096)                  # a framing error each
        fed += 4096
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert fed <= limit + 4096                              # the reader stopped early
    assert peak < 1 << 20, f"{peak / 2**20:.1f} MiB for {fed} stray bytes"
    conn.send_return({})
    out = run(conn, b"")
    assert out[0] == {"return": {}} and len(out) == 1 + fed
    assert all(error(r)[1].startswith("JSON parse error, stray") for r in out[1:])


def test_item15_an_id_out_of_a_doubles_range_is_a_clean_error():
    conn = connect()
    out = run(conn, b'{"execute": "query-balloon", "id": 1e400}')
    assert error(out[0]) == ("GenericError", "JSON parse error, number 1e400 is out of range")
    out = run(conn, b'{"execute": "query-balloon", "id": 1.5}')      # the session goes on
    assert out == [{"return": {"ran": "query-balloon"}, "id": 1.5}]


def test_item15_an_integer_id_too_long_to_convert_is_a_clean_error():
    conn = connect()
    out = run(conn, b'{"execute": "query-balloon", "id": ' + b"9" * 5000 + b"}")
    assert error(out[0])[0] == "GenericError" and "JSON parse error" in error(out[0])[1]
