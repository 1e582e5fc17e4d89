"""A small QMP client for QEMU's monitor (JSON lines over a Unix socket), and QEMU facts the
engine needs: the RAM backend file, the balloon device and its chardev, QEMU's pid."""
from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any


class QMPError(Exception):
    def __init__(self, command: str, error: dict[str, Any]) -> None:
        self.error_class = str(error.get("class", ""))
        self.desc = str(error.get("desc", ""))
        super().__init__(f"QEMU refused {command}: {self.error_class}: {self.desc}")


class QEMUError(Exception):
    """QEMU is not in a state the migration can use; the message says why."""


class QMP:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pid: int) -> None:
        self._reader, self._writer = reader, writer
        self.pid = pid  # QEMU's pid (SO_PEERCRED)
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def connect(cls, path: str, *, timeout: float = 10.0) -> "QMP":
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(path, limit=1 << 24)
        except (OSError, TimeoutError) as e:
            raise QEMUError(f"cannot connect to QEMU's QMP socket {path}: {e}") from None
        sock = writer.get_extra_info("socket")
        pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        qmp = cls(reader, writer, pid)
        try:
            async with asyncio.timeout(timeout):
                greeting = await qmp._read()
                if "QMP" not in greeting:
                    raise QEMUError(f"{path} is not a QMP monitor (greeting {str(greeting)[:80]})")
                await qmp.execute("qmp_capabilities")
        except TimeoutError:
            await qmp.close()
            raise QEMUError(f"QMP socket {path}: no greeting within {timeout} s") from None
        except BaseException:
            await qmp.close()
            raise
        return qmp

    async def _read(self) -> dict[str, Any]:
        try:
            line = await self._reader.readline()
        except (ConnectionError, ValueError) as e:
            raise QEMUError(f"QMP connection failed: {e}") from None
        if not line:
            raise QEMUError("QMP connection closed (QEMU exited?)")
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            raise QEMUError(f"QMP sent invalid JSON: {line[:80]!r}") from None
        if not isinstance(msg, dict):
            raise QEMUError(f"QMP sent a non-object: {line[:80]!r}")
        return msg

    async def execute(self, command: str, arguments: dict[str, Any] | None = None, *,
                      timeout: float = 30.0) -> Any:
        msg_id = next(self._ids)
        msg: dict[str, Any] = {"execute": command, "id": msg_id}
        if arguments is not None:
            msg["arguments"] = arguments
        try:
            async with self._lock, asyncio.timeout(timeout):
                self._writer.write(json.dumps(msg).encode() + b"\n")
                await self._writer.drain()
                while True:
                    reply = await self._read()
                    if "event" in reply:
                        self.events.append(reply)
                    elif reply.get("id") == msg_id:
                        if "error" in reply:
                            raise QMPError(command, reply["error"] if isinstance(reply["error"], dict) else {})
                        return reply.get("return")
        except TimeoutError:
            raise QEMUError(f"QEMU did not answer {command} within {timeout} s") from None
        except ConnectionError as e:
            raise QEMUError(f"QMP connection failed during {command}: {e}") from None

    async def wait_event(self, name: str, *, match: dict[str, Any] | None = None,
                         timeout: float = 30.0) -> dict[str, Any]:
        def wanted(ev: dict[str, Any]) -> bool:
            data = ev.get("data") or {}
            return ev.get("event") == name and all(data.get(k) == v for k, v in (match or {}).items())

        try:
            async with self._lock, asyncio.timeout(timeout):
                for ev in self.events:
                    if wanted(ev):
                        self.events.remove(ev)
                        return ev
                while True:
                    msg = await self._read()
                    if "event" in msg:
                        if wanted(msg):
                            return msg
                        self.events.append(msg)
        except TimeoutError:
            raise QEMUError(f"no {name} event from QEMU within {timeout} s") from None

    async def close(self) -> None:
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (OSError, RuntimeError):
            pass

    # -- facts

    async def ram_file(self) -> tuple[str, int]:
        """(path, size) of the guest's single RAM backend; it must be a shared file
        (x-ignore-shared skips only memory-backend-file,share=on)."""
        devs = await self.execute("query-memdev")
        if not isinstance(devs, list) or len(devs) != 1:
            raise QEMUError(f"the guest must have exactly one memory backend (has {len(devs or [])})")
        dev = devs[0]
        mid = dev.get("id")
        if not dev.get("share") or not mid:
            raise QEMUError("guest RAM must be a named, shared backend: "
                            "-object memory-backend-file,id=mem,share=on,mem-path=/dev/shm/...")
        try:
            typ = await self.execute("qom-get", {"path": f"/objects/{mid}", "property": "type"})
            path = await self.execute("qom-get", {"path": f"/objects/{mid}", "property": "mem-path"})
        except QMPError:
            typ, path = "?", None
        if typ != "memory-backend-file" or not isinstance(path, str):
            raise QEMUError(f"guest RAM backend {mid!r} is {typ}, not memory-backend-file: "
                            "x-ignore-shared would migrate it anyway")
        return path, int(dev["size"])

    async def balloon_device(self, device_id: str | None) -> "DeviceSpec":
        """The vhost-user balloon (vhost-user-test-device-pci, virtio-id 5): its id and what is
        needed to plug it again."""
        if device_id is None:
            kids = await self.execute("qom-list", {"path": "/machine/peripheral"})
            ids = [k["name"] for k in kids if str(k.get("type", "")).startswith("child<vhost-user-test-device")]
            if len(ids) != 1:
                raise QEMUError(f"found {len(ids)} vhost-user-test-device devices; name one with --device-id")
            device_id = ids[0]
        path = f"/machine/peripheral/{device_id}"

        async def get(prop: str) -> Any:
            return await self.execute("qom-get", {"path": path, "property": prop})
        try:
            typ = await get("type")
        except QMPError:
            raise QEMUError(f"no device {device_id!r} in QEMU") from None
        if not str(typ).startswith("vhost-user-test-device"):
            raise QEMUError(f"device {device_id!r} is {typ}, not vhost-user-test-device-pci")
        props = {p: await get(p) for p in ("chardev", "virtio-id", "num_vqs", "vq_size", "config_size")}
        if props["virtio-id"] != 5:
            raise QEMUError(f"device {device_id!r} has virtio-id {props['virtio-id']}, not 5 (balloon)")
        bus = await get("parent_bus")
        bus_name = str(bus).rstrip("/").rsplit("/", 1)[-1]
        chardevs = await self.execute("query-chardev")
        label = props["chardev"]
        fname = next((c["filename"] for c in chardevs if c.get("label") == label), "")
        sock = fname.split("unix:", 1)[1].split(",", 1)[0] if "unix:" in fname else ""
        # `vballoon serve` binds PATH.PID.tmp and renames it to PATH; QEMU reports the name it
        # connected to
        m = re.fullmatch(r"(.*)\.\d+\.tmp", sock)
        if m and not os.path.exists(sock) and os.path.exists(m[1]):
            sock = m[1]
        return DeviceSpec(device_id, str(typ), bus_name, label, sock, props)

    async def migration_status(self) -> dict[str, Any]:
        return await self.execute("query-migrate")

    async def wait_migration(self, states: set[str], *, timeout: float, poll: float = 0.01) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            info = await self.migration_status()
            st = info.get("status")
            if st in states:
                return info
            if st in ("failed", "cancelled"):
                raise QEMUError(f"QEMU's migration {st}: {info.get('error-desc', '')}")
            if time.monotonic() > deadline:
                raise QEMUError(f"QEMU's migration is {st!r}, not {'/'.join(sorted(states))}, after {timeout} s")
            await asyncio.sleep(poll)


