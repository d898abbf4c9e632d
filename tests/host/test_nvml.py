"""NVIDIA health end to end: the daemon on simulated GPUs (umockdev) with the real nvidia-ml-py
bindings loading the stand-in libnvidia-ml.so.1 (monitor/sim/nvml.py), driven by XIDs, lost GPUs and
hanging calls."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from monitor.sim.nvml import EVENT_GPU_RECOVERY_ACTION, FakeGpu, FakeNvml
from monitor.sim.umockdev import Simulator
from monitor.wire.errors import RpcError
from monitor.wire.mirror import Mirror
from tests.conftest import Daemon, Subscription
from tests.reliability import record
from tests.waiting import wait_until

pytestmark = pytest.mark.umockdev

A, B = "0000:3b:00.0", "0000:86:00.0"
UUID_A = "GPU-0a0a0a0a-1111-2222-3333-444444444444"
UUID_B = "GPU-0b0b0b0b-5555-6666-7777-888888888888"
H100 = "nvidia/gpu/NVIDIA H100 80GB HBM3"


def gpus(**a: Any) -> list[FakeGpu]:
    return [FakeGpu(bus_id=A, uuid=UUID_A, minor=0, **a), FakeGpu(bus_id=B, uuid=UUID_B, minor=1)]


@pytest.fixture
def nvml(tmp_path: Path, nvml_lib: Path) -> FakeNvml:
    return FakeNvml(tmp_path / "nvml", nvml_lib, gpus())


@pytest.fixture
def hosts(sim: Simulator) -> Simulator:
    sim.add("nvidia-h100", A, 0)
    sim.add("nvidia-h100", B, 1)
    return sim


@pytest.fixture
def launch(
    hosts: Simulator, nvml: FakeNvml, start_daemon: Callable[..., Daemon]
) -> Iterator[Callable[..., Daemon]]:
    def start(*args: str) -> Daemon:
        """The daemon with NVML's default deadline: it is also how long a GPU waits for NVML's
        name, and a shorter one lets a slow start of the NVML worker (a loaded CI machine) show
        the GPUs under the hardware database's names for good."""
        env = {**hosts.daemon_env(), **nvml.env()}
        return start_daemon("--udev-source", "udev", *args, env=env, nvml=True)

    yield start


def device(mirror: Mirror, address: str) -> dict[str, Any]:
    found = mirror.devices().get(address)
    return found[1] if found else {}


def value(mirror: Mirror, address: str, name: str) -> Any:
    return device(mirror, address).get("attributes", {}).get(name, {}).get("value")


def healthy(mirror: Mirror, address: str) -> bool | None:
    answer = device(mirror, address).get("healthy")
    return None if answer is None else bool(answer)


def enriched(mirror: Mirror) -> bool:
    return bool(value(mirror, A, "uuid") == UUID_A and value(mirror, B, "uuid") == UUID_B)


