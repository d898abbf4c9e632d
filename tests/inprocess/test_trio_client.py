"""The trio client against a daemon that goes away: DaemonUnavailable, never trio's errors."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio
import trio.testing

from monitor.wire.errors import DaemonUnavailable
from monitor.wire.trio_transport import TrioClient


async def test_a_call_to_a_daemon_that_closed_the_connection_is_daemon_unavailable(
    tmp_path: Path,
) -> None:
    path = tmp_path / "monitor.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    async with TrioClient.open(path) as client:
        accepted, _ = listener.accept()
        accepted.close()  # the daemon went away before the request was written
        await trio.testing.wait_all_tasks_blocked()  # the client has read the end
        with pytest.raises(DaemonUnavailable, match=r"closed the connection|broke"):
            await client.call("fingerprint")
    listener.close()
