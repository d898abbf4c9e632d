"""CDI spec validation, and a real container run that shows what a CDI spec injects."""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.conftest import need
from tests.container import (
    CDI_KIND,
    fake_dev_script,
    podman_missing,
    run_with_cdi,
    validate_cdi_spec,
)

DEVICE = "0000:00:01.0"
GPU_UUID = "GPU-8d1f5b64-0c5e-4f3a-9b7e-2f6a1c9d0e42"


def _spec(payload: Path, cdi_version: str = "0.5.0") -> dict[str, Any]:
    # podman 4.3.1 (Debian 12) resolves specs up to cdiVersion 0.5.0 only; hostPath on a
    # device node and a name starting with a digit both need 0.5.0.
    edits: dict[str, Any] = {
        "deviceNodes": [{"path": "/dev/fakegpu0", "hostPath": "/dev/zero", "permissions": "rwm"}],
        "env": ["FOO=bar"],
        "mounts": [
            {
                "hostPath": str(payload),
                "containerPath": "/mnt/payload.txt",
                "options": ["ro", "nosuid", "nodev", "bind"],
            }
        ],
    }
    return {
        "cdiVersion": cdi_version,
        "kind": CDI_KIND,
        "devices": [
            {"name": DEVICE, "containerEdits": edits},
            {"name": GPU_UUID, "containerEdits": copy.deepcopy(edits)},
        ],
    }


def _need_podman() -> None:
    need(podman_missing())


def test_hand_made_spec_is_valid(tmp_path: Path) -> None:
    validate_cdi_spec(_spec(tmp_path / "payload.txt"))
    validate_cdi_spec(_spec(tmp_path / "payload.txt", cdi_version="1.1.0"))


@pytest.mark.parametrize("name", ["0000:3b:00.0", GPU_UUID, "a", "7", "gpu_0.a-b:c", "MIG-1-2"])
def test_device_names_the_parser_accepts(name: str) -> None:
    device = {"name": name, "containerEdits": {"env": ["A=1"]}}
    spec: dict[str, Any] = {"cdiVersion": "0.5.0", "kind": CDI_KIND, "devices": [device]}
    validate_cdi_spec(spec)


def test_missing_kind_is_rejected(tmp_path: Path) -> None:
    spec = _spec(tmp_path / "payload.txt")
    del spec["kind"]
    with pytest.raises(jsonschema.ValidationError, match="'kind' is a required property"):
        validate_cdi_spec(spec)


@pytest.mark.parametrize(
    "name", ["", ":0000:3b:00.0", "0000:3b:00.0:", "gpu 0", "gpu/0", "gpu=0", "gpü", "-gpu"]
)
def test_bad_device_name_is_rejected(tmp_path: Path, name: str) -> None:
    spec = _spec(tmp_path / "payload.txt")
    spec["devices"][0]["name"] = name
    with pytest.raises(jsonschema.ValidationError, match="invalid device name"):
        validate_cdi_spec(spec)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.update(kind="gpu"), "invalid kind"),
        (lambda s: s.update(kind="hotplug-monitor.io/"), "invalid kind"),
        (lambda s: s.update(cdiVersion="9.9.9"), "unknown cdiVersion"),
        (lambda s: s["devices"].append(copy.deepcopy(s["devices"][0])), "duplicate device"),
        (lambda s: s["devices"][0].pop("containerEdits"), "'containerEdits' is a required"),
        (lambda s: s["devices"][0]["containerEdits"]["mounts"][0].pop("hostPath"), "hostPath"),
        (lambda s: s["devices"][0]["containerEdits"].update(deviceNodes=[{}]), "'path'"),
        (lambda s: s["devices"][0]["containerEdits"].update(env="FOO=bar"), "not of type"),
        (lambda s: s.update(devices={}), "not of type 'array'"),
    ],
)
def test_other_bad_specs_are_rejected(tmp_path: Path, change: Any, message: str) -> None:
    spec = _spec(tmp_path / "payload.txt")
    change(spec)
    with pytest.raises(jsonschema.ValidationError, match=message):
        validate_cdi_spec(spec)


@pytest.mark.parametrize("device", [DEVICE, GPU_UUID])
def test_container_sees_what_the_spec_injects(tmp_path: Path, device: str) -> None:
    _need_podman()
    payload = tmp_path / "payload.txt"
    payload.write_text("hello from the host\n")
    spec = _spec(payload)
    validate_cdi_spec(spec)
    spec_dir = tmp_path / "cdi"
    spec_dir.mkdir()
    (spec_dir / "hotplug-monitor.json").write_text(json.dumps(spec, indent=2))

    zero = os.stat("/dev/zero").st_rdev
    script = "; ".join(
        [
            "stat -c 'node=%F %t:%T' /dev/fakegpu0",
            "echo read=$(head -c 4 /dev/fakegpu0 | wc -c)",
            'echo "FOO=$FOO"',
            "echo content=$(cat /mnt/payload.txt)",
            "echo changed >> /mnt/payload.txt; echo write_rc=$?",
            "grep ' /mnt/payload.txt ' /proc/mounts",
        ]
    )
    started = time.monotonic()
    result = run_with_cdi(spec_dir, [device], ["sh", "-c", script])
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    print(f"container run took {elapsed:.2f}s\n{result.stdout}{result.stderr}")

    assert f"node=character special file {os.major(zero):x}:{os.minor(zero):x}" in lines
    assert "read=4" in lines  # the device cgroup lets the container read the node
    assert "FOO=bar" in lines
    assert "content=hello from the host" in lines
    assert "write_rc=1" in lines
    assert "Read-only file system" in result.stderr
    mount_line = next(line for line in lines if " /mnt/payload.txt " in line)
    options = mount_line.split()[3].split(",")
    assert {"ro", "nosuid", "nodev"} <= set(options)
    assert payload.read_text() == "hello from the host\n"


def test_unknown_device_is_refused(tmp_path: Path) -> None:
    _need_podman()
    payload = tmp_path / "payload.txt"
    payload.write_text("x\n")
    spec_dir = tmp_path / "cdi"
    spec_dir.mkdir()
    (spec_dir / "hotplug-monitor.json").write_text(json.dumps(_spec(payload)))
    result = run_with_cdi(spec_dir, ["0000:ff:00.0"], ["true"])
    assert result.returncode != 0
    assert "unresolvable CDI devices" in result.stderr


@pytest.mark.parametrize(
    ("nodes", "links", "message"),
    [
        ({"/dev/shm/gpu": (195, 0)}, {}, "shared with the host"),
        ({"/dev/pts/9": (195, 0)}, {}, "shared with the host"),
        ({"/dev/fd/gpu": (195, 0)}, {}, "through the symlink /dev/fd"),
        ({"/dev/../etc/gpu": (195, 0)}, {}, "not a normalised"),
        ({"/etc/gpu": (195, 0)}, {}, "not a normalised"),
        ({"/dev/dri/card1": (226, 1)}, {"/dev/dri": "/tmp"}, "parent of another"),
    ],
)
def test_fake_paths_stay_in_the_private_dev(
    nodes: dict[str, tuple[int, int]], links: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        fake_dev_script(nodes, links)