def test_nvml_enriches_the_fingerprint_and_a_driver_upgrade_is_a_patch(
    launch: Callable[..., Daemon],
    hosts: Simulator,
    nvml: FakeNvml,
    subscribe: Callable[[Daemon], Subscription],
) -> None:
    daemon = launch()
    sub = subscribe(daemon)
    mirror = sub.until(enriched)
    group = mirror.snapshot["groups"][H100]
    assert (group["vendor"], group["type"], group["name"]) == ("nvidia", "gpu", H100.split("/")[2])
    shared = group["attributes"]
    assert shared["memory"] == {"value": 81559, "unit": "MiB"}
    assert shared["bar1"] == {"value": 131072, "unit": "MiB"}
    assert shared["power"] == {"value": 700, "unit": "W"}
    assert shared["cores_clock"] == {"value": 1980, "unit": "MHz"}
    assert shared["memory_clock"] == {"value": 2619, "unit": "MHz"}
    assert shared["pci_bandwidth"] == {"value": 3938 * 16, "unit": "MB/s"}
    assert shared["driver_version"] == {"value": "550.54.15"}
    assert shared["cuda_compute_capability"] == {"value": "9.0"}
    assert shared["persistence_mode"] == {"value": "enabled"}
    assert shared["display_state"] == {"value": "disabled"}
    assert shared["mig_mode"] == {"value": "disabled"}
    assert "uuid" not in shared  # differs per GPU: a device attribute
    with daemon.client() as client:
        by_uuid = client.call("reserve", {"device_ids": [UUID_B]})
    assert by_uuid["device_ids"] == [B]
    assert by_uuid["envs"] == {"NVIDIA_VISIBLE_DEVICES": UUID_B}
    # a driver upgrade: the driver is unbound and bound again, and NVML reads the new version
    nvml.set_driver_version("560.35.03")
    before = len(sub.notifications)
    hosts.unbind(A)
    hosts.bind(A)
    mirror = sub.until(lambda m: value(m, A, "driver_version") == "560.35.03")
    assert value(mirror, B, "driver_version") == "550.54.15"  # B was not re-read
    patches = [n["patch"] for n in sub.notifications[before:]]
    assert any("560.35.03" in str(p) for p in patches) and all("snapshot" not in p for p in patches)


@pytest.mark.parametrize(
    ("xid", "args", "health", "desc"),
    [
        # one XID of each of the catalog's actions, as the daemon judges it by default
        (8, (), "healthy", None),  # RESTART_APP: the application failed, not the GPU
        (14, (), "healthy", None),  # IGNORE
        (45, (), "healthy", None),  # WORKFLOW_XID_45: cleanup after another error
        (46, (), "needs reset", "XID 46 (the GPU stopped processing (timeout); NVIDIA: RESET_GPU)"),
        (48, (), "needs reset", "XID 48 (double-bit ECC error in GPU memory; NVIDIA: WORKFLOW"),
        (74, (), "needs reset", "XID 74 (NVLink error; NVIDIA: WORKFLOW_NVLINK_ERR)"),
        (144, (), "needs reset", "XID 144 (NVLink error (SAW); NVIDIA: WORKFLOW_NVLINK5_ERR)"),
        (79, (), "unhealthy", "XID 79 (the GPU has fallen off the bus; NVIDIA: RESTART_BM)"),
        (151, (), "unhealthy", "XID 151 (confidential-computing key rotation failed; NVIDIA: "),
        (1, (), "needs reset", "XID 1 (unused on these GPUs; NVIDIA: CONTACT_SUPPORT)"),
        (54, (), "needs reset", "XID 54 (clocks reduced for power (check power and cooling); "),
        (78, (), "needs reset", "XID 78 (a vGPU failed to start; NVIDIA: UPDATE_SWFW)"),
        (159, (), "needs reset", "XID 159 (CHI non-data error; NVIDIA: CHECK_UVM)"),
        (999, (), "needs reset", "XID 999 (not in NVIDIA's XID catalog): needs a reset"),
        # the operator's word over the catalog's
        (999, ("--xid-unknown", "report"), "healthy", None),
        (79, ("--xid-ignore", "79"), "healthy", None),
        (13, ("--xid-fatal", "13"), "needs reset", "XID 13 (graphics engine exception"),
        (79, ("--no-xid-health",), "healthy", None),
    ],
)
def test_each_xid_action_does_what_the_catalog_says(
    launch: Callable[..., Daemon],
    nvml: FakeNvml,
    subscribe: Callable[[Daemon], Subscription],
    xid: int,
    args: tuple[str, ...],
    health: str,
    desc: str | None,
) -> None:
    daemon = launch(*args)
    sub = subscribe(daemon)
    sub.until(enriched)
    nvml.xid(A, xid)
    mirror = sub.until(lambda m: value(m, A, "last_xid") == xid)
    assert value(mirror, A, "xid_count") == 1
    assert healthy(mirror, A) is (health == "healthy")
    assert device(mirror, A).get("health") == (None if health == "healthy" else health)
    if desc is not None:
        assert device(mirror, A)["health_desc"].startswith(desc), device(mirror, A)
    assert healthy(mirror, B) is True and value(mirror, B, "last_xid") is None
    log = daemon.log()
    assert f"{A} ({UUID_A}): XID {xid}" in log  # every XID is logged
    if health == "healthy":  # only the application's work was lost: the GPU is leased again
        with daemon.client() as client:
            assert client.call("reserve", {"device_ids": [A]})["device_ids"] == [A]
    if xid == 79 and health != "healthy":
        lost = "0000:3b:00.0 (nvidia NVIDIA H100 80GB HBM3) is lost"
        assert f"<2>CRITICAL monitor.engine.reducer_task: {lost}" in log


