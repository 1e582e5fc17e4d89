"""The QEMU Machine Protocol, server side, without I/O: bytes in, commands out, bytes back.

The specification is QEMU's ``docs/interop/qmp-spec.rst`` ("qmp-spec" below; section names are
its headings).  What a server must do, and what this module does:

- **Framing.**  Input is a stream of JSON texts, not lines: QEMU's JSON streamer ends a message
  when its braces and brackets balance, and ``qemu.qmp`` sends no newline after a command.
  :class:`Framer` does the same, with fixed limits on a message's size and nesting (QEMU:
  "JSON token size limit exceeded", "JSON nesting depth limit exceeded").  An ASCII control
  character other than TAB, CR and LF, or a 0xFF byte, is a lexical error that throws away any
  partial message (qmp-spec, "Forcing the JSON parser into known-good state").  Output is one
  JSON object per line, ASCII, ending in CRLF (qmp-spec, "General Definitions").
- **Greeting, negotiation.**  The server speaks first (qmp-spec, "Server Greeting"); until
  ``qmp_capabilities`` succeeds every other command fails with ``CommandNotFound`` and no event is
  sent (qmp-spec, "Capabilities Negotiation").
- **Commands.**  ``execute``, optional ``arguments`` and ``id`` and nothing else (qmp-spec,
  "Issuing Commands"); the ``id`` comes back in the response, when the server got far enough
  to read it (qmp-spec, "Commands Responses").  Arguments are type-checked against a small
  QAPI-like schema before the command runs (qmp-spec, "Compatibility Considerations").
- **One command at a time.**  Without the ``oob`` capability (which is not offered) the server
  "reads, executes and responds to one command after the other" (qmp-spec, "Out-of-band
  execution"): :meth:`ServerConnection.next_event` hands out the next :class:`Execute` only once
  the previous one was answered, so responses leave in the order the commands came in.

Error texts are QEMU's (``qapi/qmp-dispatch.c``, ``monitor/qmp.c``,
``qapi/qobject-input-visitor.c``), so that tools matching on them behave the same; clients
should not parse them (qmp-spec, "Error").

Usage (the asyncio side is :mod:`vballoon.control`)::

    conn = ServerConnection(COMMANDS, version)
    send(conn.data_to_send())                    # the greeting
    conn.receive_data(chunk)                     # b"" at end of file
    while isinstance(ev := conn.next_event(), Execute):
        conn.send_return(run(ev.command, ev.arguments))   # or conn.send_error(cls, desc)
        send(conn.data_to_send())
"""
from __future__ import annotations

import json
import math
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

# Error classes (QEMU's QapiErrorClass).  vballoon raises only these three.
GENERIC_ERROR = "GenericError"
COMMAND_NOT_FOUND = "CommandNotFound"
DEVICE_NOT_ACTIVE = "DeviceNotActive"

MAX_MESSAGE_SIZE = 64 << 10    # bytes of one command; QEMU allows 64 MiB, vballoon's are tiny
MAX_NESTING = 32               # open braces and brackets; QEMU: 1024
ERROR_COST = 64                # bytes a queued framing error counts for (with its text)
PUMP = 1024                    # input bytes framed at a time while the queue has room
CRLF = b"\r\n"


