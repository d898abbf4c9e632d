"""NVIDIA hotplug without restarts, on the stand-in NVML that enumerates at init only, as the
driver's library does: a GPU bound after a worker's nvmlInit is found by a fresh enumeration in a
new worker while the other GPUs' watch goes on, one NVML never finds backs off, and a driver
reload (every GPU unbound, then bound again) is a rebind."""

from __future__ import annotations

import time
from collections.abc import Callable

import psutil
import pytest

from monitor.sim.nvml import FakeGpu, FakeNvml
from monitor.sim.umockdev import Simulator
from monitor.wire.mirror import Mirror
from tests.conftest import Daemon, Subscription
from tests.host.test_nvml import (
    UUID_A,
    UUID_B,
    A,
    B,
    device,
    enriched,
    gpus,
    healthy,
    hosts,
    launch,
    nvml,
    value,
)

pytestmark = pytest.mark.umockdev
__all__ = ["hosts", "launch", "nvml"]  # fixtures shared with test_nvml

C = "0000:bb:00.0"
UUID_C = "GPU-0c0c0c0c-9999-aaaa-bbbb-cccccccccccc"
NVML_NAME = "NVIDIA H100 80GB HBM3"


def workers(daemon: Daemon) -> list[psutil.Process]:
    return psutil.Process(daemon.process.pid).children()


def test_a_hot_added_gpu_gets_nvmls_facts_and_the_others_watch_goes_on(
    launch: Callable[..., Daemon],
    hosts: Simulator,
    nvml: FakeNvml,
    subscribe: Callable[[Daemon], Subscription],
) -> None:
    daemon = launch()
    sub = subscribe(daemon)
    sub.until(enriched)
    [first] = workers(daemon)
    stats = daemon.client()
    first_sample = stats.call("stats", {"interval": 1})
    samples = stats.notifications("stats")
    nvml.set_gpus([*gpus(), FakeGpu(bus_id=C, uuid=UUID_C, minor=2)])  # the GPU is plugged in
    hosts.add("nvidia-h100", C, 1)  # and the kernel binds nvidia to it
    nvml.xid(B, 48)  # while the new worker enumerates: the watching one reports it
    mirror = sub.until(lambda m: value(m, C, "uuid") == UUID_C and healthy(m, B) is False)
    assert device(mirror, C)["healthy"] is True
    assert mirror.devices()[C][0] == f"nvidia/gpu/{NVML_NAME}"  # NVML's name, not the database's
    assert value(mirror, B, "xid_count") == 1 and value(mirror, B, "last_xid") == 48
    nvml.xid(A, 48)  # the first worker still watches A
    mirror = sub.until(lambda m: healthy(m, A) is False)
    assert value(mirror, A, "xid_count") == 1
    nvml.xid(C, 13)  # and the new one C
    mirror = sub.until(lambda m: value(m, C, "last_xid") == 13)
    assert value(mirror, C, "xid_count") == 1
    assert first.is_running() and first in workers(daemon) and len(workers(daemon)) == 2
    log = daemon.log()
    assert f"{C}: not in NVML's enumeration; starting a fresh one" in log
    for address in (A, B):  # nothing said of the others but their XIDs
        assert not [
            line
            for line in log.splitlines()
            if address in line and ("not responding" in line or "crashed" in line)
        ]
    assert " removed" not in log and "NVML cannot watch" not in log
    # statistics come from both workers, and no sample missed A or B meanwhile
    sample = first_sample
    while C not in sample["devices"]:
        assert {A, B} <= set(sample["devices"]), sample
        sample = next(samples)
    assert {A, B} <= set(sample["devices"])
    stats.close()


def test_a_gpu_nvml_never_finds_backs_off_and_is_said_once(
    launch: Callable[..., Daemon],
    hosts: Simulator,
    subscribe: Callable[[Daemon], Subscription],
) -> None:
    daemon = launch()
    sub = subscribe(daemon)
    sub.until(enriched)
    hosts.add("nvidia-h100", C, 1)  # bound to nvidia, and in no NVML enumeration
    mirror = sub.until(lambda m: healthy(m, C) is False, timeout=15)
    assert device(mirror, C)["health_desc"].startswith(
        "NVML cannot watch this GPU: NVML does not find it (NVML: Not Found)"
    )
    time.sleep(6.5)  # past the first retry (5 s)
    log = daemon.log()
    assert log.count(f"{C}: NVML cannot watch this GPU") == 1  # said once
    assert log.count(f"{C}: not in NVML's enumeration; starting a fresh one") == 1
    # the retry started one worker that ended when it did not find it either: no loop
    assert len(workers(daemon)) <= 2
    assert healthy(Mirror(daemon.fingerprint()), A) is True


def test_a_driver_reload_is_a_rebind_and_no_gpu_is_lost(
    launch: Callable[..., Daemon],
    hosts: Simulator,
    subscribe: Callable[[Daemon], Subscription],
) -> None:
    daemon = launch()
    sub = subscribe(daemon)
    sub.until(enriched)
    [before] = workers(daemon)
    start = len(daemon.log())
    for address in (A, B):  # rmmod nvidia
        hosts.unbind(address)
    sub.until(lambda m: healthy(m, A) is False and healthy(m, B) is False)
    before.wait(timeout=5)  # no GPU on nvidia: NVML let go, so the module can be unloaded
    seen = [set(sub.mirror.devices())]
    for address in (A, B):  # modprobe nvidia
        hosts.bind(address)

    def back(m: Mirror) -> bool:
        seen.append(set(m.devices()))
        return enriched(m) and healthy(m, A) is True and healthy(m, B) is True

    mirror = sub.until(back)
    assert all({A, B} <= shown for shown in seen), "a GPU left the snapshot during the reload"
    assert mirror.devices()[A][0] == mirror.devices()[B][0] == f"nvidia/gpu/{NVML_NAME}"
    assert value(mirror, A, "uuid") == UUID_A and value(mirror, B, "uuid") == UUID_B
    log = daemon.log()[start:]
    assert "removed" not in log and "is here" not in log  # neither a removal nor an add
    assert "is lost" not in log and "fallen off the bus" not in log
    assert log.count("is unhealthy: no kernel driver bound") == 2
    assert log.count("is healthy again") == 2
