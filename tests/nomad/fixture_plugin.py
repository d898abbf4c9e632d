"""A Nomad device plugin with fixed devices, served by monitor.adapters.nomad.goplugin, for
testing the go-plugin harness without our daemon:

    python -m tests.nomad.fixture_plugin     (started by tests/nomad/host, never by hand)

One servicer class per gRPC service, as the real plugin will have, sharing one FixtureState.
Things the tests look for: SIGUSR1 turns the second device unhealthy (and back), which sends
a Fingerprint message; every SetConfig is logged at info level with its phase; a warning is
logged at start; and a line is printed on stdout on purpose, which must not reach the host.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import signal
import sys
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import grpc
import msgpack
from google.protobuf import timestamp_pb2, wrappers_pb2

from monitor.adapters.nomad import goplugin
from monitor.adapters.nomad.protos import (
    base_pb2,
    base_pb2_grpc,
    device_pb2,
    device_pb2_grpc,
    hclspec_pb2,
    structs_pb2,
)

NAME = "hotplug-monitor-fixture"
VERSION = "0.1.0"
DEVICE_API_VERSION = "v0.1.0"
VENDOR, TYPE, MODEL = "nvidia", "gpu", "Fixture GPU 80GB"
DEVICE_IDS = ("0000:3b:00.0", "0000:86:00.0")
MEMORY_MIB = 81920

log = logging.getLogger("fixture")


def _default(attr: hclspec_pb2.Attr, literal: str) -> hclspec_pb2.Spec:
    return hclspec_pb2.Spec(
        default=hclspec_pb2.Default(
            primary=hclspec_pb2.Spec(Attr=attr),
            default=hclspec_pb2.Spec(literal=hclspec_pb2.Literal(value=literal)),
        )
    )


# Shaped like the real plugin's config: the daemon socket and devices to leave out.
CONFIG_SCHEMA = hclspec_pb2.Spec(
    object=hclspec_pb2.Object(
        attributes={
            "socket": _default(
                hclspec_pb2.Attr(name="socket", type="string"),
                '"/run/hotplug-monitor/monitor.sock"',
            ),
            "ignored_device_ids": _default(
                hclspec_pb2.Attr(name="ignored_device_ids", type="list(string)"), "[]"
            ),
        }
    )
)


class FixtureState:
    """The fixed devices, their health, the config; ``changed`` wakes Fingerprint streams."""

    def __init__(self) -> None:
        self.healthy = dict.fromkeys(DEVICE_IDS, True)
        self.ignored: frozenset[str] = frozenset()
        self.socket = ""
        self.generation = 0
        self.changed = asyncio.Condition()

    def newer_than(self, generation: int) -> bool:
        return self.generation != generation

    async def flip_second_device(self) -> None:
        second = DEVICE_IDS[1]
        async with self.changed:
            self.healthy[second] = not self.healthy[second]
            self.generation += 1
            self.changed.notify_all()
        log.info("device health changed", extra={"device": second, "healthy": self.healthy[second]})

    def device_groups(self) -> list[device_pb2.DeviceGroup]:
        devices = [
            device_pb2.DetectedDevice(
                ID=device_id,
                healthy=healthy,
                health_description="" if healthy else "fixture: marked unhealthy by SIGUSR1",
                hw_locality=device_pb2.DeviceLocality(pci_bus_id=device_id),
            )
            for device_id, healthy in self.healthy.items()
            if device_id not in self.ignored
        ]
        return [
            device_pb2.DeviceGroup(
                vendor=VENDOR,
                device_type=TYPE,
                device_name=MODEL,
                devices=devices,
                attributes={
                    "memory": structs_pb2.Attribute(int_val=MEMORY_MIB, unit="MiB"),
                    "model": structs_pb2.Attribute(string_val=MODEL),
                },
            )
        ]


def parse_config(raw: bytes) -> dict[str, Any]:
    """The msgpack map Nomad sends, checked; raises ValueError with a sentence."""
    try:
        config = msgpack.unpackb(raw, raw=False) if raw else {}
    except (ValueError, msgpack.UnpackException) as error:
        raise ValueError(f"config is not valid MessagePack: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"config must be a map, not {type(config).__name__}")
    unknown = sorted(set(config) - {"socket", "ignored_device_ids"})
    if unknown:
        raise ValueError(f"unknown config keys: {', '.join(map(str, unknown))}")
    socket = config.get("socket") or ""
    if not isinstance(socket, str) or not socket.startswith("/"):
        raise ValueError(f"socket must be an absolute path, not {socket!r}")
    ignored = config.get("ignored_device_ids") or []
    if not isinstance(ignored, list) or not all(isinstance(i, str) for i in ignored):
        raise ValueError("ignored_device_ids must be a list of device IDs")
    return {"socket": socket, "ignored_device_ids": ignored}


class FixtureBasePlugin(base_pb2_grpc.BasePluginServicer):
    def __init__(self, state: FixtureState) -> None:
        self._state = state

    async def PluginInfo(
        self,
        request: base_pb2.PluginInfoRequest,
        context: grpc.aio.ServicerContext[base_pb2.PluginInfoRequest, base_pb2.PluginInfoResponse],
    ) -> base_pb2.PluginInfoResponse:
        return base_pb2.PluginInfoResponse(
            type=base_pb2.DEVICE,
            plugin_api_versions=[DEVICE_API_VERSION],
            plugin_version=VERSION,
            name=NAME,
        )

    async def ConfigSchema(
        self,
        request: base_pb2.ConfigSchemaRequest,
        context: grpc.aio.ServicerContext[
            base_pb2.ConfigSchemaRequest, base_pb2.ConfigSchemaResponse
        ],
    ) -> base_pb2.ConfigSchemaResponse:
        return base_pb2.ConfigSchemaResponse(spec=CONFIG_SCHEMA)

    async def SetConfig(
        self,
        request: base_pb2.SetConfigRequest,
        context: grpc.aio.ServicerContext[base_pb2.SetConfigRequest, base_pb2.SetConfigResponse],
    ) -> base_pb2.SetConfigResponse:
        # Nomad validates the config without agent settings, and runs the plugin with them.
        phase = "run" if request.HasField("nomad_config") else "validate"
        try:
            config = parse_config(request.msgpack_config)
        except ValueError as error:
            log.warning("config refused", extra={"phase": phase, "reason": str(error)})
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        if request.plugin_api_version != DEVICE_API_VERSION:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"plugin API version {request.plugin_api_version!r} is not {DEVICE_API_VERSION}",
            )
        self._state.socket = config["socket"]
        self._state.ignored = frozenset(config["ignored_device_ids"])
        log.info(
            "SetConfig",
            extra={
                "phase": phase,
                "socket": config["socket"],
                "client_max_port": request.nomad_config.driver.ClientMaxPort,
            },
        )
        return base_pb2.SetConfigResponse()


class FixtureDevicePlugin(device_pb2_grpc.DevicePluginServicer):
    def __init__(self, state: FixtureState) -> None:
        self._state = state

    async def Fingerprint(
        self,
        request: device_pb2.FingerprintRequest,
        context: grpc.aio.ServicerContext[
            device_pb2.FingerprintRequest, device_pb2.FingerprintResponse
        ],
    ) -> AsyncIterator[device_pb2.FingerprintResponse]:
        seen = -1
        while True:
            async with self._state.changed:
                await self._state.changed.wait_for(partial(self._state.newer_than, seen))
                seen = self._state.generation
                groups = self._state.device_groups()
            yield device_pb2.FingerprintResponse(device_group=groups)

    async def Reserve(
        self,
        request: device_pb2.ReserveRequest,
        context: grpc.aio.ServicerContext[device_pb2.ReserveRequest, device_pb2.ReserveResponse],
    ) -> device_pb2.ReserveResponse:
        for device_id in request.device_ids:
            if device_id not in self._state.healthy:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown device {device_id}")
            if not self._state.healthy[device_id]:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION, f"device {device_id} is unhealthy"
                )
        numbers = [DEVICE_IDS.index(d) for d in request.device_ids]
        return device_pb2.ReserveResponse(
            container_res=device_pb2.ContainerReservation(
                envs={"FIXTURE_VISIBLE_DEVICES": ",".join(request.device_ids)},
                mounts=[
                    device_pb2.Mount(
                        task_path="/usr/lib/fixture", host_path="/usr/lib/fixture", read_only=True
                    )
                ],
                devices=[
                    device_pb2.DeviceSpec(
                        task_path=f"/dev/fixture{n}", host_path=f"/dev/fixture{n}", permissions="rw"
                    )
                    for n in numbers
                ],
            )
        )

    async def Stats(
        self,
        request: device_pb2.StatsRequest,
        context: grpc.aio.ServicerContext[device_pb2.StatsRequest, device_pb2.StatsResponse],
    ) -> AsyncIterator[device_pb2.StatsResponse]:
        interval = request.collection_interval.ToTimedelta().total_seconds()
        if interval <= 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "collection_interval must be > 0")
        sample = 0
        while True:
            now = timestamp_pb2.Timestamp()
            now.FromDatetime(datetime.datetime.now(datetime.UTC))
            instance_stats = {
                device_id: device_pb2.DeviceStats(
                    summary=structs_pb2.StatValue(
                        float_numerator_val=wrappers_pb2.DoubleValue(value=1024.0 * (n + 1)),
                        float_denominator_val=wrappers_pb2.DoubleValue(value=MEMORY_MIB),
                        unit="MiB",
                        desc="Memory used",
                    ),
                    stats=structs_pb2.StatObject(
                        attributes={
                            "Power usage": structs_pb2.StatValue(
                                int_numerator_val=wrappers_pb2.Int64Value(value=70 + sample),
                                unit="W",
                            ),
                        }
                    ),
                    timestamp=now,
                )
                for n, device_id in enumerate(DEVICE_IDS)
                if device_id not in self._state.ignored
            }
            yield device_pb2.StatsResponse(
                groups=[
                    device_pb2.DeviceGroupStats(
                        vendor=VENDOR, type=TYPE, name=MODEL, instance_stats=instance_stats
                    )
                ]
            )
            sample += 1
            await asyncio.sleep(interval)


def _on_sigusr1(state: FixtureState, server: grpc.aio.Server) -> None:
    """A registrar that only installs the fixture's trigger (registrars run in the loop)."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    def flip() -> None:
        task = loop.create_task(state.flip_second_device())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    loop.add_signal_handler(signal.SIGUSR1, flip)


def registrars(state: FixtureState) -> list[goplugin.Registrar]:
    return [
        partial(base_pb2_grpc.add_BasePluginServicer_to_server, FixtureBasePlugin(state)),
        partial(device_pb2_grpc.add_DevicePluginServicer_to_server, FixtureDevicePlugin(state)),
        partial(_on_sigusr1, state),
        _log_at_start,
    ]


def _log_at_start(server: grpc.aio.Server) -> None:
    log.warning("fixture plugin starting", extra={"devices": len(DEVICE_IDS)})
    # On purpose: goplugin must keep this off the host's stdout.
    print("stray output from the fixture plugin")


def main() -> int:
    return goplugin.main(registrars(FixtureState()))


if __name__ == "__main__":
    sys.exit(main())
