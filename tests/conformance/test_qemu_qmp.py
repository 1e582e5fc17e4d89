"""The control socket against an independent QMP client: QEMU's own ``qemu.qmp`` (PyPI
``qemu.qmp``), which knows nothing of vballoon -- and vballoon's synchronous client, used from a
thread as a migration script would."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
from qemu.qmp import ExecuteError, QMPClient

from vballoon.control import server as control
from vballoon.control.client import Client, QMPCommandError, QMPConnectionError

GiB, MiB = 1 << 30, 1 << 20


@pytest.fixture
async def qmp(daemon):
    client = QMPClient("vballoon-conformance")
    await client.connect(daemon.control_path)       # greeting + qmp_capabilities
    yield client
    await client.disconnect()


async def test_qemu_qmp_connects_reads_the_greeting_and_negotiates(qmp):
    assert qmp.greeting.QMP.version == control.version_info()
    assert list(qmp.greeting.QMP.capabilities) == []
    assert await qmp.execute("query-version") == control.version_info()
    names = {c["name"] for c in await qmp.execute("query-commands")}
    assert {"qmp_capabilities", "balloon", "query-balloon"} <= names


async def test_qemu_qmp_sees_qemus_error_classes(qmp, daemon):
    with pytest.raises(ExecuteError) as e:
        await qmp.execute("query-balloon")
    assert e.value.error_class == "DeviceNotActive"
    assert str(e.value) == "No balloon device has been activated"
    with pytest.raises(ExecuteError) as e:
        await qmp.execute("cont")
    assert e.value.error_class == "CommandNotFound"
    with pytest.raises(ExecuteError) as e:
        await qmp.execute("balloon", {"value": "1G"})
    assert (e.value.error_class, str(e.value)) == \
        ("GenericError", "Invalid parameter type for 'value', expected: integer")
    with pytest.raises(ExecuteError) as e:
        await qmp.execute("qmp_capabilities")
    assert e.value.error_class == "CommandNotFound"


async def test_qemu_qmp_balloon_query_balloon_and_balloon_change(qmp, guest):
    g, _ = guest
    assert await qmp.execute("query-balloon") == {"actual": 2 * GiB}
    assert await qmp.execute("balloon", {"value": 2 * GiB - 32 * MiB}) == {}
    await g.fe.wait_config_change()
    await g.balance()
    ev = await asyncio.wait_for(qmp.events.get(), 30)
    assert ev["event"] == "BALLOON_CHANGE" and ev["data"] == {"actual": 2 * GiB - 32 * MiB}
    assert isinstance(ev["timestamp"]["seconds"], int)
    assert await qmp.execute("query-balloon") == {"actual": 2 * GiB - 32 * MiB}


async def test_qemu_qmp_runs_a_free_page_round_and_hears_it_end(qmp, guest, daemon):
    g, model = guest
    with qmp.listener("FREE_PAGE_ROUND_COMPLETED") as done:
        info = await qmp.execute("start-free-page-round", {"kind": "bitmap"})
        assert info["state"] == "requested"
        await g.answer_bitmap_request(model)
        ev = await asyncio.wait_for(done.get(), 30)
    assert ev["data"]["id"] == info["id"] and ev["data"]["complete"] is True
    q = await qmp.execute("query-free-page-round", {"id": info["id"], "ranges": True,
                                                    "max-ranges": 5})
    assert q["free-pages"] == model.free_pages() and len(q["ranges"]) == 5
    e = await qmp.execute("export-free-page-map", {"filename": "m", "format": "ranges"})
    assert e["ranges"] == q["range-count"] and e["path"].startswith(daemon.export_dir)


async def test_qemu_qmp_raw_execution_with_ids(qmp):
    reply = await qmp.execute_msg(qmp.make_execute_msg("query-version"))
    assert reply == control.version_info()


# -- vballoon's own synchronous client, as a migration script uses it ----------------------------

async def test_the_sync_client_from_a_thread_runs_a_round(daemon, guest):
    g, model = guest
    loop = asyncio.get_running_loop()
    requested = asyncio.Event()

    def migration_script() -> tuple:
        with Client(daemon.control_path) as vb:
            assert vb.version == control.version_info()
            r = vb.start_round("bitmap")
            loop.call_soon_threadsafe(requested.set)          # the guest may answer now
            done = vb.wait_round(r.id, timeout=30)
            return done, vb.free_ranges(r.id), vb.query_balloon()

    async def guest_side() -> None:
        await requested.wait()
        await g.answer_bitmap_request(model)

    (done, ranges, balloon), _ = await asyncio.gather(asyncio.to_thread(migration_script),
                                                      guest_side())
    assert done.state == "done" and done.complete
    assert np.array_equal(ranges, daemon.service.get_round(done.id).map.ranges())
    assert balloon.actual == 2 * GiB


async def test_the_sync_client_raises_typed_errors(no_fd_leak, daemon, tmp_path):
    def script() -> None:
        with Client(daemon.control_path) as vb:
            with pytest.raises(QMPCommandError) as e:
                vb.query_balloon()
            assert (e.value.error_class, e.value.command) == ("DeviceNotActive", "query-balloon")
            with pytest.raises(QMPCommandError) as e:
                vb.execute("no-such-command")
            assert e.value.error_class == "CommandNotFound"
        with pytest.raises(QMPConnectionError, match="cannot connect"):
            Client(str(tmp_path / "nothing-here"))

    await asyncio.to_thread(script)
