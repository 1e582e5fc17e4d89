"""Rate limit for logs a guest or front-end can trigger at will.

A log record whose message starts with a rule name (``inflate-pfn-outside-ram: ...``, the
convention of every error vballoon logs about its peers) is counted per (logger, rule): the
first :data:`BURST` pass; after that at most one per :data:`INTERVAL` seconds, carrying how many
were suppressed since the last one.  A rule quiet for :data:`QUIET` seconds starts afresh.
"""
from __future__ import annotations

import logging
import re
import time
from typing import Callable

BURST = 10
INTERVAL = 1.0
QUIET = 60.0
_RULE = re.compile(r"([a-z0-9]+(?:-[a-z0-9]+)+):")


class RuleRateLimit(logging.Filter):
    def __init__(self, burst: int = BURST, interval: float = INTERVAL, quiet: float = QUIET,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.burst, self.interval, self.quiet, self.clock = burst, interval, quiet, clock
        # (logger, rule) -> [count, last passed, suppressed since, last seen]
        self._seen: dict[tuple[str, str], list] = {}

        self.suppressed = 0            # records dropped, all rules

    def admit(self, key: tuple[str, str]) -> int | None:
        """One more message of ``key`` (logger, rule): None if it is to be dropped, else how
        many like it were dropped since the last one that passed."""
        now = self.clock()
        st = self._seen.get(key)
        if st is None or now - st[3] >= self.quiet:
            if len(self._seen) > 4096:
                self._seen.clear()
            st = self._seen[key] = [0, now, 0, now]
        st[0] += 1
        st[3] = now
        if st[0] <= self.burst:
            st[1] = now
            return 0
        if now - st[1] >= self.interval:
            dropped = st[2]
            st[1], st[2] = now, 0
            return dropped
        st[2] += 1
        self.suppressed += 1
        return None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        try:
            text = record.getMessage()
        except Exception:
            return True
        m = _RULE.match(text)
        if m is None:
            return True
        dropped = self.admit((record.name, m.group(1)))
        if dropped is None:
            return False
        if dropped:
            record.msg, record.args = f"{text} [{dropped} more like this suppressed]", None
        return True


PEER_LOGGERS = ("vballoon.vhost.session", "vballoon.vhost.transport", "vballoon.virtio.virtqueue")


def install_rate_limit(*logger_names: str) -> Callable[[], None]:
    """Put one :class:`RuleRateLimit` on each named logger and on vballoon's peer-facing
    loggers (the session, the transport, the virtqueue); returns the function that removes it."""
    flt = RuleRateLimit()
    loggers = [logging.getLogger(n) for n in {*PEER_LOGGERS, *logger_names}]
    for lg in loggers:
        lg.addFilter(flt)

    def remove() -> None:
        for lg in loggers:
            lg.removeFilter(flt)
    return remove
