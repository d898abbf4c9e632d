"""What NVML reports is hostile until checked: a name with escape sequences, an empty name, a
UUID that aliases another device's ID or says ``,all``, through the real nvidia-ml-py bindings
and the stand-in libnvidia-ml.so.1, and the leases on those GPUs across restarts."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from monitor.sim.nvml import FakeGpu, FakeNvml
from monitor.sim.umockdev import Simulator
from monitor.wire.errors import DEVICE_UNHEALTHY, RpcError
from monitor.wire.mirror import Mirror
from tests.conftest import Daemon, Subscription

pytestmark = pytest.mark.umockdev

A, B, C = "0000:1b:00.0", "0000:3b:00.0", "0000:86:00.0"
UUIDS = {
    A: "GPU-0a0a0a0a-1111-2222-3333-444444444444",
    B: "GPU-0b0b0b0b-5555-6666-7777-888888888888",
    C: "GPU-0c0c0c0c-9999-aaaa-bbbb-cccccccccccc",
}
HOSTILE_NAME = "NVIDIA H100\x1b[2J\x1b]0;pwned\x07"
DATABASE_NAME = "nvidia/gpu/H100 SXM5 80GB"  # udev's hardware database, for an empty name


Launcher = Callable[[dict[str, dict[str, Any]]], Callable[[], Daemon]]


@pytest.fixture
def three_gpus(
    sim: Simulator, tmp_path: Path, nvml_lib: Path, start_daemon: Callable[..., Daemon]
) -> Launcher:
    """Given what NVML says otherwise of some GPUs (by address), the way to start a daemon (and
    to start it again) on three simulated H100s and the stand-in NVML."""

    def prepare(overrides: dict[str, dict[str, Any]]) -> Callable[[], Daemon]:
        for index, address in enumerate((A, B, C)):
            sim.add("nvidia-h100", address, index)
        gpus = [
            FakeGpu(
                **{
                    "bus_id": address,
                    "uuid": UUIDS[address],
                    "minor": index,
                    **overrides.get(address, {}),
                }
            )
            for index, address in enumerate((A, B, C))
        ]
        env = {**sim.daemon_env(), **FakeNvml(tmp_path / "nvml", nvml_lib, gpus).env()}
        return lambda: start_daemon("--udev-source", "udev", env=env, nvml=True)

    return prepare


def named(mirror: Mirror) -> bool:
    """Every GPU shown, none waiting for NVML."""
    return len(mirror.devices()) == 3


def groups_of(mirror: Mirror) -> dict[str, str]:
    return {device_id: key for device_id, (key, _) in mirror.devices().items()}


def restart(daemon: Daemon, again: Callable[[], Daemon]) -> Daemon:
    assert daemon.stop() == 0
    return again()


@pytest.mark.parametrize("name", [HOSTILE_NAME, "", "\x1b\x07 \x7f"])
def test_a_gpu_name_nvml_mangles_loses_no_lease_across_restarts(
    three_gpus: Launcher,
    subscribe: Callable[[Daemon], Subscription],
    name: str,
) -> None:
    again = three_gpus({A: {"name": name}})
    daemon = again()
    mirror = subscribe(daemon).until(named)
    groups = groups_of(mirror)
    assert all(key.isprintable() for key in groups.values()), groups
    if name == HOSTILE_NAME:
        assert groups[A] == "nvidia/gpu/NVIDIA H100[2J]0;pwned"  # control characters dropped
    else:
        assert groups[A] == DATABASE_NAME  # nothing printable left: the database's name
    with daemon.client() as client:
        held = [client.call("reserve", {"device_ids": [d]})["reservation_id"] for d in (B, A, C)]
    # The first restart replays the journal and compacts it into the snapshot; the second reads
    # the snapshot: every lease comes back both ways, whoever's device NVML misnamed.
    for _ in range(2):
        daemon = restart(daemon, again)
        with daemon.client() as client:
            leases = client.call("leases")["leases"]
        assert sorted(lease["reservation_id"] for lease in leases) == sorted(held)
        assert "CRITICAL" not in daemon.log()


def test_what_devices_prints_moves_no_cursor_and_sets_no_title(
    three_gpus: Launcher,
    subscribe: Callable[[Daemon], Subscription],
) -> None:
    again = three_gpus({A: {"name": "NVIDIA\x1b]0;x\x07\x9b2J H100"}})
    daemon = again()
    subscribe(daemon).until(named)
    with daemon.client() as client:
        client.call("reserve", {"device_ids": [A]})
    for command in ("devices", "leases"):
        shown = subprocess.run(
            [sys.executable, "-m", "monitor", command, "--socket", str(daemon.socket)],
            capture_output=True,
            check=True,
            text=True,
        ).stdout
        assert A in shown, shown
        assert not any(c in shown for c in "\x1b\x07\x9b"), shown
        if command == "devices":
            assert "NVIDIA]0;x2J H100" in shown  # what was printable, as it was


@pytest.mark.parametrize(
    ("uuid", "why"),
    [
        (B, "NVML reported a malformed UUID (0000:3b:00.0)"),  # another device's ID
        (f"{UUIDS[B]},all", f"NVML reported a malformed UUID ({UUIDS[B]},all)"),
        ("GPU-\x1b[2J", "NVML reported a malformed UUID (GPU-\\x1b[2J)"),
    ],
)
def test_a_uuid_not_in_nvidias_form_names_no_device(
    three_gpus: Launcher,
    subscribe: Callable[[Daemon], Subscription],
    uuid: str,
    why: str,
) -> None:
    again = three_gpus({C: {"uuid": uuid}})
    daemon = again()
    mirror = subscribe(daemon).until(named)
    bad = mirror.devices()[C][1]
    assert (bad["healthy"], bad["health_desc"]) == (False, why)
    assert "uuid" not in bad["attributes"]
    with daemon.client() as client:
        granted = client.call("reserve", {"device_ids": [B]})
        assert granted["device_ids"] == [B]  # B's address means B, whatever C's UUID says
        assert granted["envs"] == {"NVIDIA_VISIBLE_DEVICES": UUIDS[B]}
        assert client.call("release", {"device_ids": [B]})["released"] == [B]
        with pytest.raises(RpcError) as refused:
            client.call("reserve", {"device_ids": [C]})
        assert refused.value.code == DEVICE_UNHEALTHY
        if uuid not in UUIDS:  # an address names its own device; anything else is no alias
            with pytest.raises(RpcError):
                client.call("reserve", {"device_ids": [uuid]})


def test_a_uuid_nvml_gives_two_gpus_names_neither(
    three_gpus: Launcher,
    subscribe: Callable[[Daemon], Subscription],
) -> None:
    again = three_gpus({C: {"uuid": UUIDS[B]}})
    daemon = again()
    mirror = subscribe(daemon).until(named)
    for address in (B, C):
        device = mirror.devices()[address][1]
        assert device["healthy"] is False
        assert device["health_desc"] == f"NVML reported one UUID for {B}, {C}"
        assert "uuid" not in device["attributes"]
    assert mirror.devices()[A][1]["healthy"] is True
    with daemon.client() as client, pytest.raises(RpcError):
        client.call("reserve", {"device_ids": [UUIDS[B]]})
