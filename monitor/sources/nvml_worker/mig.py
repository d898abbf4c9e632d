"""A GPU's MIG mode and MIG devices, as NVML shows them now."""

from __future__ import annotations

from typing import Any

import pynvml

from monitor.core.mig import MigInstance, MigLayout
from monitor.sources.nvml_worker.library import NOT_FOUND, error_code, is_lost, text

MAX_MIG_DEVICES = 16  # NVML says 7 for an A100 or H100; a larger answer is not believed


def read_layout(handle: Any) -> MigLayout:
    """The GPU's MIG mode and its MIG devices; MIG mode off where NVML does not support it.
    Blocking."""
    try:
        current, _ = pynvml.nvmlDeviceGetMigMode(handle)
    except pynvml.NVMLError as exc:
        if is_lost(exc):
            raise
        return MigLayout(False)
    if not current:
        return MigLayout(False)
    count = min(pynvml.nvmlDeviceGetMaxMigDeviceCount(handle), MAX_MIG_DEVICES)
    instances = []
    for index in range(count):
        try:
            mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, index)
        except pynvml.NVMLError as exc:
            if error_code(exc) == NOT_FOUND:
                continue  # no MIG device at this index
            raise
        attributes = pynvml.nvmlDeviceGetAttributes_v2(mig)
        instances.append(
            MigInstance(
                uuid=text(pynvml.nvmlDeviceGetUUID(mig)),
                gpu_instance_id=pynvml.nvmlDeviceGetGpuInstanceId(mig),
                compute_instance_id=pynvml.nvmlDeviceGetComputeInstanceId(mig),
                gpu_slices=attributes.gpuInstanceSliceCount,
                compute_slices=attributes.computeInstanceSliceCount,
                memory_mib=attributes.memorySizeMB,
            )
        )
    return MigLayout(True, tuple(instances))
