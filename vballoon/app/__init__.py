"""The program: the daemon that serves a device, the balloon's service API, the command
line (``vballoon serve``, ``ctl``, ``demo``).  The top layer: everything else is below it."""
