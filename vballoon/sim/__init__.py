"""A vhost-user front-end and a guest driver in Python, for tests, the demo and benchmarks.

Real vhost-user over a real Unix socket, guest RAM in a real memfd, real eventfds: the daemon
cannot tell it from QEMU (it follows the message sequences QEMU 11.1 sends), and every test
runs without QEMU.  Its framing, ring layout and queue numbering are written here from the
specs, not taken from the daemon's code, so the two sides can disagree in a test.
"""
from vballoon.sim.driver import DriverQueue, GuestRam
from vballoon.sim.frontend import Frontend

__all__ = ["DriverQueue", "Frontend", "GuestRam"]
