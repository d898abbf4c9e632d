"""``hotplug-monitor kubelet-plugin``: one asyncio loop (gRPC's) that follows the daemon, serves
a DevicePlugin per resource name on a socket in the kubelet's plugin directory, registers each
with the kubelet, keeps them registered, and reconciles the daemon's leases with the kubelet's
PodResources.

- Following: ``monitor.wire.asyncio_transport.follow`` (a subscription, patches, reconnection
  with backoff). While the daemon cannot be reached the devices stay listed, Unhealthy.
- Registration: a resource is served from the first snapshot that has a device of it, and kept
  served after (an empty list when its devices left). A kubelet that restarts deletes every
  socket in its directory and makes a new ``kubelet.sock``: either sign, seen within
  ``WATCH_S``, makes the plugin serve again and register again. It never exits for it.
- Reconcile: every ``--reconcile-interval`` seconds, List on the PodResources socket (v1, else
  v1alpha1, as the kubelet serves); the devices no container holds any more are released by the
  daemon's ``reconcile`` (owner ``kubelet``), except those allocated within two intervals (the
  kubelet records an allocation after Allocate returns) and never within three intervals of a
  kubelet start (its pods are not all back yet).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import grpc

from monitor.adapters import grpc_edge
from monitor.adapters.kubelet import reconcile
from monitor.adapters.kubelet.options import API_VERSION, MAX_SOCKET_PATH, OWNER, Options
from monitor.adapters.kubelet.protos import deviceplugin_pb2 as api
from monitor.adapters.kubelet.protos import deviceplugin_pb2_grpc as api_grpc
from monitor.adapters.kubelet.protos import podresources_v1_pb2 as pr_v1
from monitor.adapters.kubelet.protos import podresources_v1_pb2_grpc as pr_v1_grpc
from monitor.adapters.kubelet.protos import podresources_v1alpha1_pb2 as pr_alpha
from monitor.adapters.kubelet.protos import podresources_v1alpha1_pb2_grpc as pr_alpha_grpc
from monitor.adapters.kubelet.rpc import OPTIONS, PluginState, ResourcePlugin, stop_quietly
from monitor.wire import requests
from monitor.wire.asyncio_transport import AsyncioClient
from monitor.wire.errors import DaemonUnavailable, RpcError
from monitor.wire.private_socket import bound_privately

log = logging.getLogger("kubelet-plugin")

WATCH_S = 0.2  # how often the plugin directory is looked at
REGISTER_TIMEOUT_S = 5.0
SERVE_RETRY_S = 2.0
LIST_TIMEOUT_S = 5.0
MAX_ANSWER = 16 << 20  # the largest PodResources answer taken


def _identity(path: Path) -> tuple[int, int] | None:
    """What tells one file at ``path`` from the next one made there (inode and change time)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_ctime_ns


@attrs.define
class Endpoint:
    resource: str
    path: Path
    server: grpc.aio.Server
    identity: tuple[int, int] | None
    registered_with: tuple[int, int] | None = None
    next_try: float = 0.0
    told: bool = False


