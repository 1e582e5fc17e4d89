"""The virtio-balloon device, in parts (see :mod:`vballoon.devices.balloon.device`)."""
from vballoon.devices.balloon.device import FEATURE_NAMES, Balloon, queue_roles
from vballoon.devices.balloon.events import (ActualChanged, RoundEnded, RoundStarted,
                                             StatsUpdated)

__all__ = ["ActualChanged", "Balloon", "FEATURE_NAMES", "RoundEnded", "RoundStarted",
           "StatsUpdated", "queue_roles"]
