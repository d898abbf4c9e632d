"""The CDI spec the daemon keeps, on simulated NVIDIA, AMD and Intel GPUs: valid against the
CDI schema, the same edits as ``reserve`` answers, current after hotplug, gone after a clean
stop; and the CLI's container arguments."""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from monitor.sim.umockdev import Simulator
from monitor.wire.mirror import Mirror
from tests.conftest import Daemon, need
from tests.container import (
    char_devices,
    fake_dev_missing,
    host_dev_snapshot,
    podman_missing,
    run_with_cdi,
    validate_cdi_spec,
)
from tests.waiting import wait_until

pytestmark = pytest.mark.umockdev

KIND = "hotplug-monitor.io/gpu"


@pytest.fixture
def gpus(sim: Simulator) -> Simulator:
    sim.add("nvidia-h100", "0000:3b:00.0", 0)
    sim.add("amd-mi300x", "0000:5b:00.0", 1)
    sim.add("intel-arc", "0000:9a:00.0", 0)
    return sim


def read_spec(path: Path, condition: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    def met() -> dict[str, Any] | None:
        spec: dict[str, Any] = json.loads(path.read_text())
        return spec if condition(spec) else None

    return wait_until(met, what=f"{path} to meet the condition", ignoring=(FileNotFoundError,))


def names(spec: dict[str, Any]) -> list[str]:
    return [device["name"] for device in spec["devices"]]


def test_the_cdi_spec_is_valid_matches_reserve_and_follows_hotplug(
    gpus: Simulator, start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    cdi_dir = tmp_path / "cdi"
    daemon = start_daemon("--udev-source", "udev", "--cdi-dir", str(cdi_dir), env=gpus.daemon_env())
    path = cdi_dir / "hotplug-monitor.json"
    spec = read_spec(path, lambda s: len(s["devices"]) == 3)
    validate_cdi_spec(spec)
    assert (spec["kind"], names(spec)) == (KIND, ["0000:3b:00.0", "0000:5b:00.0", "0000:9a:00.0"])
    edits = {device["name"]: device["containerEdits"] for device in spec["devices"]}
    with daemon.client() as client:
        for name in names(spec):
            answer = client.call("reserve", {"device_ids": [name]})
            nodes = [
                {"path": d["task_path"], "hostPath": d["host_path"], "permissions": "rwm"}
                for d in answer["devices"]
            ]
            assert edits[name]["deviceNodes"] == nodes
            mounts = [
                {
                    "hostPath": m["host_path"],
                    "containerPath": m["task_path"],
                    "options": ["ro", "nosuid", "nodev", "bind"],
                }
                for m in answer["mounts"]
            ]
            assert edits[name].get("mounts", []) == mounts
    assert next(n["path"] for n in edits["0000:5b:00.0"]["deviceNodes"]) == "/dev/kfd"
    assert "env" not in edits["0000:3b:00.0"]  # one device's variable would hide another's
    gpus.remove("0000:5b:00.0")
    spec = read_spec(path, lambda s: "0000:5b:00.0" not in names(s))
    validate_cdi_spec(spec)
    assert names(spec) == ["0000:3b:00.0", "0000:9a:00.0"]  # reserved, but gone: not listed
    gpus.add("nvidia-h100", "0000:bb:00.0", 1)
    with daemon.client() as client:  # reserved the moment it is shown
        wait_until(
            lambda: "0000:bb:00.0" in Mirror(client.call("fingerprint")).devices(),
            what="0000:bb:00.0 to be shown",
            interval=0.002,
        )
        answer = client.call("reserve", {"device_ids": ["0000:bb:00.0"]})
    assert answer["cdi_devices"] == ["hotplug-monitor.io/gpu=0000:bb:00.0"]
    spec = json.loads(path.read_text())  # read once: the answer waited until the spec named it
    assert names(spec) == ["0000:3b:00.0", "0000:9a:00.0", "0000:bb:00.0"]
    assert daemon.stop() == 0
    assert not path.exists()  # removed on a clean stop: no device names that nobody keeps


def node_numbers(path: str) -> tuple[int, int]:
    """Plausible (major, minor) for a node the simulated host names but this host lacks."""
    name = Path(path).name
    fixed = {"nvidiactl": (195, 255), "nvidia-uvm": (510, 0), "nvidia-uvm-tools": (510, 1)}
    if name in fixed:
        return fixed[name]
    if name == "kfd":
        return (511, 0)
    for prefix, major in (("nvidia", 195), ("card", 226), ("renderD", 226)):
        if name.startswith(prefix) and name[len(prefix) :].isdigit():
            return (major, int(name[len(prefix) :]))
    raise AssertionError(f"no numbers for {path}")


def test_a_real_container_gets_exactly_what_the_spec_names(
    gpus: Simulator, start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """podman reads the daemon's spec; the nodes of the simulated host are made for the run,
    in podman's private mount namespace only (tests/container.py)."""
    need(podman_missing())
    need(fake_dev_missing())
    cdi_dir = tmp_path / "cdi"
    start_daemon("--udev-source", "udev", "--cdi-dir", str(cdi_dir), env=gpus.daemon_env())
    spec = read_spec(cdi_dir / "hotplug-monitor.json", lambda s: len(s["devices"]) == 3)
    edits = {device["name"]: device["containerEdits"] for device in spec["devices"]}
    every_node = {n["hostPath"] for e in edits.values() for n in e["deviceNodes"]}
    links = {}
    for device_edits in edits.values():
        card = next(n["path"] for n in device_edits["deviceNodes"] if "/card" in n["path"])
        render = next(n["path"] for n in device_edits["deviceNodes"] if "renderD" in n["path"])
        for mount in device_edits.get("mounts", []):
            target = card if mount["hostPath"].endswith("-card") else render
            links[mount["hostPath"]] = f"../{Path(target).name}"
    wanted = ["0000:3b:00.0", "0000:5b:00.0"]  # the NVIDIA and the AMD GPU, not the Intel one
    paths = sorted({n["path"] for name in wanted for n in edits[name]["deviceNodes"]})
    before = host_dev_snapshot()
    result = run_with_cdi(
        cdi_dir,
        wanted,
        ["sh", "-c", f"ls -ln {' '.join(paths)}; ls -ln /dev/dri/by-path; ls -ln /dev/dri"],
        fake_nodes={path: node_numbers(path) for path in every_node},
        fake_links=links,
    )
    assert result.returncode == 0, result.stderr
    assert host_dev_snapshot() == before  # nothing was made on this host
    seen = char_devices(result.stdout)
    expected = {path: node_numbers(path) for path in paths}
    expected |= {Path(path).name: node_numbers(path) for path in paths if "/dri/" in path}
    # the by-path links arrive as read-only binds of the nodes they point to
    for link, target in links.items():
        if any(f"pci-{name}-" in link for name in wanted):
            expected[Path(link).name] = node_numbers(target)
    assert seen == expected
    assert "/dev/kfd" in seen and "/dev/nvidia0" in seen and "/dev/nvidiactl" in seen
    assert not any(name in ("card2", "renderD130") for name in seen)  # the Intel GPU's


NODELESS = "0000:c1:00.0"  # a bound accelerator with no device nodes, as a virtio function is


def add_nodeless(sim: Simulator) -> None:
    sim.add_raw(
        "pci",
        NODELESS,
        attributes={"vendor": "0x1ed5", "device": "0x0100", "class": "0x120000"},
        properties={
            "PCI_SLOT_NAME": NODELESS,
            "PCI_ID": "1ED5:0100",
            "PCI_CLASS": "120000",
            "DRIVER": "accel",
        },
    )


def test_a_device_with_nothing_to_inject_keeps_cdi_for_the_others(
    gpus: Simulator, start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """podman refuses a whole spec for one device with empty edits: such a device stays out,
    and a real podman still gives the others; reserve --cdi says why it cannot name it."""
    need(podman_missing())
    need(fake_dev_missing())
    add_nodeless(gpus)
    cdi_dir = tmp_path / "cdi"
    daemon = start_daemon("--udev-source", "udev", "--cdi-dir", str(cdi_dir), env=gpus.daemon_env())
    assert NODELESS in {d for g in daemon.fingerprint()["snapshot"]["groups"].values()
                        for d in g["devices"]}  # fmt: skip
    spec = read_spec(cdi_dir / "hotplug-monitor.json", lambda s: len(s["devices"]) == 3)
    validate_cdi_spec(spec)
    assert NODELESS not in names(spec)
    edits = spec["devices"][names(spec).index("0000:9a:00.0")]["containerEdits"]
    paths = [n["path"] for n in edits["deviceNodes"]]
    card = next(p for p in paths if "/card" in p)
    render = next(p for p in paths if "renderD" in p)
    links = {
        m["hostPath"]: f"../{Path(card if m['hostPath'].endswith('-card') else render).name}"
        for m in edits.get("mounts", [])
    }
    result = run_with_cdi(
        cdi_dir,
        ["0000:9a:00.0"],
        ["sh", "-c", f"ls -ln {' '.join(paths)}"],
        fake_nodes={path: node_numbers(path) for path in paths},
        fake_links=links,
    )
    assert result.returncode == 0, result.stderr
    assert set(char_devices(result.stdout)) >= set(paths)
    before, granted = daemon.fingerprint()["generation"], daemon.log().count(" granted to uid ")
    refused = daemon.cli("reserve", "--cdi", NODELESS)
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr == (
        f"hotplug-monitor: error: {NODELESS} has nothing a container engine could be given (no "
        "device nodes), so no CDI device names it\n"
    )
    assert daemon.client().call("leases") == {"leases": []}
    # refused before any lease was granted: none flickered through watch, the journal...
    assert daemon.fingerprint()["generation"] == before
    assert daemon.log().count(" granted to uid ") == granted
    for output, says in (
        ("--env", "need no environment variables"),
        ("--docker-args", "have nothing a container engine could be given"),
    ):
        done = daemon.cli("reserve", output, NODELESS)
        assert done.returncode == 0 and says in done.stderr, done.stderr
        daemon.cli("release", NODELESS)  # fmt: skip


def test_reserve_prints_cdi_names_and_container_engine_arguments(
    gpus: Simulator, start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    plain = start_daemon("--udev-source", "udev", env=gpus.daemon_env())  # --no-cdi
    refused = plain.cli("reserve", "--cdi", "0000:3b:00.0")
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr == (
        "hotplug-monitor: error: this daemon keeps no CDI spec (it runs with --no-cdi or without "
        'root): reserve without "cdi" and give the container the devices another way\n'
    )
    assert plain.client().call("leases") == {"leases": []}  # nothing kept that is of no use
    plain.stop()
    daemon = start_daemon(
        "--udev-source", "udev", "--cdi-dir", str(tmp_path / "cdi"), env=gpus.daemon_env()
    )
    cdi = daemon.cli("reserve", "--cdi", "0000:3b:00.0", "0000:9a:00.0")
    assert cdi.stdout == f"--device={KIND}=0000:3b:00.0 --device={KIND}=0000:9a:00.0\n"
    lease = daemon.client().call("leases")["leases"][0]["reservation_id"]
    assert cdi.stderr == (  # what was reserved, and how it ends, for the person
        f"hotplug-monitor: reserved 0000:3b:00.0, 0000:9a:00.0 as {lease} "
        f"(hotplug-monitor release --reservation {lease} ends it)\n"
    )
    docker = daemon.cli("reserve", "--docker-args", "0000:5b:00.0")
    assert shlex.split(docker.stdout) == [
        "--device",
        "/dev/kfd:/dev/kfd:rwm",
        "--device",
        "/dev/dri/card1:/dev/dri/card1:rwm",
        "--device",
        "/dev/dri/renderD129:/dev/dri/renderD129:rwm",
        # --mount, not -v: the by-path names have colons, which -v would split on
        "--mount",
        "type=bind,source=/dev/dri/by-path/pci-0000:5b:00.0-card,"
        "target=/dev/dri/by-path/pci-0000:5b:00.0-card,readonly",
        "--mount",
        "type=bind,source=/dev/dri/by-path/pci-0000:5b:00.0-render,"
        "target=/dev/dri/by-path/pci-0000:5b:00.0-render,readonly",
    ]
    table = daemon.cli("leases").stdout.splitlines()
    assert table[0].split() == [
        "RESERVATION",
        "DEVICES",
        "OWNER",
        "UID",
        "PID",
        "ENDS",
        "WITH",
        "SINCE",
        "STATE",
    ]
    assert len(table) == 3 and all(line.rstrip().endswith("held") for line in table[1:])
    assert "0000:3b:00.0,0000:9a:00.0" in table[1] or "0000:3b:00.0,0000:9a:00.0" in table[2]
    gpus.remove("0000:5b:00.0")
    listed = wait_until(
        lambda: out if "orphaned" in (out := daemon.cli("leases").stdout) else None,
        what="an orphaned lease in `leases`",
        interval=0.05,
    )
    assert "orphaned: 0000:5b:00.0 gone" in listed
    as_json = json.loads(daemon.cli("leases", "--json").stdout)
    assert sorted(len(lease["devices"]) for lease in as_json["leases"]) == [1, 2]