def test_an_application_xid_on_a_leased_gpu_names_its_holder_and_keeps_the_gpu(
    launch: Callable[..., Daemon], nvml: FakeNvml, subscribe: Callable[[Daemon], Subscription]
) -> None:
    daemon = launch()
    sub = subscribe(daemon)
    sub.until(enriched)
    with daemon.client() as client:
        lease = client.call("reserve", {"device_ids": [A]})["reservation_id"]
    nvml.xid(A, 13)  # RESTART_APP
    mirror = sub.until(lambda m: value(m, A, "last_xid") == 13)
    assert healthy(mirror, A) is True
    said = f"{A}, reserved by {lease} (uid 0, pid "
    line = wait_until(
        lambda: [x for x in daemon.log().splitlines() if said in x and "XID 13 (" in x],
        5,
        lambda: f"the holder named:\n{daemon.log()}",
    )[0]
    assert line.startswith("<4>WARNING") and line.endswith("the GPU stays schedulable"), line


@pytest.mark.parametrize("evidence", ["rebind", "pci_recovery", "nvml_recovery_action", "replug"])
def test_a_gpu_taken_out_by_an_xid_comes_back_on_evidence(
    launch: Callable[..., Daemon],
    hosts: Simulator,
    nvml: FakeNvml,
    subscribe: Callable[[Daemon], Subscription],
    evidence: str,
) -> None:
    daemon = launch()
    sub = subscribe(daemon)
    sub.until(enriched)
    nvml.xid(A, 109)  # RESET_GPU: needs a reset
    sub.until(lambda m: healthy(m, A) is False)
    with daemon.client() as client, pytest.raises(RpcError) as refused:
        client.call("reserve", {"device_ids": [UUID_A]})
    assert refused.value.code == -32002 and "XID 109" in refused.value.message
    reason = {
        "rebind": "its driver was rebound",
        "pci_recovery": "the kernel reported a successful PCI error recovery",
        "nvml_recovery_action": "the driver reports it usable again (recovery action NONE)",
        "replug": None,
    }[evidence]
    if evidence == "rebind":
        hosts.unbind(A)
        hosts.bind(A)
    elif evidence == "pci_recovery":
        hosts.pci_error(A, "SUCCESSFUL_RECOVERY")
    elif evidence == "nvml_recovery_action":
        nvml.event(A, EVENT_GPU_RECOVERY_ACTION, 0)
    else:
        hosts.remove(A)
        sub.until(lambda m: not device(m, A))
        hosts.add("nvidia-h100", A, 0)
    mirror = sub.until(lambda m: healthy(m, A) is True and value(m, A, "uuid") == UUID_A)
    assert device(mirror, A)["health_desc"] == ""
    if reason is not None:
        wait_until(
            lambda: [
                line
                for line in daemon.log().splitlines()
                if "is healthy again" in line
                and "XID 109 (context-switch timeout" in line
                and line.endswith(f"(evidence: {reason})")
            ],
            5,
            lambda: f"the recovery logged:\n{daemon.log()}",
            interval=0.05,
        )