class Plugin:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.state = PluginState(options)
        self.endpoints: dict[str, Endpoint] = {}
        self.kubelet_seen_since: float | None = None  # when this kubelet.sock appeared
        self._kubelet: tuple[int, int] | None = None
        self._looked = False
        self._serve_failed: set[str] = set()
        self._retry_at: dict[str, float] = {}
        self._pod_resources_version: str | None = None
        self._told: set[str] = set()

    def _once(self, key: str, level: int, message: str) -> None:
        if key not in self._told:
            self._told.add(key)
            log.log(level, message)

    # --- following the daemon ---------------------------------------------------------------

    async def follow(self) -> None:
        await grpc_edge.follow(
            self.options.socket,
            self.state.emit,
            unreadable=lambda error: log.error(
                f"the daemon's answer could not be read ({type(error).__name__}: "
                f"{str(error)[:300]}); trying again"
            ),
        )

    # --- serving and registering ------------------------------------------------------------

    async def _serve(self, resource: str) -> Endpoint | None:
        path = self.options.kubelet_dir / self.options.endpoint(resource)
        if len(str(path)) > MAX_SOCKET_PATH:
            self._once(
                f"long:{resource}",
                logging.ERROR,
                f"cannot serve {resource}: {path} is longer than a socket path may be "
                f"({MAX_SOCKET_PATH} bytes); use a shorter --kubelet-dir",
            )
            return None
        if time.monotonic() < self._retry_at.get(resource, 0.0):
            return None
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 1 << 20)])
        api_grpc.add_DevicePluginServicer_to_server(ResourcePlugin(resource, self.state), server)
        try:
            # Whoever may connect may Allocate, and get a lease made by root: the socket is
            # root's alone (0600) from the moment its name exists, whatever the umask. The
            # rename replaces a socket left there (ours, from before a restart).
            with bound_privately(path, 0o600) as temporary:
                server.add_insecure_port(f"unix:{temporary}")
                await server.start()
        except (RuntimeError, OSError) as error:
            await stop_quietly(server)
            self._retry_at[resource] = time.monotonic() + SERVE_RETRY_S
            if resource not in self._serve_failed:
                self._serve_failed.add(resource)
                log.warning(
                    f"cannot serve {resource} on {path} ({error}); "
                    f"trying again every {SERVE_RETRY_S:g} s"
                )
            return None
        self._serve_failed.discard(resource)
        log.info(f"serving {resource} on {path}")
        return Endpoint(resource, path, server, _identity(path))

    async def _register(self, endpoint: Endpoint, kubelet: tuple[int, int]) -> None:
        if time.monotonic() < endpoint.next_try:
            return
        request = api.RegisterRequest(
            version=API_VERSION,
            endpoint=endpoint.path.name,
            resource_name=endpoint.resource,
            options=OPTIONS,
        )
        try:
            async with grpc.aio.insecure_channel(f"unix://{self.options.kubelet_socket}") as ch:
                await api_grpc.RegistrationStub(ch).Register(request, timeout=REGISTER_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            endpoint.next_try = time.monotonic() + 1.0
            if not endpoint.told:
                endpoint.told = True
                log.warning(
                    f"the kubelet on {self.options.kubelet_socket} refused to register "
                    f"{endpoint.resource}: {error.code().name}: {(error.details() or '')[:300]}"
                    "; trying again every second"
                )
            return
        endpoint.registered_with, endpoint.told = kubelet, False
        log.info(f"registered {endpoint.resource} with the kubelet ({endpoint.path.name})")

    async def keep_registered_once(self) -> None:
        kubelet = _identity(self.options.kubelet_socket)
        if kubelet != self._kubelet or not self._looked:
            self._looked = True
            self._kubelet = kubelet
            self.kubelet_seen_since = time.monotonic() if kubelet is not None else None
            if kubelet is None:
                self._once(
                    "no-kubelet",
                    logging.INFO,
                    f"waiting for the kubelet: {self.options.kubelet_socket} is not there",
                )
            else:
                self._told.discard("no-kubelet")
        if kubelet is None:
            return  # served once it is there: a kubelet that starts removes what it finds
        wanted = set(self.state.inventory.resources) | set(self.endpoints)
        for resource in sorted(wanted):
            endpoint = self.endpoints.get(resource)
            if endpoint is not None and _identity(endpoint.path) != endpoint.identity:
                log.info(f"{endpoint.path} was removed (the kubelet restarted?): serving again")
                await stop_quietly(endpoint.server)
                del self.endpoints[resource]
                endpoint = None
            if endpoint is None:
                endpoint = await self._serve(resource)
                if endpoint is None:
                    continue
                self.endpoints[resource] = endpoint
            if kubelet is not None and endpoint.registered_with != kubelet:
                await self._register(endpoint, kubelet)

    async def keep_registered(self) -> None:
        while True:
            await self.keep_registered_once()
            self.state.resources_changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(WATCH_S):
                    await self.state.resources_changed.wait()

    # --- reconciling with PodResources ------------------------------------------------------

    async def list_pod_resources(self) -> Any:
        """The kubelet's List answer, from v1 if it serves it, else v1alpha1."""
        target = f"unix://{self.options.pod_resources_socket}"
        channel_options = [("grpc.max_receive_message_length", MAX_ANSWER)]
        async with grpc.aio.insecure_channel(target, options=channel_options) as channel:
            if self._pod_resources_version in (None, "v1"):
                try:
                    answer = await pr_v1_grpc.PodResourcesListerStub(channel).List(
                        pr_v1.ListPodResourcesRequest(), timeout=LIST_TIMEOUT_S
                    )
                    self._pod_resources_version = "v1"
                    return answer
                except grpc.aio.AioRpcError as error:
                    if error.code() != grpc.StatusCode.UNIMPLEMENTED:
                        raise
                    self._pod_resources_version = "v1alpha1"
            return await pr_alpha_grpc.PodResourcesListerStub(channel).List(
                pr_alpha.ListPodResourcesRequest(), timeout=LIST_TIMEOUT_S
            )

    async def reconcile_once(self) -> list[str] | None:
        """One reconcile; the devices whose leases ended, or None when it was not the time."""
        interval = self.options.reconcile_interval
        served = set(self.endpoints)
        now = time.monotonic()
        since = self.kubelet_seen_since
        if not served or not self.state.reachable or since is None or now - since < 3 * interval:
            return None
        try:
            answer = await self.list_pod_resources()
        except grpc.aio.AioRpcError as error:
            self._once(
                "pod-resources",
                logging.WARNING,
                f"cannot List on {self.options.pod_resources_socket} "
                f"({error.code().name}); leases are not reconciled until it answers",
            )
            return None
        self._told.discard("pod-resources")
        grace = 2 * interval
        used = reconcile.still_used(
            reconcile.in_use(answer, served), self.state.allocated_at, now, grace
        )
        for device_id, at in list(self.state.allocated_at.items()):
            if now - at >= grace:
                del self.state.allocated_at[device_id]
        try:
            async with asyncio.timeout(LIST_TIMEOUT_S):
                async with AsyncioClient.open(self.options.socket) as client:
                    result = await client.ask(requests.reconcile(OWNER, used))
        except (DaemonUnavailable, RpcError, TimeoutError) as error:
            log.warning(f"reconcile: the daemon did not take it ({error})")
            return None
        released = result.get("released") if isinstance(result, dict) else None
        ended = [r for r in released if isinstance(r, str)] if isinstance(released, list) else []
        if ended:
            log.info(f"reconciled with the kubelet: released {', '.join(ended[:50])}")
        return ended

    async def reconcile(self) -> None:
        while True:
            await asyncio.sleep(self.options.reconcile_interval)
            await self.reconcile_once()

    # --- the whole ---------------------------------------------------------------------------

    async def close(self) -> None:
        for endpoint in self.endpoints.values():
            await stop_quietly(endpoint.server)
            if _identity(endpoint.path) == endpoint.identity:
                with contextlib.suppress(OSError):
                    endpoint.path.unlink()
        self.endpoints.clear()

    async def main(self) -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        log.info(
            f"following the daemon on {self.options.socket}; kubelet directory "
            f"{self.options.kubelet_dir}"
        )
        tasks = [
            asyncio.create_task(work())
            for work in (self.follow, self.keep_registered, self.reconcile)
        ]
        try:
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self.close()
        return 0


def run(options: Options) -> int:
    """Serve the kubelet until SIGTERM or SIGINT; the process's exit status."""
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="hotplug-monitor kubelet-plugin: %(levelname)s %(message)s",
    )
    return asyncio.run(Plugin(options).main())