class Sentinel:
    """A named singleton returned by :meth:`ServerConnection.next_event` (h11's style)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = Sentinel("NEED_DATA")   # feed more bytes
PAUSED = Sentinel("PAUSED")         # answer the pending Execute first
CLOSED = Sentinel("CLOSED")         # the peer sent EOF and every complete message was handled
NO_ID = Sentinel("NO_ID")           # the command had no "id" (an "id" of null is a real id)


class CommandError(Exception):
    """A command failed: the server answers ``{"error": {"class", "desc"}}``.

    Command handlers raise it too; ``id`` is filled in by the connection.
    """

    def __init__(self, error_class: str, desc: str, id: Any = NO_ID) -> None:
        super().__init__(f"{error_class}: {desc}")
        self.error_class, self.desc, self.id = error_class, desc, id


# -- the argument schema ------------------------------------------------------------------------

@dataclass(frozen=True)
class Enum:
    """A QAPI enum: a string out of ``values``."""

    name: str
    values: tuple[str, ...]


INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
_TYPE_NAMES = {"int": "integer", "number": "number", "bool": "boolean", "str": "string"}
_TYPE_CHECKS = {
    # A JSON number with a fraction or an exponent, or beyond int64, is no integer to QEMU;
    # and a boolean is neither an integer nor a number (Python's bool is an int).
    "int": lambda v: type(v) is int and INT64_MIN <= v <= INT64_MAX,
    "number": lambda v: type(v) in (int, float),
    "bool": lambda v: type(v) is bool,
    "str": lambda v: type(v) is str,
}


def _check_value(name: str, t: Any, v: Any) -> None:
    """QEMU's input visitor: one member against its type (``qobject-input-visitor.c``)."""
    if isinstance(t, list):
        if not isinstance(v, list):
            raise CommandError(GENERIC_ERROR, f"Invalid parameter type for '{name}', "
                               "expected: array")
        for i, item in enumerate(v):
            _check_value(f"{name}[{i}]", t[0], item)
        return
    if isinstance(t, Enum):
        if not isinstance(v, str):
            raise CommandError(GENERIC_ERROR, f"Invalid parameter type for '{name}', "
                               "expected: string")
        if v not in t.values:
            raise CommandError(GENERIC_ERROR, f"Parameter '{name}' does not accept value '{v}'")
        return
    if not _TYPE_CHECKS[t](v):
        raise CommandError(GENERIC_ERROR, f"Invalid parameter type for '{name}', "
                           f"expected: {_TYPE_NAMES[t]}")


@dataclass(frozen=True)
class Command:
    """A command's name and arguments, written as in QEMU's QAPI schema.

    ``data`` maps member names to types; a leading ``*`` marks an optional member.  Types:
    ``"int"`` (int64), ``"number"``, ``"bool"``, ``"str"``, an :class:`Enum`, or ``[T]`` for an
    array of ``T``.
    """

    name: str
    data: Mapping[str, Any] = field(default_factory=dict)
    doc: str = ""

    def check(self, arguments: Mapping[str, Any]) -> None:
        """Members in schema order (the first missing or mistyped one is reported), then
        unknown ones -- the order QEMU's generated visitors check them in.

        :raise CommandError: GenericError with QEMU's text.
        """
        for key, t in self.data.items():
            name = key.lstrip("*")
            if name in arguments:
                _check_value(name, t, arguments[name])
            elif not key.startswith("*"):
                raise CommandError(GENERIC_ERROR, f"Parameter '{name}' is missing")
        known = {k.lstrip("*") for k in self.data}
        for name in arguments:
            if name not in known:
                raise CommandError(GENERIC_ERROR, f"Parameter '{name}' is unexpected")


QMP_CAPABILITIES = Command("qmp_capabilities", {"*enable": [Enum("QMPCapability", ("oob",))]},
                           "Leave capabilities negotiation mode; no capability is offered.")


# -- framing ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FramingError:
    """A message the framer threw away, and why (answered as a GenericError without id)."""

    desc: str


_WHITESPACE = frozenset(b" \t\r\n")
# A lexical error anywhere, strings included: control characters but TAB, CR, LF; and 0xFF.
_STRAY = frozenset(range(0x20)) - {0x09, 0x0A, 0x0D} | {0xFF}
_IN_STRING = re.compile(rb'["\\\x00-\x1f\xff]')
_IN_VALUE = re.compile(rb'["{}\[\]\x00-\x08\x0b\x0c\x0e-\x1f\xff]')
_ENDS_BARE = frozenset(b' \t\r\n{}[]",:')


def _show(byte: int) -> str:
    return f"\\x{byte:02x}"