@pytest.mark.parametrize(
    ("action", "health", "desc"),
    [
        (1, "needs reset", "the driver asks to reset the GPU (recovery action GPU_RESET)"),
        (2, "unhealthy", "the driver asks to reboot the node (recovery action NODE_REBOOT)"),
        (
            3,
            "needs reset",
            "the driver asks to drain peer-to-peer work (recovery action DRAIN_P2P)",
        ),
        (4, "needs reset", "the driver asks to drain peer-to-peer work, then reset the GPU"),
        (5, "needs reset", "the driver asks to recover the IMEX domain"),
        (6, "needs reset", "the driver asks to reset the GPU's PCIe bus (recovery action BUS_R"),
        (7, "unhealthy", "the driver asks to reboot the system (recovery action SYSTEM_REBOOT)"),
        (99, "needs reset", "the driver asks to reset the GPU (recovery action 99 (unknown"),
    ],
)
def test_each_recovery_action_of_the_driver_drains_until_it_reads_none(
    launch: Callable[..., Daemon],
    nvml: FakeNvml,
    subscribe: Callable[[Daemon], Subscription],
    action: int,
    health: str,
    desc: str,
) -> None:
    sub = subscribe(launch())
    sub.until(enriched)
    nvml.event(A, EVENT_GPU_RECOVERY_ACTION, action)
    mirror = sub.until(lambda m: healthy(m, A) is False)
    assert device(mirror, A)["health"] == health
    assert device(mirror, A)["health_desc"].startswith(desc), device(mirror, A)
    nvml.event(A, EVENT_GPU_RECOVERY_ACTION, 0)
    sub.until(lambda m: healthy(m, A) is True)


def test_without_nvml_the_daemon_runs_on_udev_alone(
    hosts: Simulator, start_daemon: Callable[..., Daemon], nvml: FakeNvml, tmp_path: Path
) -> None:
    for started, env in enumerate(
        (
            {**hosts.daemon_env(), "LD_LIBRARY_PATH": str(tmp_path)},  # no library at all
            {**hosts.daemon_env(), **nvml.env()},  # a library whose init fails: no driver
        ),
        start=1,
    ):
        nvml.fail_init(9 if "FAKE_NVML_DIR" in env else 0)
        daemon = start_daemon("--udev-source", "udev", env=env, nvml=True)
        snapshot = daemon.fingerprint()["snapshot"]
        assert set(snapshot["groups"]) == {"nvidia/gpu/H100 SXM5 80GB"}  # udev's name
        wait_until(
            lambda: daemon.log().count("NVML is not available") >= started,  # noqa: B023
            5,
            lambda: f"'NVML is not available' logged:\n{daemon.log()}",  # noqa: B023
        )
        time.sleep(0.2)
        assert daemon.log().count("NVML is not available") == started  # one line each
        assert "Traceback" not in daemon.log()
        daemon.stop()


def test_a_lost_gpu_goes_unhealthy_alone(
    launch: Callable[..., Daemon], nvml: FakeNvml, subscribe: Callable[[Daemon], Subscription]
) -> None:
    nvml.set_gpus(gpus(lost=True))
    sub = subscribe(launch())
    mirror = sub.until(lambda m: healthy(m, A) is False and value(m, B, "uuid") == UUID_B)
    assert device(mirror, A)["health_desc"] == "GPU has fallen off the bus (NVML: GPU is lost)"
    assert healthy(mirror, B) is True
    nvml.set_gpus(gpus())  # back (a reset the driver did)
    mirror = sub.until(
        lambda m: healthy(m, A) is True and value(m, A, "uuid") == UUID_A, timeout=15
    )


def test_a_gpu_whose_events_cannot_be_watched_is_unhealthy_and_the_other_is_watched(
    launch: Callable[..., Daemon], nvml: FakeNvml, subscribe: Callable[[Daemon], Subscription]
) -> None:
    nvml.set_gpus(gpus(register_error=3))
    sub = subscribe(launch())
    mirror = sub.until(lambda m: healthy(m, A) is False and value(m, B, "uuid") == UUID_B)
    assert device(mirror, A)["health_desc"].startswith("NVML cannot watch this GPU: ")
    nvml.xid(B, 79)
    sub.until(lambda m: healthy(m, B) is False)


