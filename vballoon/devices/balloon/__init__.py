from vballoon.devices.balloon.device import Balloon

__all__ = ["Balloon"]
