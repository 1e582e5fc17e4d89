"""Virtio devices served by the daemon: each one a :class:`vballoon.virtio.device.Device`."""
