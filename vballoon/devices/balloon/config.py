"""Config space (VIRTIO 1.2 §5.5.4): the target (``num_pages``), the driver's ``actual``, the
free page hint ``cmd_id`` and ``poison_val``.  Little-endian le32 fields, 16 bytes."""
from __future__ import annotations

import logging
from collections import deque

from vballoon.devices.balloon.context import BalloonContext
from vballoon.devices.balloon.events import ActualChanged
from vballoon.errors import ConfigError
from vballoon.wire import BALLOON_CONFIG


log = logging.getLogger(__name__)

EXPOSED_KEPT = 8      # values of num_pages / cmd_id the driver may still write back


class ConfigSpace:
    def __init__(self, dev: BalloonContext) -> None:
        self.dev = dev
        self.num_pages = 0
        self.actual = 0
        self.cmd_id = 0
        self.poison_val = 0
        self._exposed_num_pages: deque[int] = deque([0], maxlen=EXPOSED_KEPT)
        self._exposed_cmd_ids: deque[int] = deque([0], maxlen=EXPOSED_KEPT)

    def get(self) -> bytes:
        return BALLOON_CONFIG.pack(self.num_pages, self.actual, self.cmd_id, self.poison_val)

    def set(self, offset: int, data: bytes, migration: bool) -> None:
        new = bytearray(self.get())
        new[offset:offset + len(data)] = data
        cfg = BALLOON_CONFIG.unpack(bytes(new))
        if migration:      # the front-end restores the whole config on the destination
            self.num_pages, self.cmd_id = cfg.num_pages, cfg.free_page_hint_cmd_id
        else:
            # QEMU writes back the whole config as it last read it, so an old num_pages or
            # cmd_id is the driver's stale copy, not a write; anything else is refused.
            for name, value, exposed in (("num_pages", cfg.num_pages, self._exposed_num_pages),
                                         ("free_page_hint_cmd_id", cfg.free_page_hint_cmd_id,
                                          self._exposed_cmd_ids)):
                if value not in exposed:
                    self.dev.glog.error("config-readonly-field", "the driver wrote %s=%#x; "
                                        "ignored", name, value)
        if cfg.poison_val != self.poison_val:
            self.poison_val = cfg.poison_val
            log.info("poison_val = %#x", self.poison_val)
        if cfg.actual != self.actual:
            self.actual = cfg.actual
            self.dev.emit(ActualChanged(self.actual))

    def set_target(self, num_pages: int, ram_pages: int) -> None:
        if not 0 <= num_pages <= 0xFFFFFFFF:
            raise ConfigError("target-range", f"target {num_pages} pages is not a le32")
        if ram_pages and num_pages > ram_pages:
            raise ConfigError("target-range", f"target {num_pages} pages exceeds guest RAM "
                              f"({ram_pages} pages)")
        self.num_pages = num_pages
        self._exposed_num_pages.append(num_pages)
        self.dev.config_changed()

    def set_cmd_id(self, cmd_id: int) -> None:
        self.cmd_id = cmd_id
        self._exposed_cmd_ids.append(cmd_id)
        self.dev.config_changed()

    def driver_restarted(self) -> None:
        # A new driver starts with actual = 0 and no hint round; the target stays.
        self.cmd_id = 0
        self.actual = 0
