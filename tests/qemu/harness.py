"""Real QEMU, real Linux guest: the harness under tests/qemu (stdlib only, asyncio).

    lab = ensure_lab()                      # QEMU + guest kernel/initrd, or LabUnavailable
    async with Guest(lab, ["-device", "virtio-balloon-pci"], qmp=True) as g:
        rc, out = await g.run("cat /proc/meminfo")
        await g.qmp.execute("balloon", {"value": 256 << 20})

The guest is a stock Debian kernel with a busybox initramfs whose /init
(guest-init.sh) loads virtio_balloon (or, with append="lab.driver=bitmap",
guest/linux's virtio_balloon_bitmap.ko) and then runs one shell command per line
received on ttyS0, framing each command's output with markers. QEMU's serial
port is its stdio, so the harness talks to the guest over QEMU's pipes.

The async API matters: a vhost-user back-end running in the test's own event
loop must keep answering QEMU while the test waits for the guest.

Environment:
  VBALLOON_LAB            lab directory (default /var/cache/vballoon-lab)
  VBALLOON_QEMU_SETUP     1: run setup.sh even when not root; 0: never run it
  VBALLOON_QEMU           use this qemu-system-x86_64 (>= 10.2) instead of the lab's
  VBALLOON_GUEST_KERNEL   use this kernel ...
  VBALLOON_GUEST_INITRD   ... with this initrd (both or neither; the initrd must
                          run guest-init.sh as /init)
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import hashlib
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SETUP_SH = HERE / "setup.sh"
GUEST_INIT = HERE / "guest-init.sh"
DEFAULT_LAB = "/var/cache/vballoon-lab"
MIN_QEMU = (10, 2)  # first release with the user-creatable vhost-user-test-device


class LabUnavailable(Exception):
    """QEMU or the guest cannot be provided on this machine; str() says why."""


class GuestError(Exception):
    """The guest or QEMU did not behave (exited, bad marker, command failed)."""


class GuestTimeout(GuestError, TimeoutError):
    """Something expected from the guest or QEMU did not happen in time."""


class QmpError(Exception):
    """A QMP command answered with an error."""

    def __init__(self, error: dict[str, Any]):
        self.error_class = error.get("class", "")
        self.desc = error.get("desc", "")
        super().__init__(f"{self.error_class}: {self.desc}")


# --------------------------------------------------------------------------- lab


@dataclasses.dataclass(frozen=True)
class Lab:
    dir: Path
    qemu: Path  # qemu-system-x86_64 to execute (the lab's wrapper or VBALLOON_QEMU)
    qemu_version: tuple[int, int, int]
    qemu_version_text: str  # first line of `qemu --version`
    kernel: Path
    initrd: Path
    kernel_release: str  # "" when unknown (user-provided kernel)
    qmp_object: bool  # QEMU has `-object monitor-qmp` (newer QEMU deprecates -mon)
    setup_output: str  # what setup.sh printed, if ensure_lab() ran it


def _setup_allowed() -> tuple[bool, str]:
    flag = os.environ.get("VBALLOON_QEMU_SETUP")
    if flag == "0":
        return False, "VBALLOON_QEMU_SETUP=0"
    if flag == "1" or os.geteuid() == 0:
        return True, ""
    return False, "not root (set VBALLOON_QEMU_SETUP=1 to run tests/qemu/setup.sh anyway)"


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ensure_lab(*, setup: bool | None = None, timeout: float = 1800.0) -> Lab:
    """Return a usable Lab, running setup.sh first when allowed.

    setup=None: allowed when root or VBALLOON_QEMU_SETUP=1 (never when =0).
    Raises LabUnavailable with the reason when QEMU or the guest is missing,
    too old, or setup.sh failed.
    """
    lab_dir = Path(os.environ.get("VBALLOON_LAB", DEFAULT_LAB))
    user_qemu = os.environ.get("VBALLOON_QEMU")
    user_kernel = os.environ.get("VBALLOON_GUEST_KERNEL")
    user_initrd = os.environ.get("VBALLOON_GUEST_INITRD")
    if bool(user_kernel) != bool(user_initrd):
        raise LabUnavailable("set both VBALLOON_GUEST_KERNEL and VBALLOON_GUEST_INITRD, or neither")

    env: dict[str, str] = {}
    output = ""
    if not (user_qemu and user_kernel):
        allowed, why_not = _setup_allowed() if setup is None else (setup, "setup=False")
        if allowed:
            try:
                done = subprocess.run(
                    ["bash", str(SETUP_SH)],
                    env={**os.environ, "VBALLOON_LAB": str(lab_dir)},
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    timeout=timeout,
                )
            except subprocess.TimeoutExpired:
                raise LabUnavailable(f"tests/qemu/setup.sh took more than {timeout:.0f} s") from None
            output = done.stdout
            if done.returncode != 0:
                raise LabUnavailable(
                    f"tests/qemu/setup.sh failed (exit {done.returncode}):\n{_tail(output)}"
                )
        env_file = lab_dir / "lab.env"
        if not env_file.exists():
            raise LabUnavailable(f"no QEMU lab in {lab_dir} and setup.sh not run: {why_not}")
        env = dict(
            line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line
        )

    qemu = Path(user_qemu or env["QEMU"])
    kernel = Path(user_kernel or env["KERNEL"])
    initrd = Path(user_initrd or env["INITRD"])
    for what, path in (("QEMU", qemu), ("guest kernel", kernel), ("guest initrd", initrd)):
        if not path.exists():
            raise LabUnavailable(f"{what} {path} does not exist")
    if not user_initrd and env.get("INIT_SHA256") != _sha256(GUEST_INIT):
        raise LabUnavailable(
            f"{initrd} was built from another guest-init.sh; re-run tests/qemu/setup.sh as root"
        )

    try:
        ver = subprocess.run(
            [str(qemu), "--version"], capture_output=True, text=True, timeout=60
        )
        has_qmp_object = subprocess.run(
            [str(qemu), "-object", "monitor-qmp,help"], capture_output=True, timeout=60
        ).returncode == 0
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LabUnavailable(f"cannot run {qemu}: {e}") from None
    text = (ver.stdout.splitlines() or [""])[0]
    m = re.search(r"version (\d+)\.(\d+)\.(\d+)", text)
    if ver.returncode != 0 or not m:
        raise LabUnavailable(f"{qemu} --version failed: {_tail(ver.stdout + ver.stderr, 5)}")
    version = (int(m[1]), int(m[2]), int(m[3]))
    if version[:2] < MIN_QEMU:
        raise LabUnavailable(f"{qemu} is {text!r}; need QEMU >= {MIN_QEMU[0]}.{MIN_QEMU[1]}")
    return Lab(
        dir=lab_dir,
        qemu=qemu,
        qemu_version=version,
        qemu_version_text=text,
        kernel=kernel,
        initrd=initrd,
        kernel_release="" if user_kernel else env.get("KERNEL_RELEASE", ""),
        qmp_object=has_qmp_object,
        setup_output=output,
    )


# --------------------------------------------------------------------------- QMP


class Qmp:
    """Minimal QMP client: JSON lines over a connected stream socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self.greeting: dict[str, Any] = {}
        self.events: list[dict[str, Any]] = []  # received, not yet taken by wait_event()

    @classmethod
    async def connect(cls, sock: socket.socket | str, *, timeout: float = 30.0) -> Qmp:
        """Connect (a socket object or a Unix socket path), read the greeting,
        and leave capabilities negotiation mode."""
        kw: dict[str, Any] = {"sock": sock} if isinstance(sock, socket.socket) else {"path": sock}
        reader, writer = await asyncio.open_unix_connection(limit=1 << 24, **kw)
        qmp = cls(reader, writer)
        try:
            async with asyncio.timeout(timeout):
                qmp.greeting = await qmp._read()
            await qmp.execute("qmp_capabilities", timeout=timeout)
        except BaseException:
            await qmp.close()
            raise
        return qmp

    async def _read(self) -> dict[str, Any]:
        try:
            line = await self._reader.readline()
        except ConnectionError:
            line = b""
        if not line:
            raise GuestError("QMP connection closed (QEMU exited?)")
        return json.loads(line)

    async def execute(
        self, command: str, arguments: dict[str, Any] | None = None, *, timeout: float = 30.0
    ) -> Any:
        """Run a command; return its "return" value or raise QmpError."""
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
                            raise QmpError(reply["error"])
                        return reply["return"]
        except TimeoutError:
            raise GuestTimeout(f"QMP {command} got no answer within {timeout} s") from None

    async def wait_event(
        self,
        name: str,
        *,
        match: Callable[[dict[str, Any]], bool] | None = None,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        """Take the first event `name` whose data satisfies `match` (already
        received ones first); return the whole event message."""

        def wanted(ev: dict[str, Any]) -> bool:
            return ev["event"] == name and (match is None or match(ev.get("data", {})))

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
            raise GuestTimeout(f"no QMP event {name} within {timeout} s") from None

    async def close(self) -> None:
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (OSError, RuntimeError):
            pass


# --------------------------------------------------------------------------- guest


@dataclasses.dataclass(frozen=True)
class VirtioDevice:
    name: str  # "virtio0"
    device: int  # virtio device id: 5 = balloon
    vendor: int
    status: int  # device status byte (0xf = ACKNOWLEDGE|DRIVER|FEATURES_OK|DRIVER_OK)
    features: frozenset[int]  # feature bits the driver accepted
    driver: str | None  # "virtio_balloon", or None when unbound


def _prctl_pdeathsig() -> Callable[[], None]:
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork

    def set_pdeathsig() -> None:  # runs in the child between fork and exec
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: QEMU dies with the test process

    return set_pdeathsig


_SET_PDEATHSIG = _prctl_pdeathsig()
#: preexec_fn for helper processes a test starts (a daemon under test, ...):
#: like QEMU, they get SIGKILL when the test process dies.
set_pdeathsig = _SET_PDEATHSIG
_READY = re.compile(rb"@@VB READY (\S+) (\S+) insmod=(\d+)\n")
# One line per /sys/bus/virtio/devices/* entry; see VirtioDevice.
_VIRTIO_LIST = (
    'for d in /sys/bus/virtio/devices/*; do [ -e "$d/device" ] || continue; '
    'dr=$(readlink "$d/driver"); '
    'echo "${d##*/} $(cat $d/device) $(cat $d/vendor) $(cat $d/status) $(cat $d/features) ${dr##*/}"; '
    "done"
)


class Guest:
    """One QEMU process with the test guest; use `async with Guest(...) as g`.

    args: extra QEMU arguments (devices, chardevs, ...), appended last.
    mem_mib: guest RAM, a shared memfd (vhost-user needs it) of that size.
    mem_path: a file instead (memory-backend-file,share=on): what x-ignore-shared
    migration needs (tests/qemu/test_migrate.py).
    smp: vCPUs.
    qmp: connect a QMP monitor (over a socketpair) as `self.qmp`.
    append: extra kernel command line.  no_reboot: pass -no-reboot (a guest
    reboot or panic then ends QEMU).  workdir: where serial.log and
    qemu-stderr.log go (default: a temporary directory, removed on close()).
    boot_timeout / timeout: defaults for waiting for boot / for one command.
    """

    def __init__(
        self,
        lab: Lab,
        args: Sequence[str] = (),
        *,
        mem_mib: int = 512,
        smp: int = 1,
        qmp: bool = False,
        append: str = "",
        no_reboot: bool = False,
        workdir: str | os.PathLike[str] | None = None,
        boot_timeout: float = 120.0,
        timeout: float = 60.0,
        mem_path: str | os.PathLike[str] | None = None,
    ):
        self.lab = lab
        self.mem_path = mem_path
        self.args = list(args)
        self.mem_mib = mem_mib
        self.smp = smp
        self.want_qmp = qmp
        self.append = append
        self.no_reboot = no_reboot
        self.boot_timeout = boot_timeout
        self.timeout = timeout
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else None
        self.qmp: Qmp | None = None
        self.boot_id = ""  # /proc/sys/kernel/random/boot_id of the current boot
        self.kernel_release = ""
        self.insmod_rc = -1  # exit status of `insmod virtio_balloon.ko` in this boot
        self.boot_seconds = 0.0  # QEMU start (or reboot command) -> READY marker
        self._proc: asyncio.subprocess.Process | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._buf = bytearray()  # everything read from the serial port
        self._pos = 0  # serial bytes already consumed by a wait
        self._more = asyncio.Event()  # set whenever serial data or EOF arrives
        self._eof = False
        self._serial_log: Any = None
        self._cmd_lock = asyncio.Lock()
        self._token = secrets.token_hex(4)
        self._seq = itertools.count(1)
        self._memfd: str | None = None

    # -- lifecycle

    def argv(self) -> list[str]:
        """The full QEMU command line (without the QMP fd arguments)."""
        lab, mem = self.lab, self.mem_mib
        cmdline = f"console=ttyS0 panic=-1 loglevel=4 {self.append}".strip()
        argv = [
            str(lab.qemu),
            "-M", "q35", "-accel", "tcg", "-m", f"{mem}M", "-smp", str(self.smp),
            "-nodefaults", "-display", "none",
            "-object", f"memory-backend-memfd,id=mem,size={mem}M,share=on"
            if self.mem_path is None else
            f"memory-backend-file,id=mem,size={mem}M,share=on,mem-path={self.mem_path}",
            "-machine", "memory-backend=mem",
            "-serial", "stdio",
            "-kernel", str(lab.kernel), "-initrd", str(lab.initrd), "-append", cmdline,
        ]  # fmt: skip
        if self.no_reboot:
            argv.append("-no-reboot")
        return argv + self.args

    @property
    def pid(self) -> int:
        assert self._proc is not None, "not started"
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """QEMU's exit status, or None while it runs."""
        return self._proc.returncode if self._proc else None

    async def start(self, *, wait_ready: bool = True) -> None:
        """Start QEMU; with wait_ready, also wait for the guest's READY marker."""
        assert self._proc is None, "already started"
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="vballoon-qemu-"))
        argv = self.argv()
        qmp_ours = qmp_theirs = None
        if self.want_qmp:
            # A socketpair instead of a listening path: no race, no polling for the socket file.
            qmp_ours, qmp_theirs = socket.socketpair()
            fd = qmp_theirs.fileno()
            monitor = (
                ["-object", "monitor-qmp,id=qmp0,chardev=qmp"]
                if self.lab.qmp_object
                else ["-mon", "chardev=qmp,mode=control"]
            )
            argv[1:1] = ["-chardev", f"socket,id=qmp,fd={fd}", *monitor]
        self._serial_log = open(self.workdir / "serial.log", "wb")
        started = time.monotonic()
        try:
            with open(self.workdir / "qemu-stderr.log", "wb") as stderr:
                self._proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=stderr,
                    pass_fds=[qmp_theirs.fileno()] if qmp_theirs else [],
                    preexec_fn=_SET_PDEATHSIG,
                )
            self._reader_task = asyncio.create_task(self._read_serial())
            if qmp_theirs:
                qmp_theirs.close()
                qmp_theirs = None
                try:
                    self.qmp = await Qmp.connect(qmp_ours, timeout=self.boot_timeout)
                except GuestError as e:
                    raise GuestError(f"QEMU failed to start: {e}{self.diagnostics()}") from None
                qmp_ours = None
            if wait_ready:
                await self._wait_ready(started, self.boot_timeout)
        except BaseException:
            for s in (qmp_ours, qmp_theirs):
                if s:
                    s.close()
            await self.close()
            raise

    async def wait_ready(self, timeout: float | None = None) -> str:
        """Wait for the guest's READY marker (after start(wait_ready=False));
        return the boot id."""
        await self._wait_ready(time.monotonic(), timeout or self.boot_timeout)
        return self.boot_id

    async def _wait_ready(self, started: float, timeout: float) -> None:
        m = await self._wait(_READY, timeout, "the guest's READY marker")
        self.boot_id, self.kernel_release = m[1].decode(), m[2].decode()
        self.insmod_rc = int(m[3])
        self.boot_seconds = time.monotonic() - started

    async def close(self) -> None:
        """Kill QEMU (if still running) and release everything; idempotent."""
        if self.qmp:
            await self.qmp.close()
            self.qmp = None
        proc = self._proc
        if proc is not None:
            if proc.returncode is None:
                try:
                    proc.kill()
                except ProcessLookupError:
                    pass
            await asyncio.wait_for(proc.wait(), 30)
            if proc.stdin:
                proc.stdin.close()
        if self._reader_task:
            # Finishes on its own at EOF (QEMU is gone); the timeout is a safety net.
            try:
                await asyncio.wait_for(self._reader_task, 10)
            except TimeoutError:
                pass  # wait_for() cancelled it
            self._reader_task = None
        if self._serial_log:
            self._serial_log.close()
            self._serial_log = None
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    async def __aenter__(self) -> Guest:
        await self.start()
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if isinstance(exc, Exception) and not isinstance(exc, GuestError) and self._proc:
            exc.add_note(self.diagnostics())
        await self.close()

    # -- serial port

    async def _read_serial(self) -> None:
        assert self._proc and self._proc.stdout
        while data := await self._proc.stdout.read(1 << 16):
            self._buf += data
            self._serial_log.write(data)
            self._serial_log.flush()
            self._more.set()
        self._eof = True
        self._more.set()

    async def _wait(self, pattern: re.Pattern[bytes], timeout: float, what: str) -> re.Match[bytes]:
        """Wait until `pattern` appears in unconsumed serial output; consume up to its end."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    self._more.clear()
                    m = pattern.search(self._buf, self._pos)
                    if m:
                        self._pos = m.end()
                        return m
                    if self._eof:
                        raise GuestError(
                            f"QEMU exited (status {self.returncode}) while waiting for {what}"
                            + self.diagnostics()
                        )
                    await self._more.wait()
        except TimeoutError:
            raise GuestTimeout(f"no {what} within {timeout} s" + self.diagnostics()) from None

    async def _send(self, line: str) -> None:
        if self._proc is None or self._proc.stdin is None or self._eof:
            raise GuestError("QEMU is not running" + self.diagnostics())
        self._proc.stdin.write(line.encode() + b"\n")
        await self._proc.stdin.drain()

    def serial_output(self) -> str:
        """Everything the guest printed on ttyS0 so far (all boots)."""
        return self._buf.decode(errors="replace")

    def stderr_output(self) -> str:
        if self.workdir is None:
            return ""
        try:
            return (self.workdir / "qemu-stderr.log").read_text(errors="replace")
        except OSError:
            return ""

    def diagnostics(self, chars: int = 3000) -> str:
        """Tails of QEMU's stderr and the serial console, for error messages."""
        return (
            f"\n--- QEMU stderr (tail) ---\n{self.stderr_output()[-chars:]}"
            f"\n--- guest serial (tail) ---\n{self.serial_output()[-chars:]}"
        )

    # -- guest commands

    async def run(self, cmd: str, *, timeout: float | None = None) -> tuple[int, str]:
        """Run `sh -c cmd` in the guest; return (exit status, stdout+stderr).

        cmd must be one line without control characters (it crosses the
        guest's tty in canonical mode) and under ~3.5 KiB.
        """
        if any(ord(c) < 32 for c in cmd) or len(cmd.encode()) > 3500:
            raise ValueError(f"command must be one printable line under 3.5 KiB: {cmd!r}")
        async with self._cmd_lock:
            cid = f"{self._token}.{next(self._seq)}".encode()
            await self._send(f"{cid.decode()} {cmd}")
            m = await self._wait(
                re.compile(rb"@@VB BEGIN " + re.escape(cid) + rb"\n(.*?)@@VB END "
                           + re.escape(cid) + rb" (\d+)\n", re.S),
                timeout or self.timeout,
                f"the end of guest command {cmd!r}",
            )  # fmt: skip
        return int(m[2]), m[1].decode(errors="replace")

    async def check(self, cmd: str, *, timeout: float | None = None) -> str:
        """Like run(), but raise GuestError unless the exit status is 0; return the output."""
        rc, out = await self.run(cmd, timeout=timeout)
        if rc != 0:
            raise GuestError(f"guest command {cmd!r} exited {rc}:\n{out}")
        return out

    async def meminfo(self) -> dict[str, int]:
        """/proc/meminfo as {"MemTotal": kB, ...} (values as printed, kB where a unit is shown)."""
        out = await self.check("cat /proc/meminfo")
        info = {}
        for line in out.splitlines():
            key, _, value = line.partition(":")
            info[key] = int(value.split()[0])
        return info

    async def vmstat(self) -> dict[str, int]:
        """/proc/vmstat as {"nr_free_pages": 123, "balloon_inflate": 0, ...}."""
        out = await self.check("cat /proc/vmstat")
        return {k: int(v) for k, v in (line.split() for line in out.splitlines())}

    async def free_kib(self, *, steady: bool = False, timeout: float = 30.0) -> int:
        """Free memory in kB, counting the per-cpu page lists too: MemFree alone
        misses pages just freed onto them (tens of MiB after a deflate), which the
        kernel drains back only over seconds.

        steady: read until two readings in a row agree within 1 MiB. Free page
        reporting takes batches of up to 128 MiB off the free lists while the
        device looks at them; a single reading may fall into such a moment.
        """
        cmd = "grep MemFree: /proc/meminfo; grep ' count:' /proc/zoneinfo"

        async def read() -> int:
            lines = (await self.check(cmd)).splitlines()
            pcp_pages = sum(int(line.split()[1]) for line in lines[1:])
            return int(lines[0].split()[1]) + pcp_pages * 4  # x86-64 guest: 4 KiB pages

        value = await read()
        if not steady:
            return value
        deadline = time.monotonic() + timeout
        while abs((again := await read()) - value) > 1024:
            if time.monotonic() > deadline:
                raise GuestTimeout(f"the guest's free memory did not settle in {timeout} s")
            value = again
        return again

    async def virtio_devices(self) -> list[VirtioDevice]:
        """Every /sys/bus/virtio/devices/* entry of the guest."""
        devices = []
        for line in (await self.check(_VIRTIO_LIST)).splitlines():
            name, device, vendor, status, features, *driver = line.split()
            devices.append(
                VirtioDevice(
                    name=name,
                    device=int(device, 16),
                    vendor=int(vendor, 16),
                    status=int(status, 16),
                    features=frozenset(i for i, c in enumerate(features) if c == "1"),
                    driver=driver[0] if driver else None,
                )
            )
        return devices

    async def dirty(self, mib: int, *, keep: bool = False, path: str = "/tmp/vb-dirty") -> None:
        """Write `mib` MiB into a tmpfs file (allocating that much guest RAM), then
        delete it (freeing the pages again) unless keep=True."""
        cmd = f"dd if=/dev/zero of={path} bs=1M count={mib} 2>/dev/null"
        await self.check(cmd if keep else f"{cmd} && rm -f {path}")

    async def poweroff(self, *, timeout: float | None = None) -> int:
        """`poweroff -f` in the guest; wait for QEMU to exit and return its status."""
        assert self._proc is not None, "not started"
        await self._send(f"{self._token}.poweroff poweroff -f")
        try:
            return await asyncio.wait_for(self._proc.wait(), timeout or self.timeout)
        except TimeoutError:
            raise GuestTimeout("QEMU did not exit after poweroff" + self.diagnostics()) from None

    async def kill(self, *, timeout: float | None = None) -> int:
        """SIGKILL QEMU (no orderly device stop at all); wait for it and return its status.
        Unlike close(), the guest's logs and the workdir stay."""
        assert self._proc is not None, "not started"
        if self._proc.returncode is None:
            try:
                self._proc.kill()
            except ProcessLookupError:
                pass
        try:
            return await asyncio.wait_for(self._proc.wait(), timeout or self.timeout)
        except TimeoutError:
            raise GuestTimeout("QEMU did not exit after SIGKILL") from None

    async def reboot(self, *, timeout: float | None = None) -> str:
        """`reboot -f` in the guest (a machine reset); wait for the next READY
        and return the new boot id."""
        old = self.boot_id
        started = time.monotonic()
        await self._send(f"{self._token}.reboot reboot -f")
        await self._wait_ready(started, timeout or self.boot_timeout)
        if self.boot_id == old:
            raise GuestError("guest printed READY again without rebooting")
        return self.boot_id

    # -- host view of guest RAM

    def memfd_path(self) -> str:
        """/proc/<qemu>/fd/<n> of the memfd backing guest RAM (stat() it or open() it)."""
        if self._memfd is None:
            fd_dir = f"/proc/{self.pid}/fd"
            for fd in os.listdir(fd_dir):
                path = f"{fd_dir}/{fd}"
                try:
                    # QEMU 11 names it "/memfd:memory-backend-memfd (deleted)";
                    # the size tells it apart from any other memfd.
                    if (
                        os.readlink(path).startswith("/memfd:")
                        and os.stat(path).st_size == self.mem_mib << 20
                    ):
                        self._memfd = path
                        break
                except OSError:
                    continue
            else:
                raise GuestError(f"no {self.mem_mib} MiB memfd among QEMU's fds in {fd_dir}")
        return self._memfd

    def ram_allocated_bytes(self) -> int:
        """Host memory currently allocated to guest RAM (the memfd's st_blocks * 512)."""
        return os.stat(self.memfd_path()).st_blocks * 512


async def wait_until(
    predicate: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Poll a host-side condition that has no event to await (e.g. QEMU
    discarding guest pages); return its first truthy value or raise GuestTimeout."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise GuestTimeout(f"{what}: not within {timeout} s")
        await asyncio.sleep(interval)
    return value


async def eventually(
    check: Callable[[], Awaitable[Any]], *, timeout: float, what: str, interval: float = 0.2
) -> Any:
    """Like wait_until, for a condition that needs the guest (an async check such
    as reading /proc/meminfo); return its first truthy value or raise GuestTimeout."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise GuestTimeout(f"{what}: not within {timeout} s")
        try:
            async with asyncio.timeout(remaining):
                value = await check()
        except TimeoutError:
            raise GuestTimeout(f"{what}: not within {timeout} s") from None
        if value:
            return value
        await asyncio.sleep(interval)
