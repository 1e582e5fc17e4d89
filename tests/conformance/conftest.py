"""The daemon with a control socket, and a loopback guest, for the conformance tests."""
from __future__ import annotations

import pytest
from vbtest import GiB, attached_guest


@pytest.fixture
async def guest(daemon):
    """A 2 GiB guest with the reference driver, attached over the loopback front-end."""
    async with attached_guest(daemon, 2 * GiB, seed=4) as g:
        yield g
