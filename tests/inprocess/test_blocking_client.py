"""The blocking client (the CLI's) against a daemon that hangs up: DaemonUnavailable, never a
socket error, and the CLI says so in one line instead of taking the broken pipe for stdout's."""

from __future__ import annotations

import json
import select
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from monitor.cli import main
from monitor.wire.blocking import Client
from monitor.wire.errors import DaemonUnavailable

FINGERPRINT = {"generation": 1, "snapshot": {"groups": {}}}


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[socket.socket]:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp_path / "monitor.sock"))
    server.listen()
    yield server
    server.close()


def answer_once(
    listener: socket.socket, then: Callable[[socket.socket], object]
) -> threading.Thread:
    """A daemon that answers the first request on one connection, does ``then``, and hangs up."""

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            with conn.makefile("rb") as lines:
                request = json.loads(lines.readline())
            reply = {"jsonrpc": "2.0", "id": request["id"], "result": FINGERPRINT}
            conn.sendall(json.dumps(reply).encode() + b"\n")
            then(conn)

    thread = threading.Thread(target=serve)
    thread.start()
    return thread


def next_request_waiting(conn: socket.socket) -> None:
    select.select([conn], [], [], 5)


def test_a_request_to_a_daemon_that_hung_up_is_daemon_unavailable(
    listener: socket.socket,
) -> None:
    with Client(Path(listener.getsockname())) as client:
        accepted, _ = listener.accept()
        accepted.close()  # gone before the request is written: a broken pipe
        with pytest.raises(DaemonUnavailable, match="closed the connection"):
            client.call("fingerprint")


def test_a_daemon_that_hangs_up_with_the_request_unread_is_daemon_unavailable(
    listener: socket.socket,
) -> None:
    thread = answer_once(listener, then=next_request_waiting)  # closed unread: a reset
    with Client(Path(listener.getsockname())) as client:
        assert client.call("fingerprint") == FINGERPRINT
        with pytest.raises(DaemonUnavailable, match="closed the connection"):
            client.call("leases")
    thread.join()


@pytest.mark.parametrize("then", [next_request_waiting, lambda conn: None])
def test_the_cli_says_in_one_line_that_the_daemon_hung_up_mid_command(
    listener: socket.socket,
    capsys: pytest.CaptureFixture[str],
    then: Callable[[socket.socket], object],
) -> None:
    """``devices`` asks twice; the daemon answers once and goes. That is an error (exit 1), not
    the quiet exit 0 of a reader that closed our stdout, nor a traceback."""
    thread = answer_once(listener, then)
    status = main(["devices", "--socket", listener.getsockname()])
    thread.join()
    out, err = capsys.readouterr()
    assert status == 1 and out == "", (out, err)
    assert err.count("\n") == 1 and "closed the connection" in err, err
