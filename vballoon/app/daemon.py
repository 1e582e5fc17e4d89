"""The daemon: any :class:`~vballoon.virtio.device.Device` served on a vhost-user socket, with
its one deadline timer and supervised background tasks; for the balloon, its service
(:class:`~vballoon.app.service.BalloonService`) on the control socket.

Time: the device says when it next needs time (``next_deadline()``); the daemon arms one
timer for the earliest deadline and re-arms it after every device event, every vhost-user
message or kick (``Server.on_activity``) and every control command.  An idle daemon sleeps.

Supervision: a background task that fails is logged with its traceback and the daemon stops
with an error (:meth:`Daemon.wait` raises), never dies silently; the timer's callback logs a
failing ``handle_timer`` and is armed again.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import socket
from typing import TYPE_CHECKING, Any, Iterable

from vballoon.app.activation import listener_from_fd, notify, systemd_listener
from vballoon.app.service import BalloonService
from vballoon.devices.balloon import Balloon
from vballoon.errors import ConfigError, VballoonError
from vballoon.vhost.transport import Server
from vballoon.virtio.device import Device, DeviceEvent

if TYPE_CHECKING:
    from vballoon.control.server import ControlServer

log = logging.getLogger(__name__)


class DaemonFailed(VballoonError):
    """A background task of the daemon failed; the daemon stopped."""


class Daemon:
    """Serve ``device`` (default: a :class:`Balloon` with ``features`` and ``stats_interval``)
    on ``socket_path``; with ``control_path``, serve its service as QMP there."""

    def __init__(self, socket_path: str, device: Device | None = None, *,
                 features: Iterable[str] | None = None, stats_interval: float = 5.0,
                 control_path: str | None = None, export_dir: str | None = None,
                 listen_sock: socket.socket | None = None, socket_mode: int | None = None,
                 socket_group: int | None = None) -> None:
        if device is None:
            device = Balloon(features, stats_interval=stats_interval)
        self.device = device
        self.socket_path = socket_path
        self.listen_sock = listen_sock          # inherited (--fd, systemd); else made here
        self.socket_mode, self.socket_group = socket_mode, socket_group
        self.control_path = control_path
        self.export_dir = export_dir
        self.server: Server | None = None
        self.control: ControlServer | None = None
        #: the device's control API (the balloon's; None for a device without one)
        self.service: BalloonService | None = None
        if isinstance(device, Balloon):
            self.service = BalloonService(device, export_dir=export_dir,
                                          is_active=self._driver_attached)
        self._tasks: dict[asyncio.Task[Any], str] = {}
        self._stopped = asyncio.Event()
        self._failure: BaseException | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None
        #: timer wake-ups so far (a figure for tests: an idle daemon makes none)
        self.wakeups = 0
        device.on_change = self._on_device_event

    # -- life cycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self.server = Server(self.socket_path, self.device, sock=self.listen_sock,
                             mode=self.socket_mode, group=self.socket_group)
        self.server.on_activity = self.rearm
        self.supervise(self.server.start(), "vhost-user accept loop")
        if self.control_path is not None:
            if self.service is None:
                raise VballoonError("control-no-service", "this device has no control service")
            from vballoon.control.server import ControlServer
            self.control = ControlServer(self.control_path, self.service,
                                         on_command=self.rearm)
            await self.control.start()
        self.rearm()
        log.info("listening on %s (queues: %d, features offered: %#x)", self.socket_path,
                 self.device.max_queues(), self.device.features())

    def supervise(self, task: "asyncio.Future[Any]", name: str) -> None:
        """Watch a background task: if it ends with an exception, log it and stop the daemon
        with an error (a task of the daemon never dies silently)."""
        t = asyncio.ensure_future(task)
        self._tasks[t] = name
        t.add_done_callback(self._task_done)

    def _task_done(self, t: "asyncio.Task[Any]") -> None:
        name = self._tasks.get(t, "task")
        if t.cancelled():
            return
        exc = t.exception()
        if exc is not None:
            log.error("%s failed; the daemon stops", name, exc_info=exc)
            self._failure = self._failure or exc
            self._stopped.set()

    def stop(self) -> None:
        self._stopped.set()

    async def wait(self) -> None:
        """Until :meth:`stop`; :raise DaemonFailed: a supervised task failed."""
        await self._stopped.wait()
        if self._failure is not None:
            raise DaemonFailed("daemon-task-failed", f"a background task failed: "
                               f"{type(self._failure).__name__}: {self._failure}")

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.control is not None:
            await self.control.close()
            self.control = None
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        if self.server is not None:
            await self.server.close()
            self.server = None
        if self.service is not None:
            self.service.close()

    # -- time ------------------------------------------------------------------------------

    def rearm(self) -> None:
        """Arm the one timer at the device's earliest deadline (or none)."""
        try:
            deadline = self.device.next_deadline()
        except Exception:
            log.exception("next_deadline failed")
            deadline = None
        if deadline == self._deadline and (deadline is None or self._timer is not None):
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._deadline = deadline
        if deadline is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:       # not started yet (or closed): armed at start()
            self._deadline = None
            return
        delay = max(0.0, deadline - self.device.clock())
        self._timer = loop.call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer, self._deadline = None, None
        self.wakeups += 1
        try:
            self.device.handle_timer(self.device.clock())
        except Exception:
            log.exception("the device's timer failed")
        self.rearm()

    # -- events ----------------------------------------------------------------------------

    def _on_device_event(self, event: DeviceEvent) -> None:
        if self.service is not None:
            self.service.handle_event(event)
        self.rearm()

    def _driver_attached(self) -> bool:
        return self.server is not None and self.server.driver_attached


async def serve(socket_path: str | None, *, fd: int | None = None, **kw: Any) -> None:
    """Run until SIGTERM or SIGINT; the sockets made here are removed on the way out.

    The vhost-user socket is the one systemd passed (``LISTEN_FDS``), else the inherited
    ``fd``, else a new one at ``socket_path``.  Readiness and stopping are told to the service
    manager when there is one (``NOTIFY_SOCKET``)."""
    listener = systemd_listener()
    if listener is None and fd is not None:
        listener = listener_from_fd(fd)
    if listener is not None:
        name = listener.getsockname()
        socket_path = name if isinstance(name, str) and name else f"fd {listener.fileno()}"
    if socket_path is None:
        raise ConfigError("socket-missing", "no vhost-user socket: give --socket-path or --fd")
    daemon = Daemon(socket_path, listen_sock=listener, **kw)
    try:
        await daemon.start()
    except BaseException:
        if listener is not None:
            listener.close()
        raise
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.stop)
    print(f"vballoon: ready on {socket_path}", flush=True)
    notify(f"READY=1\nSTATUS=serving {socket_path}")
    try:
        await daemon.wait()
        log.info("stopping")
    finally:
        notify("STOPPING=1")
        await daemon.close()
