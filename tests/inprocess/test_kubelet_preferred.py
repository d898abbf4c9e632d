"""The kubelet plugin's GetPreferredAllocation as the kubelet's gRPC client meets it (issue 24):
made-up device IDs are dropped before ranking, and more IDs or container requests than the caps
are INVALID_ARGUMENT naming the cap. Timings are the benchmark's (tests/bench kubelet)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from monitor.adapters.kubelet.inventory import Inventory, KubeDevice
from monitor.adapters.kubelet.options import Options
from monitor.adapters.kubelet.protos import deviceplugin_pb2 as api
from monitor.adapters.kubelet.rpc import (
    MAX_CONTAINER_REQUESTS,
    MAX_REQUEST_DEVICES,
    PluginState,
    ResourcePlugin,
)

RESOURCE = "hotplug-monitor.io/nvidia-gpu"
REAL = [f"0000:{bus:02x}:00.0" for bus in (0x3B, 0x3C, 0x86, 0x87)]
MADE_UP = [f"GPU-{n:08x}" for n in range(MAX_REQUEST_DEVICES)]


class Aborted(Exception):
    pass


class Context:
    """What the servicer uses of grpc.aio's context: abort, which raises."""

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


def ask(*requests: api.ContainerPreferredAllocationRequest) -> Iterator[list[str]] | Aborted:
    async def call() -> Any:
        state = PluginState(Options())
        devices = tuple(KubeDevice(a, True, 0 if a < "0000:80" else 1, a) for a in REAL)
        await state.publish(Inventory({RESOURCE: devices}))
        plugin = ResourcePlugin(RESOURCE, state)
        request = api.PreferredAllocationRequest(container_requests=requests)
        try:
            answer = await plugin.GetPreferredAllocation(request, Context())  # type: ignore[arg-type]
        except Aborted as aborted:
            return aborted
        return (list(r.deviceIDs) for r in answer.container_responses)

    result: Iterator[list[str]] | Aborted = asyncio.run(call())
    return result


def container(available: list[str], size: int, must: list[str] | None = None) -> Any:
    return api.ContainerPreferredAllocationRequest(
        available_deviceIDs=available, must_include_deviceIDs=must or [], allocation_size=size
    )


def test_made_up_ids_are_dropped_before_ranking() -> None:
    answer = ask(container(MADE_UP, 2), container([*MADE_UP[:500], *REAL, *MADE_UP[504:]], 2))
    assert not isinstance(answer, Aborted), answer
    assert list(answer) == [[], REAL[:2]]
    must = ask(container([*REAL, "GPU-x"], 2, must=["GPU-x", REAL[3]]))
    assert not isinstance(must, Aborted), must
    assert list(must) == [[REAL[3], REAL[2]]]


@pytest.mark.parametrize(
    ("requests", "cap"),
    [
        ([container([*MADE_UP, "GPU-one-more"], 1)], f"at most {MAX_REQUEST_DEVICES} device IDs"),
        (
            [container(REAL, 1, must=[*MADE_UP, "GPU-x"])],
            f"at most {MAX_REQUEST_DEVICES} device IDs",
        ),
        (
            [container(REAL, 1)] * (MAX_CONTAINER_REQUESTS + 1),
            f"at most {MAX_CONTAINER_REQUESTS} container requests",
        ),
    ],
)
def test_past_a_cap_it_is_invalid_argument_naming_the_cap(requests: list[Any], cap: str) -> None:
    answer = ask(*requests)
    assert isinstance(answer, Aborted), answer
    code, details = answer.args
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert cap in details
