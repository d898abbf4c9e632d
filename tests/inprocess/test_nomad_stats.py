"""The Nomad plugin's Stats over real gRPC in this process: an interval no Duration may hold
(int64's largest seconds, nanoseconds past a second) is refused with INVALID_ARGUMENT, before
anything asks the daemon."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2

from monitor.adapters.nomad import config, servicers
from monitor.adapters.nomad.protos import device_pb2, device_pb2_grpc


async def stats_error(socket: Path, interval: duration_pb2.Duration) -> grpc.aio.AioRpcError:
    server = grpc.aio.server()
    state = servicers.PluginState(config.Overrides())
    device_pb2_grpc.add_DevicePluginServicer_to_server(servicers.DevicePlugin(state), server)
    server.add_insecure_port(f"unix:{socket}")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
            call = device_pb2_grpc.DevicePluginStub(channel).Stats(
                device_pb2.StatsRequest(collection_interval=interval), timeout=10
            )
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call.read()
            return raised.value
    finally:
        await server.stop(None)


@pytest.mark.parametrize(
    "interval",
    [
        duration_pb2.Duration(seconds=2**63 - 1),
        duration_pb2.Duration(seconds=-(2**63)),
        duration_pb2.Duration(seconds=1, nanos=2_000_000_000),
    ],
)
def test_an_interval_no_duration_may_hold_is_invalid_argument(
    tmp_path: Path, interval: duration_pb2.Duration
) -> None:
    error = asyncio.run(stats_error(tmp_path / "plugin.sock", interval))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert "collection_interval is not a valid duration" in (error.details() or "")