def test_a_hanging_call_delays_neither_the_other_gpu_nor_the_socket(
    launch: Callable[..., Daemon], nvml: FakeNvml, subscribe: Callable[[Daemon], Subscription]
) -> None:
    nvml.hang("nvmlDeviceGetPowerManagementLimit", A)
    daemon = launch("--nvml-timeout", "0.5")
    sub = subscribe(daemon)
    mirror = sub.until(lambda m: value(m, B, "uuid") == UUID_B and healthy(m, A) is False)
    assert device(mirror, A)["health_desc"].startswith(
        "NVML not responding (read_gpu has not returned for 0.5 s)"
    )
    sent = time.monotonic()
    nvml.xid(B, 48)
    mirror = sub.until(lambda m: healthy(m, B) is False)
    xid_delay = time.monotonic() - sent
    assert healthy(mirror, A) is False, "the other GPU's XID waited for the hung call"
    slowest = 0.0
    for _ in range(5):  # the socket answers while the call hangs
        asked = time.monotonic()
        assert healthy(Mirror(daemon.fingerprint()), A) is False
        slowest = max(slowest, time.monotonic() - asked)
    nvml.unhang()
    sub.until(lambda m: healthy(m, A) is True and value(m, A, "uuid") == UUID_A)
    record(
        "Faults",
        "An NVML call that never returns, on one of two GPUs (stand-in library)",
        "1 hung call, then released",
        f"that GPU unhealthy, 'NVML not responding'; the other's XID arrived in "
        f"{xid_delay * 1000:.0f} ms; fingerprint answered in {slowest * 1000:.1f} ms at most; "
        "healthy again once the call returned",
    )


def test_a_crash_in_nvml_ends_the_worker_and_the_daemon_carries_on(
    launch: Callable[..., Daemon], nvml: FakeNvml, subscribe: Callable[[Daemon], Subscription]
) -> None:
    daemon = launch()
    sub = subscribe(daemon)
    sub.until(enriched)
    with daemon.client() as client:
        lease = client.call("reserve", {"device_ids": [UUID_A]})["reservation_id"]
    crashed = time.monotonic()
    nvml.crash("nvmlEventSetWait_v2")  # as a segfault in the driver's library would
    mirror = sub.until(lambda m: healthy(m, A) is False and healthy(m, B) is False)
    marked = time.monotonic() - crashed
    reason = "NVML worker crashed (killed by SIGABRT); restarting it"
    assert device(mirror, A)["health_desc"] == device(mirror, B)["health_desc"] == reason
    assert daemon.process.poll() is None  # the daemon itself carries on
    with daemon.client() as client:
        assert [e["reservation_id"] for e in client.call("leases")["leases"]] == [lease]
        with pytest.raises(RpcError) as refused:  # and refuses what is not healthy
            client.call("reserve", {"device_ids": [B]})
        assert refused.value.code == -32002
    nvml.uncrash()
    fixed = time.monotonic()
    sub.until(lambda m: healthy(m, A) is True and healthy(m, B) is True and enriched(m))
    back = time.monotonic() - fixed
    assert "CRITICAL monitor.sources.nvml: NVML worker crashed (killed by SIGABRT)" in daemon.log()
    # SIGTERM stops the daemon and its worker
    (worker,) = psutil.Process(daemon.process.pid).children()
    assert daemon.stop() == 0
    worker.wait(timeout=1)  # not our child: psutil cannot tell its exit status
    assert not worker.is_running()
    record(
        "Faults",
        "An NVML call that aborts its process (stand-in library)",
        "1 crash in nvmlEventSetWait, on the first call and each restart until fixed",
        f"only the NVML worker died; both GPUs unhealthy 'NVML worker crashed' after "
        f"{marked * 1000:.0f} ms; the daemon kept serving, the lease intact; GPUs healthy "
        f"and enriched {back * 1000:.0f} ms after the library stopped crashing",
    )
