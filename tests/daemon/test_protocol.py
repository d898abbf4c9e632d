"""The wire contract against a running daemon on a real Unix socket: every bad request gets the
right JSON-RPC error, and nobody else notices."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import Daemon


@pytest.fixture
def daemon(start_daemon: Callable[..., Daemon]) -> Iterator[Daemon]:
    # Any machine has PCI devices of some class; 0x06 (bridges) or 0xff cover VMs and hosts.
    yield start_daemon("--udev-source", "kernel", "--match-class", "0x06", "--match-class", "0xff")


class Raw:
    """A client that sends raw bytes and reads raw lines."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.reader = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self) -> dict[str, Any]:
        line = self.reader.readline()
        assert line.endswith(b"\n"), line
        message: dict[str, Any] = json.loads(line)
        return message

    def request(self, method: str, params: Any = None, request_id: Any = 1) -> dict[str, Any]:
        body: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            body["params"] = params
        self.send(json.dumps(body).encode() + b"\n")
        return self.read()

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def error_code(message: dict[str, Any]) -> int:
    assert "error" in message, message
    assert isinstance(message["error"]["message"], str) and message["error"]["message"]
    code: int = message["error"]["code"]
    return code


@pytest.mark.parametrize(
    ("payload", "code", "echoes_id"),
    [
        (b"{not json\n", -32700, False),
        (b"\xff\xfe garbage\n", -32700, False),
        (b'"just a string"\n', -32600, False),
        (b'{"jsonrpc": "2.0", "id": 7, "method": "fingerprint", "x": NaN}\n', -32700, False),
        (b'{"jsonrpc": "2.0", "id": 7.5, "method": "fingerprint"}\n', -32600, False),
        (b'[{"jsonrpc": "2.0", "id": 1, "method": "fingerprint"}]\n', -32600, False),
        (b'{"id": 7, "method": "fingerprint"}\n', -32600, True),
        (b'{"jsonrpc": "2.0", "id": 7, "method": 42}\n', -32600, True),
        (b'{"jsonrpc": "2.0", "id": 7, "method": "frobnicate"}\n', -32601, True),
        (b'{"jsonrpc": "2.0", "id": 7, "method": "fingerprint", "params": [1]}\n', -32602, True),
        (
            b'{"jsonrpc": "2.0", "id": 7, "method": "fingerprint", "params": {"x": 1}}\n',
            -32602,
            True,
        ),
        (b'{"jsonrpc": "2.0", "id": 7, "method": "reserve", "params": {}}\n', -32602, True),
        (
            b'{"jsonrpc":"2.0","id":7,"method":"reserve","params":{"device_ids":"a"}}\n',
            -32602,
            True,
        ),
        (
            b'{"jsonrpc":"2.0","id":7,"method":"reserve","params":{"device_ids":[1]}}\n',
            -32602,
            True,
        ),
        (b'{"jsonrpc":"2.0","id":7,"method":"release","params":{"nope":1}}\n', -32602, True),
    ],
)
def test_bad_requests_get_the_right_error_and_the_connection_goes_on(
    daemon: Daemon, payload: bytes, code: int, echoes_id: bool
) -> None:
    raw = Raw(str(daemon.socket))
    try:
        raw.send(payload)
        answer = raw.read()
        assert answer["jsonrpc"] == "2.0"
        assert error_code(answer) == code
        assert answer["id"] == (7 if echoes_id else None)
        # the same connection still works
        assert "snapshot" in raw.request("fingerprint")["result"]
    finally:
        raw.close()


def test_unknown_device_names_it_in_data(daemon: Daemon) -> None:
    raw = Raw(str(daemon.socket))
    answer = raw.request("reserve", {"device_ids": ["0000:ee:00.0", "GPU-nope"]})
    assert error_code(answer) == -32001
    assert answer["error"]["data"] == {"device_ids": ["0000:ee:00.0", "GPU-nope"]}
    raw.close()


def test_oversized_line_is_refused_and_closed_while_others_carry_on(daemon: Daemon) -> None:
    bystander = Raw(str(daemon.socket))
    assert bystander.request("subscribe")["result"]["generation"] >= 0
    big = Raw(str(daemon.socket))
    big.send(b'{"jsonrpc": "2.0", "id": 1, "method": "fingerprint", "pad": "')
    # the daemon may close before we finish writing; its error line was sent first
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        big.send(b"x" * (1 << 20) + b'"}\n')
    answer = big.read()
    assert error_code(answer) == -32600 and "1 MiB" in answer["error"]["message"]
    assert big.reader.readline() == b""  # closed
    big.close()
    # the subscriber's connection and new ones are untouched
    assert "snapshot" in bystander.request("fingerprint", request_id="after")["result"]
    assert "snapshot" in Raw(str(daemon.socket)).request("fingerprint")["result"]
    bystander.close()


def test_a_line_of_exactly_one_mib_is_accepted(daemon: Daemon) -> None:
    raw = Raw(str(daemon.socket))
    head = b'{"jsonrpc":"2.0","id":1,"method":"fingerprint","params":{},"pad":"'
    tail = b'"}'
    raw.send(head + b"x" * ((1 << 20) - len(head) - len(tail)) + tail + b"\n")
    assert "snapshot" in raw.read()["result"]
    raw.close()


def test_notifications_get_no_answer_and_blank_lines_are_ignored(daemon: Daemon) -> None:
    raw = Raw(str(daemon.socket))
    raw.send(b'{"jsonrpc": "2.0", "method": "fingerprint"}\n\n   \n')
    answer = raw.request("fingerprint", request_id="next")
    assert answer["id"] == "next"
    raw.close()


def test_subscribing_twice_on_one_connection_is_an_error(daemon: Daemon) -> None:
    raw = Raw(str(daemon.socket))
    assert "snapshot" in raw.request("subscribe")["result"]
    assert error_code(raw.request("subscribe", request_id=2)) == -32600
    raw.close()


def test_requests_split_across_writes_and_pipelined_in_one_write(daemon: Daemon) -> None:
    raw = Raw(str(daemon.socket))
    request = b'{"jsonrpc": "2.0", "id": 1, "method": "fingerprint"}\n'
    raw.send(request[:10])
    raw.send(request[10:] + request.replace(b'"id": 1', b'"id": 2'))
    assert [raw.read()["id"], raw.read()["id"]] == [1, 2]
    raw.close()
