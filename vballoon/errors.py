"""The exception tree.  Every error names the rule that was broken and who broke it.

    VballoonError
     +- FrontendError     a vhost-user front-end broke the protocol (message, fd, state)
     +- GuestError        the guest broke the virtio spec (ring, descriptor chain, buffer)
     |   +- GuestMemoryError   an address or length outside the guest's memory
     +- ConfigError       bad command-line or API input
         +- DeviceNotActive   no guest driver is attached (QEMU's error class of that name)
"""
from __future__ import annotations


class VballoonError(Exception):
    """Root of vballoon's errors.  ``rule`` is a short stable name for tests and logs."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(f"{rule}: {message}")
        self.rule = rule


class FrontendError(VballoonError):
    """The vhost-user front-end sent something the protocol forbids."""


class GuestError(VballoonError):
    """The guest's driver broke the virtio spec; the queue it used is marked broken."""


class GuestMemoryError(GuestError):
    """An access outside the memory the front-end shared."""


class ConfigError(VballoonError, ValueError):
    """Bad input from the command line or the Python API."""


class DeviceNotActive(ConfigError):
    """No guest driver is attached (QEMU's error class of the same name)."""

    def __init__(self) -> None:
        super().__init__("device-not-active", "No balloon device has been activated")
