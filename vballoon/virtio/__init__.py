"""Virtio, device side: guest memory, split virtqueues, and the device base class.

``memory``: the memory table mapped, and the one bounds-checked guest-memory access path.
``virtqueue``: descriptor chains (walked in C, ``_vring_build.py``), the used ring, EVENT_IDX.
``device``: what a device implements (features, config, queues) and the typed events it emits.
Nothing here knows vhost-user messages or what a particular device does.
"""
