"""MIG at the edges, by plain calls: the CDI spec in both publish modes, the worker's pipe,
the mig-minors file read as hostile input, and the journal's view of MIG devices."""

from __future__ import annotations

import os
from pathlib import Path

import attrs
import pytest

from monitor.core.events import MigLayoutSeen, XidReported
from monitor.core.mig import MigLayout
from monitor.core.transitions import HealthTransition, journal_entries
from monitor.outputs.cdi import build_lease_spec, build_spec
from monitor.sim.mig import ci_access_minor, gi_access_minor, mig_minors_text
from monitor.sources.mig_minors import checked_layout, read_mig_minors
from monitor.sources.nvml_worker.pipe import (
    MAX_MIG_DEVICES,
    MigRescan,
    decode_event,
    decode_request,
    encode_event,
    encode_mig_rescan,
)
from tests.pure.examples import GPU, decide, reserve
from tests.pure.test_mig import LAYOUT, ONE_A, ONE_B, THREE, A, answer, mig_host


def caps(gi: int) -> list[str]:
    minor = GPU.minor
    assert minor is not None
    return [
        f"/dev/nvidia-caps/nvidia-cap{gi_access_minor(minor, gi)}",
        f"/dev/nvidia-caps/nvidia-cap{ci_access_minor(minor, gi, 0)}",
    ]


def nodes(entry: dict[str, object]) -> list[str]:
    edits = entry["containerEdits"]
    assert isinstance(edits, dict)
    return [n["path"] for n in edits["deviceNodes"]]


def test_cdi_all_names_each_instance_by_its_uuid_alone() -> None:
    spec = build_spec(mig_host(), exists=lambda _: True)
    entries = {d["name"]: d for d in spec["devices"]}
    assert set(entries) == {ONE_A.uuid, ONE_B.uuid, THREE.uuid}  # not the GPU's address
    paths = nodes(entries[ONE_A.uuid])
    assert f"/dev/nvidia{GPU.minor}" in paths and "/dev/nvidiactl" in paths
    assert all(cap in paths for cap in caps(ONE_A.gpu_instance_id))
    assert not any(cap in paths for cap in caps(ONE_B.gpu_instance_id))


def test_cdi_leased_names_the_lease_with_its_instances_edits() -> None:
    state, _ = answer(mig_host(), reserve(ONE_B.uuid))
    spec = build_lease_spec(state, exists=lambda _: True)
    (entry,) = spec["devices"]
    assert entry["name"] == "lease-1"
    assert all(cap in nodes(entry) for cap in caps(ONE_B.gpu_instance_id))
    # a repartition that destroys it ends the lease, and its entry goes
    state = decide(state, MigLayoutSeen(A, MigLayout(True, (THREE,)))).state
    assert build_lease_spec(state, exists=lambda _: True)["devices"] == []


def test_a_gpu_wide_problem_is_a_health_transition_of_each_instance() -> None:
    state = mig_host()
    reduction = decide(state, XidReported(A, 79))
    entries = journal_entries(state, reduction)
    broken = {e.device_id for e in entries if isinstance(e, HealthTransition)}
    assert broken == {ONE_A.uuid, ONE_B.uuid, THREE.uuid}
    assert all(e.kind == "lost" for e in entries if isinstance(e, HealthTransition))


def test_layouts_and_instance_xids_cross_the_pipe_unchanged() -> None:
    for event in (
        MigLayoutSeen(A, LAYOUT),
        MigLayoutSeen(A, MigLayout(False)),
        XidReported(A, 13, gpu_instance=9, compute_instance=0),
    ):
        assert decode_event(encode_event(event)) == event
    assert isinstance(decode_request(encode_mig_rescan()), MigRescan)


@pytest.mark.parametrize(
    "line",
    [
        b'{"event": "MigLayoutSeen", "address": "0000:3b:00.0", "enabled": 1, "instances": []}',
        b'{"event": "MigLayoutSeen", "address": "0000:3b:00.0", "enabled": true, '
        b'"instances": [{"uuid": 5}]}',
        b'{"event": "MigLayoutSeen", "address": "0000:3b:00.0", "enabled": true, '
        b'"instances": "many"}',
        b'{"event": "MigLayoutSeen", "address": "0000:3b:00.0", "enabled": true, '
        b'"instances": [' + b",".join([b"{}"] * (MAX_MIG_DEVICES + 1)) + b"]}",
        b'{"event": "XidReported", "address": "0000:3b:00.0", "xid": 13, "source": "nvml", '
        b'"gpu_instance": "9"}',
    ],
)
def test_a_malformed_layout_is_a_value_error(line: bytes) -> None:
    with pytest.raises(ValueError, match="not an NVML event"):
        decode_event(line)


def test_old_form_uuids_are_dropped_at_the_edge_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    old = attrs.evolve(ONE_B, uuid=f"MIG-{GPU.uuid}/10/0")
    event = MigLayoutSeen(A, MigLayout(True, (THREE, ONE_A, old)))
    kept = checked_layout(event)
    assert [i.uuid for i in kept.layout.instances] == [THREE.uuid, ONE_A.uuid]
    assert A in caplog.text and "left out" in caplog.text


def test_the_mig_minors_file_is_read_bounded_and_a_missing_one_says_why(tmp_path: Path) -> None:
    good = tmp_path / "mig-minors"
    good.write_text(mig_minors_text(2))
    minors = read_mig_minors(good)
    assert minors.problem is None and minors.gi_access[(1, 14)] == gi_access_minor(1, 14)
    missing = read_mig_minors(tmp_path / "none")
    assert missing.problem is not None and "No such file" in missing.problem
    huge = tmp_path / "huge"
    huge.write_bytes(b"x" * ((1 << 20) + 1))
    assert "larger than" in (read_mig_minors(huge).problem or "")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert "not a regular file" in (read_mig_minors(fifo).problem or "")
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\x00gpu0/gi2/access 1\ngpu0/gi1/access 12\n\x00\x00")
    assert dict(read_mig_minors(binary).gi_access) == {(0, 1): 12}