class Framer:
    """Splits a byte stream into JSON texts, as QEMU's ``qobject/json-streamer.c`` does.

    A text is an object or array (it ends when its brackets balance), a string, or a bare token
    (``42``, ``true``, a stray ``}``) -- the last two are answered "QMP input must be a JSON
    object" or a parse error, as QEMU answers them.  A text longer than ``max_size`` bytes or
    deeper than ``max_nesting`` is dropped with one :class:`FramingError`, and the framer skips
    to its end; a stray byte (:data:`_STRAY`) drops any partial text.  Memory stays below
    ``max_size`` per partial text, plus the complete texts and errors not yet taken: input
    is framed only while those stay under ``2 * max_size`` (an error counts
    :data:`ERROR_COST` bytes and its text); the rest waits, raw, and counts in
    :attr:`buffered` -- so a reader that stops reading at a bound of :attr:`buffered` holds
    bounded memory whatever the bytes are (stray bytes included: one error each).
    """

    def __init__(self, max_size: int = MAX_MESSAGE_SIZE, max_nesting: int = MAX_NESTING) -> None:
        self.max_size, self.max_nesting = max_size, max_nesting
        self._buf = bytearray()
        self._raw = bytearray()     # input not framed yet
        self._out: deque[bytes | FramingError] = deque()
        self._queued = 0            # cost of _out, in bytes
        self._reset()

    def _reset(self) -> None:
        self._buf.clear()
        self._depth = 0
        self._in_string = self._escape = self._bare = self._skipping = False

    @property
    def buffered(self) -> int:
        """Bytes held: the partial text and the complete ones not yet taken."""
        return len(self._buf) + self._queued + len(self._raw)

    def next(self) -> bytes | FramingError | None:
        """The next complete text (or error), oldest first; None if there is none."""
        if not self._out:
            self._pump()
            if not self._out:
                return None
        item = self._out.popleft()
        self._queued -= self._cost(item)
        return item

    @staticmethod
    def _cost(item: bytes | FramingError) -> int:
        return len(item) if isinstance(item, bytes) else ERROR_COST + len(item.desc)

    def _emit(self, item: bytes | FramingError) -> None:
        self._out.append(item)
        self._queued += self._cost(item)

    def feed(self, data: bytes) -> None:
        """Take more bytes; complete texts become available to :meth:`next`."""
        self._raw += data
        self._pump()

    def _pump(self) -> None:
        while self._raw and self._queued < 2 * self.max_size:
            piece = bytes(self._raw[:PUMP])
            del self._raw[:PUMP]
            self._frame(piece)

    def _take(self, data: bytes, a: int, b: int) -> None:
        if self._skipping or a == b:
            return
        self._buf += data[a:b]
        if len(self._buf) > self.max_size:
            self._drop("JSON token size limit exceeded")

    def _drop(self, why: str) -> None:
        """Drop the text in progress and skip to its end (its brackets are still counted)."""
        self._emit(FramingError(why))
        self._buf.clear()
        self._skipping = True

    def _end(self) -> None:
        if not self._skipping:
            self._emit(bytes(self._buf))
        self._reset()

    def _stray(self, byte: int) -> None:
        self._reset()
        self._emit(FramingError(f"JSON parse error, stray '{_show(byte)}'"))

    def _frame(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self._in_string:
                if self._escape:                    # the byte after a backslash
                    if data[i] in _STRAY:
                        self._stray(data[i])
                    else:
                        self._escape = False
                        self._take(data, i, i + 1)
                    i += 1
                    continue
                m = _IN_STRING.search(data, i)
                if m is None:
                    self._take(data, i, n)
                    return
                j = m.start()
                c = data[j]
                self._take(data, i, j + 1)
                i = j + 1
                if c == 0x22:                       # "
                    self._in_string = False
                    if self._depth == 0:
                        self._end()
                elif c == 0x5C:                     # backslash
                    self._escape = True
                else:
                    self._stray(c)
            elif self._depth:
                m = _IN_VALUE.search(data, i)
                if m is None:
                    self._take(data, i, n)
                    return
                j = m.start()
                c = data[j]
                self._take(data, i, j + 1)
                i = j + 1
                if c == 0x22:
                    self._in_string = True
                elif c in b"{[":
                    self._depth += 1
                    if self._depth > self.max_nesting and not self._skipping:
                        self._drop("JSON nesting depth limit exceeded")
                elif c in b"}]":
                    self._depth -= 1
                    if self._depth == 0:
                        self._end()
                else:
                    self._stray(c)
            elif self._bare:                        # a top-level token that is not a container
                c = data[i]
                if c in _STRAY:
                    self._stray(c)
                    i += 1
                elif c in _ENDS_BARE:
                    self._end()                     # c starts the next text: look at it again
                else:
                    self._take(data, i, i + 1)
                    i += 1
            else:                                   # between texts
                c = data[i]
                i += 1
                if c in _WHITESPACE:
                    continue
                if c in _STRAY:
                    self._stray(c)
                    continue
                self._take(data, i - 1, i)
                if c in b"{[":
                    self._depth = 1
                elif c == 0x22:
                    self._in_string = True
                elif c in b"}],:":
                    self._end()                     # a lone delimiter is a text of its own
                else:
                    self._bare = True


# -- the connection -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Execute:
    """A well-formed, type-checked command for the application to run, then answer with
    :meth:`ServerConnection.send_return` or :meth:`ServerConnection.send_error`."""

    command: str
    arguments: dict[str, Any]
    id: Any = NO_ID


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # qmp-spec: "Repeating a key within a json-object gives unpredictable results"; QEMU's
    # parser refuses it, and so does this one: two "value"s must not mean the last one.
    obj: dict[str, Any] = {}
    for k, v in pairs:
        if k in obj:
            raise ValueError("duplicate key")
        obj[k] = v
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"invalid keyword '{name}'")      # NaN, Infinity: not JSON


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):                       # 1e400: no double holds it
        raise ValueError(f"number {text[:32]} is out of range")
    return value


