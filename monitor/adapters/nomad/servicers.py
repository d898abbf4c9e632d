"""Nomad's two services, served for the daemon: BasePlugin (who we are, our config block) and
DevicePlugin (Fingerprint, Reserve, Stats), one class each, sharing one ``PluginState``.

Everything reaches the daemon through ``monitor.wire`` (asyncio transport); what it answers is
checked before Nomad sees it (``translate``, ``check_reservation``).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from monitor.adapters import grpc_edge
from monitor.adapters.nomad import config as settings
from monitor.adapters.nomad import translate
from monitor.adapters.nomad.daemon_view import DaemonView, fingerprints
from monitor.adapters.nomad.protos import base_pb2, base_pb2_grpc, device_pb2, device_pb2_grpc
from monitor.adapters.nomad.reconciler import Reconciler
from monitor.wire import requests
from monitor.wire.asyncio_transport import AsyncioClient
from monitor.wire.backoff import Backoff
from monitor.wire.errors import METHOD_NOT_FOUND, DaemonUnavailable, RpcError

log = logging.getLogger("nomad-plugin")

NAME = "hotplug-monitor"
# A burst of changes within this many seconds of the last Fingerprint message is one message.
COALESCE_S = 0.005
# The first Fingerprint message waits at most this long for the daemon's first answer.
FIRST_ANSWER_WAIT_S = 2.0
# How long Reserve waits for the daemon (Nomad waits on it before starting the task).
RESERVE_TIMEOUT_S = 10.0
# The daemon's range for a stats interval, in seconds.
STATS_INTERVAL_RANGE = (1.0, 3600.0)
MAX_DURATION_S = 315_576_000_000  # about 10,000 years


def plugin_version() -> str:
    try:
        return importlib.metadata.version("hotplug-monitor")
    except importlib.metadata.PackageNotFoundError:  # a checkout that was never installed
        return "0.0.0"


class PluginState:
    """The settings (from the flags, then SetConfig) and the view of the daemon."""

    def __init__(self, flags: settings.Overrides) -> None:
        self.flags = flags
        self.flag_error: str | None = None
        try:
            config = settings.settle({}, flags)
        except settings.ConfigRefused as error:
            # Said again by SetConfig, which Nomad shows; meanwhile the defaults stand.
            self.flag_error = str(error)
            config = settings.PluginConfig()
        self.view = DaemonView(config)
        self.reconciler = Reconciler(lambda: self.view.config)  # ends leases of ended tasks

    @property
    def config(self) -> settings.PluginConfig:
        return self.view.config


Context = grpc.aio.ServicerContext


class BasePlugin(base_pb2_grpc.BasePluginServicer):
    def __init__(self, state: PluginState) -> None:
        self._state = state

    async def PluginInfo(
        self,
        request: base_pb2.PluginInfoRequest,
        context: Context[base_pb2.PluginInfoRequest, base_pb2.PluginInfoResponse],
    ) -> base_pb2.PluginInfoResponse:
        return base_pb2.PluginInfoResponse(
            type=base_pb2.DEVICE,
            plugin_api_versions=[settings.DEVICE_API_VERSION],
            plugin_version=plugin_version(),
            name=NAME,
        )

    async def ConfigSchema(
        self,
        request: base_pb2.ConfigSchemaRequest,
        context: Context[base_pb2.ConfigSchemaRequest, base_pb2.ConfigSchemaResponse],
    ) -> base_pb2.ConfigSchemaResponse:
        return base_pb2.ConfigSchemaResponse(spec=settings.schema())

    async def SetConfig(
        self,
        request: base_pb2.SetConfigRequest,
        context: Context[base_pb2.SetConfigRequest, base_pb2.SetConfigResponse],
    ) -> base_pb2.SetConfigResponse:
        # Nomad validates a config without its agent settings and runs the plugin with them.
        phase = "run" if request.HasField("nomad_config") else "validate"
        api = request.plugin_api_version
        try:
            if api and api != settings.DEVICE_API_VERSION:
                raise settings.ConfigRefused(
                    f"plugin API version {api!r} is not {settings.DEVICE_API_VERSION}"
                )
            if self._state.flag_error is not None:
                raise settings.ConfigRefused(f"in the plugin's args: {self._state.flag_error}")
            config = settings.settle(settings.decode(request.msgpack_config), self._state.flags)
        except settings.ConfigRefused as error:
            log.error("config refused", extra={"phase": phase, "reason": str(error)})
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        await self._state.view.configure(config)
        log.info("configured", extra={"phase": phase, **settings.describe(config)})
        return base_pb2.SetConfigResponse()


class DevicePlugin(device_pb2_grpc.DevicePluginServicer):
    def __init__(self, state: PluginState) -> None:
        self._state = state

    async def Fingerprint(
        self,
        request: device_pb2.FingerprintRequest,
        context: Context[device_pb2.FingerprintRequest, device_pb2.FingerprintResponse],
    ) -> AsyncIterator[device_pb2.FingerprintResponse]:
        view = self._state.view
        view.start()
        self._state.reconciler.start()  # only the long-lived launch asks for a fingerprint
        async for offer in fingerprints(view, COALESCE_S, FIRST_ANSWER_WAIT_S):
            log.debug(
                "fingerprint",
                extra={
                    "version": view.version,
                    "devices": len(offer.by_device),
                    "healthy": sum(d.healthy for g in offer.groups for d in g.devices),
                },
            )
            yield offer.response()

    async def Reserve(
        self,
        request: device_pb2.ReserveRequest,
        context: Context[device_pb2.ReserveRequest, device_pb2.ReserveResponse],
    ) -> device_pb2.ReserveResponse:
        ids = list(request.device_ids)
        if not ids:  # nothing asked, nothing to hold
            return device_pb2.ReserveResponse(container_res=device_pb2.ContainerReservation())
        view = self._state.view
        view.start()
        for device_id in ids:
            refused = translate.not_offered(device_id, view.snapshot(), view.config)
            if refused is not None:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, refused)

        async def reserve() -> dict[str, Any]:
            async with AsyncioClient.open(view.config.socket) as client:
                return await grpc_edge.reserve(client, ids, translate.NOMAD_OWNER)

        result = await grpc_edge.ask(
            context,
            RESERVE_TIMEOUT_S,
            reserve,
            refused=lambda message: log.warning(
                "reserve refused", extra={"devices": ids, "reason": message}
            ),
            bad_answer=lambda error: log.error(
                "reserve answer refused", extra={"devices": ids, "reason": str(error)}
            ),
        )
        self._state.reconciler.reserved(result["device_ids"])
        log.info(
            "reserved",
            extra={"devices": result["device_ids"], "reservation": result["reservation_id"]},
        )
        return device_pb2.ReserveResponse(container_res=translate.container_reservation(result))

    async def Stats(
        self,
        request: device_pb2.StatsRequest,
        context: Context[device_pb2.StatsRequest, device_pb2.StatsResponse],
    ) -> AsyncIterator[device_pb2.StatsResponse]:
        asked = request.collection_interval
        # Protobuf's range for a Duration; past it (int64's largest seconds, say) Python's
        # timedelta overflows, so the fields are read as they are.
        if abs(asked.seconds) > MAX_DURATION_S or abs(asked.nanos) >= 1_000_000_000:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"collection_interval is not a valid duration (at most {MAX_DURATION_S:,} s); "
                f"the plugin samples every {STATS_INTERVAL_RANGE[0]:g} to "
                f"{STATS_INTERVAL_RANGE[1]:g} s",
            )
        wanted = asked.seconds + asked.nanos / 1e9
        if wanted <= 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "collection_interval must be above 0"
            )
        low, high = STATS_INTERVAL_RANGE
        interval = min(max(wanted, low), high)
        view = self._state.view
        view.start()
        backoff = Backoff(first=0.5, most=5.0)
        told = False
        while True:
            try:
                async with AsyncioClient.open(view.config.socket) as client:
                    first = await client.ask(requests.stats(interval))
                    backoff.reset()
                    yield translate.stats_response(first, view.offer)
                    async for message in client.messages():
                        if message.method == "stats":
                            yield translate.stats_response(message.params, view.offer)
            except DaemonUnavailable:
                pass  # the fingerprint says the devices are unhealthy; stats resume with it
            except RpcError as error:
                if not told:
                    told = True
                    reason = (
                        "the daemon has no stats method (it is older than this plugin)"
                        if error.code == METHOD_NOT_FOUND
                        else error.message
                    )
                    log.warning("no device statistics", extra={"reason": reason[:500]})
            await asyncio.sleep(backoff.delay())
