"""The round registry: the last :data:`ROUNDS_KEPT` free-page rounds of both kinds, by id.

An id is either a bitmap request id (from 1, growing) or a hint cmd_id (from 0x80000000), so
the two never collide.  A round evicted from the registry is gone for queries ("no round N"),
but nothing else depends on it: the queue that runs a round holds it itself.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterator

from vballoon.errors import ConfigError
from vballoon.fpmap.rounds import Round

ROUNDS_KEPT = 4        # rounds kept for queries and exports (each holds its map)


class RoundRegistry:
    def __init__(self, kept: int = ROUNDS_KEPT) -> None:
        self.kept = kept
        self._rounds: OrderedDict[int, Round] = OrderedDict()
        self.next_bitmap_id = 1        # above every bitmap request id ever issued

    def remember(self, r: Round) -> None:
        self._rounds.pop(r.id, None)
        self._rounds[r.id] = r
        while len(self._rounds) > self.kept:
            self._rounds.popitem(last=False)
        if r.kind == "bitmap":
            self.next_bitmap_id = max(self.next_bitmap_id, r.id + 1)

    def get(self, round_id: int | None = None) -> Round:
        """Round ``round_id``, or the latest.  :raise ConfigError: ``round-unknown``."""
        if round_id is None:
            if not self._rounds:
                raise ConfigError("round-unknown", "no free page round has been started")
            return next(reversed(self._rounds.values()))
        r = self._rounds.get(round_id)
        if r is None:
            raise ConfigError("round-unknown", f"no round {round_id} (known: "
                              f"{', '.join(map(str, self._rounds)) or 'none'})")
        return r

    def find(self, round_id: int) -> Round | None:
        return self._rounds.get(round_id)

    def __getitem__(self, round_id: int) -> Round:
        return self._rounds[round_id]

    def __contains__(self, round_id: object) -> bool:
        return round_id in self._rounds

    def __iter__(self) -> Iterator[int]:
        return iter(list(self._rounds))

    def __len__(self) -> int:
        return len(self._rounds)

    def values(self) -> list[Round]:
        return list(self._rounds.values())
