"""The operator's ways of running vballoon, with a real QEMU and guest:

* systemd socket activation, by systemd's own tool (`systemd-socket-activate`): the socket
  exists before the daemon, QEMU's connection starts it, it serves the inherited socket;
* the libvirt domain of `examples/libvirt/vballoon-domain.xml`, converted to the QEMU command
  line it stands for (memory, shared memfd backing, no built-in balloon, the
  `<qemu:commandline>` chardev and device) and booted: the guest's balloon driver binds to
  vballoon and inflates on `vballoon ctl balloon`.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
DOMAIN = REPO / "examples" / "libvirt" / "vballoon-domain.xml"
QEMU_NS = "{http://libvirt.org/schemas/domain/qemu/1.0}"
MiB = 1 << 20
UNITS = {"KiB": 1 << 10, "MiB": MiB, "GiB": 1 << 30}


def domain_to_qemu(xml: str, *, socket: str, mem_mib: int | None = None) -> tuple[int, list[str]]:
    """The guest RAM (MiB) and the QEMU arguments a libvirt domain of this shape stands for:
    checks what vballoon needs of it and returns its `<qemu:commandline>` with the socket
    path replaced.  (libvirt is not installed here; this is the part of its conversion that
    concerns vballoon.)"""
    root = ET.fromstring(xml)
    mem = root.find("memory")
    assert mem is not None
    ram_mib = int(mem.text) * UNITS[mem.get("unit", "KiB")] // MiB
    backing = root.find("memoryBacking")
    assert backing is not None and backing.find("source").get("type") == "memfd"
    assert backing.find("access").get("mode") == "shared"           # vhost-user needs it
    assert root.find("devices/memballoon").get("model") == "none"    # no second balloon
    args = [a.get("value") for a in root.findall(f"{QEMU_NS}commandline/{QEMU_NS}arg")]
    chardev = args[args.index("-chardev") + 1]
    opts = dict(kv.split("=", 1) for kv in chardev.split(",")[1:])
    args[args.index("-chardev") + 1] = chardev.replace(f"path={opts['path']}", f"path={socket}")
    device = args[args.index("-device") + 1]
    assert device.startswith("vhost-user-test-device-pci,") and "virtio-id=5" in device
    assert f"chardev={opts['id']}" in device
    return (mem_mib or ram_mib), args


def test_the_domain_is_what_vballoon_needs():
    mib, args = domain_to_qemu(DOMAIN.read_text(), socket="/run/x.sock")
    assert mib == 4096 and "socket,id=vballoon,path=/run/x.sock" in args


async def test_socket_activated_daemon_serves_the_libvirt_domain(lab, make_guest, tmp_path,
                                                                 qemu_report):
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed")
    sock, ctl = str(tmp_path / "vb.sock"), str(tmp_path / "ctl.sock")
    vballoon = str(Path(sys.executable).parent / "vballoon")
    # systemd makes the socket; the daemon starts at QEMU's first connection
    act = await asyncio.create_subprocess_exec(
        activate, "-l", sock, vballoon, "serve", "--control-socket", ctl,
        "--stats-interval", "0", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        for _ in range(200):
            if os.path.exists(sock):
                break
            await asyncio.sleep(0.05)
        assert os.path.exists(sock), "systemd-socket-activate made no socket"
        # QEMU's guest RAM is smaller than the example's 4 GiB: this is TCG on a small host
        _, args = domain_to_qemu(DOMAIN.read_text(), socket=sock)
        g = await make_guest(args, label="libvirt domain, socket-activated vballoon")
        out = await g.check("cat /sys/bus/virtio/drivers/virtio_balloon/*/features 2>/dev/null"
                            " || ls /sys/bus/virtio/drivers/virtio_balloon/")
        assert out.strip(), "the guest's balloon driver did not bind"
        ram = g.mem_mib * MiB
        env = {**os.environ, "VBALLOON_CONTROL_SOCKET": ctl}
        for _ in range(100):                 # the daemon started at QEMU's connection
            if os.path.exists(ctl):
                break
            await asyncio.sleep(0.1)
        p = await asyncio.create_subprocess_exec(
            vballoon, "ctl", "balloon", str(ram - 32 * MiB), env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = await p.communicate()
        assert p.returncode == 0, out.decode()
        for _ in range(200):
            vm = await g.vmstat()
            if vm.get("balloon_inflate", 0) >= 8192:
                break
            await asyncio.sleep(0.1)
        assert (await g.vmstat())["balloon_inflate"] >= 8192          # 32 MiB in 4 KiB pages
        qemu_report.line("operators: systemd-socket-activate + libvirt domain: the guest "
                         "inflated 32 MiB on `vballoon ctl balloon`")
        assert await g.poweroff() == 0
    finally:
        if act.returncode is None:
            act.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(act.wait(), 15)
            except TimeoutError:
                act.kill()
                await act.wait()
        log = (await act.stdout.read()).decode(errors="replace")
    assert "Traceback" not in log, log
