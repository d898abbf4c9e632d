"""Scenario 13: the kubelet plugin's GetPreferredAllocation with 1,024 device IDs (issue 24),
through its servicer on an asyncio loop, as the kubelet's call reaches it: 1,024 made-up IDs
(dropped before ranking), and 1,024 real devices of the resource (4 PCI buses of 256
functions, one NUMA node) for 8 and for 512 devices. The last ranks off the loop."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc

from monitor.adapters.kubelet.inventory import Inventory, KubeDevice
from monitor.adapters.kubelet.options import Options
from monitor.adapters.kubelet.protos import deviceplugin_pb2 as api
from monitor.adapters.kubelet.rpc import PluginState, ResourcePlugin
from tests.bench.common import Results, Stats

SCENARIO = "13 preferred allocation"
RESOURCE = "hotplug-monitor.io/nvidia-gpu"
TARGET_MS = 50.0


class _Context:
    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise RuntimeError(f"{code}: {details}")


def preferred(results: Results, samples: int, quick: bool) -> None:
    real = [f"0000:{b:02x}:{d:02x}.{f}" for b in range(4) for d in range(32) for f in range(8)]
    made_up = [f"GPU-{n:08x}-0000-0000-0000-000000000000" for n in range(1024)]
    cases: list[tuple[str, list[str], int, float | None]] = [
        ("1,024 made-up IDs, 8 wanted", made_up, 8, TARGET_MS),
        ("1,024 devices, 8 wanted", real, 8, TARGET_MS),
        ("1,024 devices, 512 wanted (off the loop)", real, 512, None),
    ]

    async def run() -> None:
        state = PluginState(Options())
        devices = tuple(KubeDevice(a, True, 0, a) for a in real)
        await state.publish(Inventory({RESOURCE: devices}))
        plugin = ResourcePlugin(RESOURCE, state)
        context: Any = _Context()
        for name, ids, size, target in cases:
            request = api.PreferredAllocationRequest(
                container_requests=[
                    api.ContainerPreferredAllocationRequest(
                        available_deviceIDs=ids, allocation_size=size
                    )
                ]
            )
            took: list[int] = []
            count = samples if target is not None else max(samples // 20, 5)
            for _ in range(count):
                began = time.perf_counter_ns()
                answer = await plugin.GetPreferredAllocation(request, context)
                took.append(time.perf_counter_ns() - began)
            got = len(answer.container_responses[0].deviceIDs)
            assert got == (0 if ids is made_up else size), got
            results.latency(
                SCENARIO,
                f"GetPreferredAllocation, {name}",
                Stats.of_ns(took),
                target_p99_ms=target,
                quick=quick or target is None,
            )

    asyncio.run(run())
