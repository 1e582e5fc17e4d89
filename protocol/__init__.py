"""Wire layouts of vballoon, as C declarations (installed as ``vballoon.protocol``).

The ``*.h`` files here are the single source of every struct the daemon reads or writes;
``vballoon.wire`` loads them through cffi.  The ``*.md`` files are the prose specifications.
"""
