"""The harness itself, proven against QEMU's built-in virtio-balloon-pci."""

from __future__ import annotations

import os

import pytest
from harness import Guest, GuestError, wait_until

pytestmark = pytest.mark.qemu

MiB = 1 << 20
BALLOON = 5  # virtio device id
VERSION_1, STATS_VQ, FREE_PAGE_HINT, REPORTING = 32, 1, 3, 5
BUILTIN_BALLOON = [
    "-object", "iothread,id=io0",  # free-page-hint=on requires an iothread
    "-device", "virtio-balloon-pci,id=bal0,iothread=io0,free-page-reporting=on,free-page-hint=on",
]  # fmt: skip


def the_balloon(devices):
    [balloon] = [d for d in devices if d.device == BALLOON]
    return balloon


async def test_guest_boots_and_binds_virtio_balloon(make_guest):
    g = await make_guest(BUILTIN_BALLOON)
    assert g.insmod_rc == 0
    assert g.kernel_release.startswith("6.")
    balloon = the_balloon(await g.virtio_devices())
    assert balloon.driver == "virtio_balloon"
    assert balloon.status == 0xF  # ... | DRIVER_OK
    assert {VERSION_1, STATS_VQ, FREE_PAGE_HINT, REPORTING} <= balloon.features
    info = await g.meminfo()
    assert 400 * 1024 < info["MemTotal"] <= 512 * 1024
    assert 0 < info["MemFree"] < info["MemTotal"]


async def test_run_returns_exact_output_and_exit_status(make_guest):
    g = await make_guest()
    assert await g.run("echo out; echo err >&2; exit 3") == (3, "out\nerr\n")
    assert await g.run("printf 'no newline'") == (0, "no newline")
    assert await g.run("""echo "$((6 * 7))" '$HOME' "a  b" \\\\""") == (0, "42 $HOME a  b \\\n")
    assert await g.run("true") == (0, "")
    assert await g.check("cat /proc/sys/kernel/random/boot_id") == g.boot_id + "\n"
    with pytest.raises(GuestError, match="exited 1"):
        await g.check("false")
    with pytest.raises(ValueError):
        await g.run("echo a\necho b")


async def test_qmp_balloon_shrinks_guest_memtotal(make_guest):
    g = await make_guest(BUILTIN_BALLOON, qmp=True)
    before = (await g.meminfo())["MemTotal"]
    await g.qmp.execute("balloon", {"value": 256 * MiB})
    # QEMU emits BALLOON_CHANGE (rate-limited, last value always delivered) as the
    # guest reports `actual`; the driver shrinks MemTotal before reporting it.
    await g.qmp.wait_event("BALLOON_CHANGE", match=lambda d: d["actual"] == 256 * MiB)
    assert await g.qmp.execute("query-balloon") == {"actual": 256 * MiB}
    after = (await g.meminfo())["MemTotal"]
    assert before - after == 256 * 1024  # kB


async def test_ram_allocated_bytes_follows_guest_writes_and_reported_frees(make_guest):
    g = await make_guest(BUILTIN_BALLOON)
    assert os.readlink(g.memfd_path()).startswith("/memfd:")
    assert 0 < g.ram_allocated_bytes() <= 512 * MiB
    await g.dirty(192, keep=True)
    assert g.ram_allocated_bytes() >= 192 * MiB  # those pages are written and in use
    high = g.ram_allocated_bytes()
    await g.run("rm /tmp/vb-dirty")
    # Free page reporting: the guest reports the freed pages (after ~2 s) and
    # QEMU discards them from the memfd. No event for that, so poll the host.
    await wait_until(
        lambda: g.ram_allocated_bytes() <= high - 128 * MiB,
        timeout=30,
        what="reported free pages discarded from the memfd",
    )


async def test_reboot_brings_the_driver_back(make_guest):
    g = await make_guest(BUILTIN_BALLOON)
    first = g.boot_id
    await g.dirty(1)
    assert await g.reboot() != first
    assert g.insmod_rc == 0
    assert the_balloon(await g.virtio_devices()).driver == "virtio_balloon"
    assert await g.run("echo again") == (0, "again\n")


async def test_poweroff_ends_qemu(make_guest):
    g = await make_guest(BUILTIN_BALLOON)
    assert await g.poweroff() == 0
    assert not os.path.exists(f"/proc/{g.pid}")


async def test_qemu_startup_failure_is_reported_with_its_stderr(lab):
    with pytest.raises(GuestError, match="no-such-device"):
        async with Guest(lab, ["-device", "no-such-device"], qmp=True):
            pass
    with pytest.raises(GuestError, match="no-such-device"):
        async with Guest(lab, ["-device", "no-such-device"]):
            pass