def parse_json(raw: bytes) -> Any:
    """One JSON text as QEMU's parser takes it, or CommandError(GenericError, "JSON parse
    error, ...")."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandError(GENERIC_ERROR, "JSON parse error, invalid UTF-8 sequence") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys,
                          parse_constant=_no_constant, parse_float=_finite)
    except json.JSONDecodeError as e:
        msg = e.msg
    except ValueError as e:
        msg = str(e)
    raise CommandError(GENERIC_ERROR, f"JSON parse error, {msg[:1].lower()}{msg[1:]}")


def encode(obj: Mapping[str, Any]) -> bytes:
    """One server message: JSON, ASCII only, CRLF-terminated (qmp-spec, "General
    Definitions").  NaN and infinities are refused: they are not JSON."""
    return json.dumps(obj, ensure_ascii=True, allow_nan=False).encode("ascii") + CRLF


class ServerConnection:
    """One client's QMP session: negotiation state, framing, the command being run.

    ``commands`` are the commands of command mode (``qmp_capabilities`` is built in);
    ``version`` is the greeting's and ``query-version``'s ``VersionInfo``.  The greeting is
    queued at once: send :meth:`data_to_send` first.
    """

    def __init__(self, commands: Iterable[Command], version: Mapping[str, Any], *,
                 max_size: int = MAX_MESSAGE_SIZE) -> None:
        self.commands: dict[str, Command] = {c.name: c for c in commands}
        self.commands.setdefault(QMP_CAPABILITIES.name, QMP_CAPABILITIES)
        self.negotiated = False
        self._framer = Framer(max_size)
        self._pending: Execute | None = None
        self._eof = False
        self._out = bytearray()
        self._out += encode({"QMP": {"version": dict(version), "capabilities": []}})

    # -- input ------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client; ``b""`` means it closed its end (a partial text is dropped)."""
        if not data:
            self._eof = True
        elif not self._eof:
            self._framer.feed(data)

    @property
    def buffered(self) -> int:
        """Input bytes received and not yet turned into events (bound it: stop reading)."""
        return self._framer.buffered

    @property
    def pending(self) -> Execute | None:
        """The command handed out and not answered yet."""
        return self._pending

    def next_event(self) -> Execute | Sentinel:
        """The next command to run: an :class:`Execute`, or NEED_DATA, PAUSED (answer the pending
        command first) or CLOSED.

        Messages that fail before they reach a command -- framing, JSON, the message's shape,
        negotiation, an unknown command, bad arguments -- are answered here (queued in
        :meth:`data_to_send`), as is ``qmp_capabilities``; they never surface.
        """
        if self._pending is not None:
            return PAUSED
        while (item := self._framer.next()) is not None:
            try:
                if isinstance(item, FramingError):
                    raise CommandError(GENERIC_ERROR, item.desc)
                ex = self._parse(item)
            except CommandError as e:
                self._respond({"error": {"class": e.error_class, "desc": e.desc}}, e.id)
                continue
            if ex.command == QMP_CAPABILITIES.name:
                self._capabilities(ex)
                continue
            self._pending = ex
            return ex
        return CLOSED if self._eof else NEED_DATA

    def _parse(self, raw: bytes) -> Execute:
        """A request, as QEMU's ``qmp_dispatch()`` checks it, in its order."""
        obj = parse_json(raw)
        if not isinstance(obj, dict):
            raise CommandError(GENERIC_ERROR, "QMP input must be a JSON object")
        id = obj.get("id", NO_ID)
        try:
            for key, value in obj.items():
                if key == "execute":
                    if not isinstance(value, str):
                        raise CommandError(GENERIC_ERROR,
                                           "QMP input member 'execute' must be a string")
                elif key == "arguments":
                    if not isinstance(value, dict):
                        raise CommandError(GENERIC_ERROR,
                                           "QMP input member 'arguments' must be an object")
                elif key != "id":           # exec-oob included: oob was not negotiated
                    raise CommandError(GENERIC_ERROR, f"QMP input member '{key}' is unexpected")
            if "execute" not in obj:
                raise CommandError(GENERIC_ERROR, "QMP input lacks member 'execute'")
            name = obj["execute"]
            if not self.negotiated and name != QMP_CAPABILITIES.name:
                # monitor/qmp.c replaces CommandNotFound's text in negotiation mode
                raise CommandError(COMMAND_NOT_FOUND,
                                   "Expecting capabilities negotiation with 'qmp_capabilities'")
            if self.negotiated and name == QMP_CAPABILITIES.name:
                raise CommandError(COMMAND_NOT_FOUND, "Capabilities negotiation is already "
                                   "complete, command ignored")
            cmd = self.commands.get(name)
            if cmd is None:
                raise CommandError(COMMAND_NOT_FOUND, f"The command {name} has not been found")
            arguments = obj.get("arguments", {})
            cmd.check(arguments)
        except CommandError as e:
            e.id = id
            raise
        return Execute(name, arguments, id)

    def _capabilities(self, ex: Execute) -> None:
        enable = ex.arguments.get("enable", [])
        if enable:                          # the greeting offered no capability
            self._respond({"error": {"class": GENERIC_ERROR,
                                     "desc": f"Capability {enable[0]} not available"}}, ex.id)
            return
        self.negotiated = True
        self._respond({"return": {}}, ex.id)

    # -- output -----------------------------------------------------------------------------

    def _respond(self, msg: dict[str, Any], id: Any) -> None:
        if id is not NO_ID:
            msg["id"] = id
        self._out += encode(msg)

    def _answer(self, msg: dict[str, Any]) -> None:
        if self._pending is None:
            raise RuntimeError("no command is waiting for an answer")
        ex, self._pending = self._pending, None
        self._respond(msg, ex.id)

    def send_return(self, value: Any) -> None:
        """Answer the pending command with success (qmp-spec, "Success")."""
        self._answer({"return": {} if value is None else value})

    def send_error(self, error_class: str, desc: str) -> None:
        """Answer the pending command with an error (qmp-spec, "Error")."""
        self._answer({"error": {"class": error_class, "desc": desc}})

    def send_event(self, event: str, data: Mapping[str, Any] | None, now: float) -> bool:
        """Queue an event (qmp-spec, "Asynchronous events") unless the client is still
        negotiating, when events are not delivered; True if queued.  ``now``: Unix time."""
        if not self.negotiated:
            return False
        if math.isfinite(now) and now >= 0:
            sec, usec = int(now), int((now - int(now)) * 1_000_000)
        else:
            sec = usec = -1                   # qmp-spec: -1 when there is no host time
        msg: dict[str, Any] = {"timestamp": {"seconds": sec, "microseconds": usec},
                               "event": event}
        if data is not None:
            msg["data"] = dict(data)
        self._out += encode(msg)
        return True

    def data_to_send(self) -> bytes:
        """Everything queued for the client, in order; the queue is emptied."""
        data, self._out = bytes(self._out), bytearray()
        return data