@dataclass(frozen=True)
class DeviceSpec:
    id: str
    driver: str
    bus: str
    chardev: str
    socket_path: str
    props: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "driver": self.driver, "bus": self.bus, "chardev": self.chardev,
                "props": self.props}

    def device_add_args(self) -> dict[str, Any]:
        args = {"driver": self.driver, "id": self.id, "chardev": self.chardev}
        if self.bus and self.bus != "pcie.0":
            args["bus"] = self.bus
        for k in ("virtio-id", "num_vqs", "vq_size", "config_size"):
            args[k] = self.props[k]
        return args


async def plug(qmp: QMP, spec: DeviceSpec, socket_path: str) -> None:
    """chardev-add (a fresh connection to the daemon) + device_add."""
    await qmp.execute("chardev-add", {"id": spec.chardev, "backend": {
        "type": "socket", "data": {"addr": {"type": "unix", "data": {"path": socket_path}},
                                   "server": False}}})
    try:
        await qmp.execute("device_add", spec.device_add_args())
    except BaseException:
        try:
            await qmp.execute("chardev-remove", {"id": spec.chardev})
        except (QMPError, QEMUError):
            pass
        raise


async def unplug(qmp: QMP, spec: DeviceSpec, *, timeout: float = 20.0) -> None:
    """device_del, and wait for DEVICE_DELETED (the guest's driver let go)."""
    await qmp.execute("device_del", {"id": spec.id})
    await qmp.wait_event("DEVICE_DELETED", match={"device": spec.id}, timeout=timeout)
