"""The asyncio client (the kubelet and Nomad plugins') against a daemon that hangs up:
DaemonUnavailable, which the plugins handle, never a bare socket error that ends their loops."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from monitor.wire.asyncio_transport import AsyncioClient
from monitor.wire.errors import DaemonUnavailable


def test_a_call_to_a_daemon_that_hung_up_is_daemon_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "monitor.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()

    async def call_after_hang_up() -> None:
        async with AsyncioClient.open(path) as client:
            accepted, _ = listener.accept()
            accepted.close()  # gone before the request is written, and before we read the end
            await client.call("fingerprint")

    try:
        with pytest.raises(DaemonUnavailable, match=r"closed the connection|broke"):
            asyncio.run(call_after_hang_up())
    finally:
        listener.close()
