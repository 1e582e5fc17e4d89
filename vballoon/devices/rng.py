"""virtio-rng (virtio id 4; VIRTIO 1.2 §5.4): the smallest useful device, and the proof that
the daemon serves any :class:`~vballoon.virtio.device.Device`, not only the balloon.

One queue (``requestq``).  The driver posts device-writable buffers; the device fills each with
bytes from the kernel's CSPRNG and returns it with the length written.  No feature bits, no
config space.  QEMU: ``-device vhost-user-test-device-pci,chardev=...,virtio-id=4,num_vqs=1``.
"""
from __future__ import annotations

import os

from vballoon.errors import GuestError
from vballoon.virtio.device import ChainBatch, Device
from vballoon.virtio.memory import GuestMemory
from vballoon.virtio.virtqueue import VirtQueue

MAX_REQUEST = 64 << 10      # bytes filled per buffer; a driver asking for more gets this much


class Rng(Device):
    device_id = 4           # VIRTIO_ID_RNG

    def __init__(self) -> None:
        super().__init__()
        self.bytes_served = 0
        self.handlers = {"request": self._request}

    def queue_roles(self, features: int) -> list[str]:
        return ["request"]

    def _request(self, vq: VirtQueue, mem: GuestMemory) -> bool:
        batch = ChainBatch(vq, mem)
        for chain in batch:
            if chain.readable:
                raise GuestError("rng-readable-buffer", f"queue {vq.index} chain {chain.head}: "
                                 "requestq buffers are device-writable only")
            want = min(sum(b.len for b in chain.writable), MAX_REQUEST)
            written = chain.write(mem, os.getrandom(want)) if want else 0
            self.bytes_served += written
            vq.push(chain, written)
        return batch.more
