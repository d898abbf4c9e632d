"""The DevicePlugin service the kubelet calls, one servicer per resource name, all sharing one
``PluginState`` (the daemon's devices as the kubelet sees them, kept current by ``plugin``).

Allocate reserves through ``monitor.wire`` with the owner ``kubelet`` (DESIGN section 3a): the
lease ends when the kubelet's PodResources no longer lists the device (``plugin.reconcile``),
and a second Allocate of the same devices (a restarted container) replaces it. What the daemon
answers is checked (``check_reservation``) before the kubelet sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import grpc

from monitor.adapters import grpc_edge
from monitor.adapters.kubelet import preferred as preference
from monitor.adapters.kubelet.inventory import Inventory, KubeDevice, inventory, unreachable
from monitor.adapters.kubelet.options import OWNER, Options
from monitor.adapters.kubelet.protos import deviceplugin_pb2 as api
from monitor.adapters.kubelet.protos import deviceplugin_pb2_grpc as api_grpc
from monitor.wire.asyncio_transport import AsyncioClient
from monitor.wire.mirror import Mirror

log = logging.getLogger("kubelet-plugin")

HEALTHY, UNHEALTHY = "Healthy", "Unhealthy"
ALLOCATE_TIMEOUT_S = 10.0
MAX_REQUEST_DEVICES = 1024
MAX_CONTAINER_REQUESTS = 16  # the kubelet sends one per call
INLINE_RANKING = 16_384  # available x size below which ranking takes about a millisecond
OPTIONS = api.DevicePluginOptions(pre_start_required=False, get_preferred_allocation_available=True)


class PluginState:
    """The latest inventory (and a version that grows with each change), and when each device
    was last allocated (for reconcile's grace period)."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.inventory = Inventory()
        self.version = 0
        self.allocated_at: dict[str, float] = {}
        self.resources_changed = asyncio.Event()
        self.ranking = asyncio.Lock()  # one preferred allocation ranked off the loop at a time
        self._changed = asyncio.Condition()
        self.link = grpc_edge.Reachability(
            lost=lambda: log.warning(
                f"the hotplug-monitor daemon is not reachable on {self.options.socket}: "
                "its devices are Unhealthy for the kubelet until it answers again"
            ),
            back=lambda: log.info(
                f"the hotplug-monitor daemon answers again on {self.options.socket}"
            ),
            left_out=lambda reason: log.warning(f"left out: {reason}"),
        )

    @property
    def reachable(self) -> bool | None:
        """Whether the daemon answered last (None: not answered yet)."""
        return self.link.reachable

    async def emit(self, mirror: Mirror | None) -> None:
        """A new snapshot from the daemon (``None``: it cannot be reached)."""
        if mirror is None:
            self.link.unreachable()
            await self.publish(unreachable(self.inventory))
            return
        offer = inventory(mirror.snapshot, self.options)
        self.link.answered(offer.skipped)
        await self.publish(offer)

    async def publish(self, offer: Inventory) -> None:
        if offer == self.inventory:
            return
        if set(offer.resources) - set(self.inventory.resources):
            self.resources_changed.set()
        self.inventory = offer
        async with self._changed:
            self.version += 1
            self._changed.notify_all()

    async def newer_than(self, seen: int) -> int:
        async with self._changed:
            await self._changed.wait_for(lambda: self.version != seen)
            return self.version


def list_response(devices: Sequence[KubeDevice]) -> api.ListAndWatchResponse:
    return api.ListAndWatchResponse(
        devices=[
            api.Device(
                ID=d.id,
                health=HEALTHY if d.healthy else UNHEALTHY,
                topology=(
                    api.TopologyInfo(nodes=[api.NUMANode(ID=d.numa_node)])
                    if d.numa_node is not None
                    else None
                ),
            )
            for d in devices
        ]
    )


def container_response(result: Mapping[str, Any], cdi: bool) -> api.ContainerAllocateResponse:
    """A ``reserve`` answer, already checked, as what the kubelet adds to the container."""
    response = grpc_edge.container_edits(
        result, api.ContainerAllocateResponse, api.Mount, api.DeviceSpec, path="container_path"
    )
    if cdi:
        response.cdi_devices.extend(api.CDIDevice(name=n) for n in result.get("cdi_devices", []))
    return response


Context = grpc.aio.ServicerContext


class ResourcePlugin(api_grpc.DevicePluginServicer):
    """The DevicePlugin service for one resource name."""

    def __init__(self, resource: str, state: PluginState) -> None:
        self.resource = resource
        self._state = state

    async def GetDevicePluginOptions(
        self, request: api.Empty, context: Context[api.Empty, api.DevicePluginOptions]
    ) -> api.DevicePluginOptions:
        return OPTIONS

    async def ListAndWatch(
        self, request: api.Empty, context: Context[api.Empty, api.ListAndWatchResponse]
    ) -> AsyncIterator[api.ListAndWatchResponse]:
        log.info(f"the kubelet watches {self.resource}")
        seen, sent = -1, None
        while True:
            seen = await self._state.newer_than(seen)
            devices = self._state.inventory.devices(self.resource)
            said = [(d.id, d.healthy, d.numa_node) for d in devices]  # what the kubelet sees
            if said == sent:
                continue
            sent = said
            log.debug(
                f"ListAndWatch {self.resource}: {sum(d.healthy for d in devices)} of "
                f"{len(devices)} healthy"
            )
            yield list_response(devices)

    async def GetPreferredAllocation(
        self,
        request: api.PreferredAllocationRequest,
        context: Context[api.PreferredAllocationRequest, api.PreferredAllocationResponse],
    ) -> api.PreferredAllocationResponse:
        asked = list(request.container_requests)
        if len(asked) > MAX_CONTAINER_REQUESTS:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"at most {MAX_CONTAINER_REQUESTS} container requests at once",
            )
        for r in asked:
            if max(len(r.available_deviceIDs), len(r.must_include_deviceIDs)) > MAX_REQUEST_DEVICES:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"at most {MAX_REQUEST_DEVICES} device IDs per list in a container request",
                )
        devices = self._state.inventory.devices(self.resource)
        ours = {d.id for d in devices}
        # Only this resource's devices are ranked: made-up IDs cost nothing and are never
        # preferred (the kubelet offers only what we listed).
        work = [
            (
                [i for i in r.available_deviceIDs if i in ours],
                [i for i in r.must_include_deviceIDs if i in ours],
                min(max(r.allocation_size, 0), MAX_REQUEST_DEVICES),
            )
            for r in asked
        ]

        def rank() -> list[list[str]]:
            return [preference.preferred(a, m, n, devices) for a, m, n in work]

        # Ranking takes O(available x size): past a few milliseconds, off the loop, one at a time.
        if sum(len(a) * n for a, _, n in work) <= INLINE_RANKING:
            chosen = rank()
        else:
            async with self._state.ranking:
                chosen = await asyncio.to_thread(rank)
        return api.PreferredAllocationResponse(
            container_responses=[
                api.ContainerPreferredAllocationResponse(deviceIDs=ids) for ids in chosen
            ]
        )

    async def Allocate(
        self,
        request: api.AllocateRequest,
        context: Context[api.AllocateRequest, api.AllocateResponse],
    ) -> api.AllocateResponse:
        state = self._state
        wanted = [list(r.devicesIDs) for r in request.container_requests]
        for ids in wanted:
            if not ids or len(ids) > MAX_REQUEST_DEVICES:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, "each container asks for 1 to 1024 devices"
                )
            for device_id in ids:
                if state.inventory.find(self.resource, device_id) is None:
                    await context.abort(
                        grpc.StatusCode.NOT_FOUND,
                        f"{device_id[:80]!r} is not a device of {self.resource}",
                    )

        async def allocate() -> list[api.ContainerAllocateResponse]:
            responses = []
            async with AsyncioClient.open(state.options.socket) as client:
                for ids in wanted:
                    result = await grpc_edge.reserve(client, ids, OWNER)
                    now = time.monotonic()
                    for device_id in ids:
                        state.allocated_at[device_id] = now
                    log.info(
                        f"allocated {', '.join(ids)} ({self.resource}): "
                        f"reservation {result['reservation_id']}"
                    )
                    responses.append(container_response(result, state.options.cdi))
            return responses

        responses = await grpc_edge.ask(
            context,
            ALLOCATE_TIMEOUT_S,
            allocate,
            refused=lambda message: log.warning(
                f"Allocate of {wanted} refused by the daemon: {message}"
            ),
            bad_answer=lambda error: log.error(f"Allocate: {error}"),
        )
        return api.AllocateResponse(container_responses=responses)

    async def PreStartContainer(
        self,
        request: api.PreStartContainerRequest,
        context: Context[api.PreStartContainerRequest, api.PreStartContainerResponse],
    ) -> api.PreStartContainerResponse:
        return api.PreStartContainerResponse()


async def stop_quietly(server: grpc.aio.Server) -> None:
    with contextlib.suppress(Exception):
        await server.stop(0.2)
