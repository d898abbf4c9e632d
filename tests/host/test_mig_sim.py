"""The stand-in NVML's MIG API, driven by the real pynvml bindings in a child process: what the
worker calls (mig mode, max count, handles by index, UUID, instance IDs, attributes), a layout
changed while the process runs, the MIG config change event, and XIDs naming an instance."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from monitor.sim.mig import EXAMPLE_UUIDS, example_layout, h100_mig, mig_h100_nvml
from monitor.sim.nvml import EVENT_MIG_CONFIG_CHANGE, FakeGpu, FakeNvml
from tests.host.test_nvmlsim import run_script

BUS = "0000:3b:00.0"
ONE_A, ONE_B, THREE = EXAMPLE_UUIDS


@pytest.fixture
def fake(tmp_path: Path, nvml_lib: Path) -> FakeNvml:
    return mig_h100_nvml(tmp_path, nvml_lib, BUS)


LIST = """
def layout(gpu):
    found = []
    for i in range(n.nvmlDeviceGetMaxMigDeviceCount(gpu)):
        try:
            m = n.nvmlDeviceGetMigDeviceHandleByIndex(gpu, i)
        except n.NVMLError_NotFound:
            continue
        a = n.nvmlDeviceGetAttributes(m)
        found.append([i, n.nvmlDeviceGetUUID(m), n.nvmlDeviceGetGpuInstanceId(m),
                      n.nvmlDeviceGetComputeInstanceId(m), a.gpuInstanceSliceCount,
                      a.computeInstanceSliceCount, a.memorySizeMB,
                      n.nvmlDeviceIsMigDeviceHandle(m).value])
    return found
"""


def test_pynvml_lists_the_mig_devices_and_sees_a_repartition(fake: FakeNvml) -> None:
    four = "MIG-44444444-4444-4444-8444-444444444444"

    def repartition() -> None:
        fake.set_mig(BUS, [h100_mig("4g.40gb", 0, 1, four)])

    result = run_script(
        fake,
        LIST
        + textwrap.dedent(
            """
        n.nvmlInit()
        gpu = n.nvmlDeviceGetHandleByIndex(0)
        s = n.nvmlEventSetCreate()
        n.nvmlDeviceRegisterEvents(gpu, n.nvmlEventMigConfigChange, s)
        mode = list(n.nvmlDeviceGetMigMode(gpu))
        first = layout(gpu)
        old = n.nvmlDeviceGetMigDeviceHandleByIndex(gpu, 1)
        parent = n.nvmlDeviceGetUUID(n.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(old))
        step("repartition")
        e = n.nvmlEventSetWait_v2(s, 10000)
        try:
            n.nvmlDeviceGetUUID(old)
            stale = "answered"
        except n.NVMLError_InvalidArgument:
            stale = "invalid"
        done({"mode": mode, "first": first, "parent": parent, "event": e.eventType,
              "second": layout(gpu), "stale": stale,
              "whole": n.nvmlDeviceIsMigDeviceHandle(gpu).value})
        """
        ),
        steps={"repartition": repartition},
    )
    assert result["mode"] == [1, 1]
    assert result["first"] == [
        [0, THREE, 2, 0, 3, 3, 40448, 1],
        [1, ONE_A, 9, 0, 1, 1, 9984, 1],
        [2, ONE_B, 10, 0, 1, 1, 9984, 1],
    ]
    assert result["parent"].startswith("GPU-")
    assert result["event"] == EVENT_MIG_CONFIG_CHANGE
    assert result["second"] == [[0, four, 1, 0, 4, 4, 40448, 1]]
    assert result["stale"] == "invalid"  # the destroyed instance's handle names nothing
    assert result["whole"] == 0


def test_an_xid_event_names_its_gpu_and_compute_instance(fake: FakeNvml) -> None:
    def xids() -> None:
        fake.xid(BUS, 13, 9, 0)
        fake.xid(BUS, 48)

    result = run_script(
        fake,
        """
        n.nvmlInit()
        gpu = n.nvmlDeviceGetHandleByIndex(0)
        s = n.nvmlEventSetCreate()
        n.nvmlDeviceRegisterEvents(gpu, n.nvmlEventTypeXidCriticalError, s)
        step("xids")
        a = n.nvmlEventSetWait_v2(s, 10000)
        b = n.nvmlEventSetWait_v2(s, 10000)
        done([[a.eventData, a.gpuInstanceId, a.computeInstanceId],
              [b.eventData, b.gpuInstanceId, b.computeInstanceId]])
        """,
        steps={"xids": xids},
    )
    assert result == [[13, 9, 0], [48, 0xFFFFFFFF, 0xFFFFFFFF]]


def test_mig_mode_off_has_no_mig_devices(tmp_path: Path, nvml_lib: Path) -> None:
    fake = mig_h100_nvml(tmp_path, nvml_lib, BUS, layout=example_layout())
    fake.set_gpus([FakeGpu(bus_id=BUS, uuid="GPU-0a0a0a0a-1111-2222-3333-444444444444")])
    result = run_script(
        fake,
        """
        n.nvmlInit()
        gpu = n.nvmlDeviceGetHandleByIndex(0)
        try:
            n.nvmlDeviceGetMigDeviceHandleByIndex(gpu, 0)
            found = "found"
        except n.NVMLError_NotFound:
            found = "not found"
        done([list(n.nvmlDeviceGetMigMode(gpu)), found])
        """,
    )
    assert result == [[0, 0], "not found"]
