"""Free-page maps: the map of one round, the bitmap queue's round protocol, exports, pictures.

The layer between the balloon device (which feeds it guest chains) and everything that reads
maps (the control socket, exports, migration engines).  It knows the wire layouts and nothing
of vhost-user or virtqueues.
"""
from vballoon.fpmap.map import FreePageMap
from vballoon.fpmap.rounds import BitmapRounds, Round, RoundState, Verdict

__all__ = ["BitmapRounds", "FreePageMap", "Round", "RoundState", "Verdict"]
