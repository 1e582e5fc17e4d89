"""vhost-user, back-end side (QEMU ``docs/interop/vhost-user.rst``).

``session``: the protocol as a sans-IO state machine (a message and its fds in; a reply and
typed actions out).  ``transport``: the asyncio edge that reads and writes the Unix socket,
passes fds, watches kick eventfds and carries the session's actions out.  The device behind a
session is a :class:`vballoon.virtio.device.Device`; this layer never sees a balloon.
"""
