"""JSON-RPC 2.0 over newline-delimited JSON, without any I/O: bytes in, messages out, bytes back.

The server feeds received bytes to a ``LineBuffer``, parses each line with ``parse_request`` and
writes what the ``encode_*`` functions return; a client does the same the other way round with
``ClientProtocol``. Transports (``monitor.wire.blocking``, ``trio_transport``,
``asyncio_transport``) only move the bytes.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import attrs

from monitor.wire.errors import INVALID_PARAMS, INVALID_REQUEST, PARSE_ERROR, RequestId, RpcError

MAX_LINE = 1 << 20  # 1 MiB, newline excluded: what the daemon takes from a client
MAX_ANSWER_LINE = 256 << 20  # what a client takes from the daemon (a snapshot of many devices)


class LineTooLong(Exception):
    pass


@attrs.frozen
class Request:
    id: RequestId
    method: str
    params: dict[str, Any]
    is_notification: bool = False


class LineBuffer:
    """Splits a byte stream into lines, refusing any line longer than ``limit`` bytes."""

    def __init__(self, limit: int = MAX_LINE) -> None:
        self._limit = limit
        self._pending = bytearray()

    @property
    def pending(self) -> int:
        """Bytes of a line begun and not yet finished."""
        return len(self._pending)

    def clear(self) -> None:
        self._pending = bytearray()

    def feed(self, data: bytes | bytearray) -> list[bytes]:
        self._pending += data
        if b"\n" not in data:
            if len(self._pending) > self._limit:
                raise LineTooLong(f"a line is longer than {self._limit} bytes")
            return []
        *lines, rest = self._pending.split(b"\n")
        if len(rest) > self._limit or max(map(len, lines)) > self._limit:
            raise LineTooLong(f"a line is longer than {self._limit} bytes")
        self._pending = bytearray(rest)
        return [bytes(line) for line in lines]


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


# One decoder for every request: ``json.loads`` with an argument builds a decoder per call, and
# the attribute names its C scanner looks up stay in CPython's type cache, each pinning a heap
# page long after a burst of connections is gone.
_DECODER = json.JSONDecoder(parse_constant=_not_json)


def parse_request(line: bytes) -> Request:
    """One line to a ``Request``; raises ``RpcError`` with the right code when it is not one."""
    try:
        # Decoded here, not by json.loads: the wire is UTF-8 only, never UTF-16 or UTF-32.
        message = _DECODER.decode(line.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise RpcError(PARSE_ERROR, f"The request is not valid UTF-8 JSON: {exc}.") from None
    if isinstance(message, list):
        raise RpcError(INVALID_REQUEST, "Batch requests are not supported; send one per line.")
    if not isinstance(message, dict):
        raise RpcError(INVALID_REQUEST, "A request must be a JSON object.")
    request_id = message.get("id")
    if not isinstance(request_id, str | int | None) or isinstance(request_id, bool):
        raise RpcError(INVALID_REQUEST, "The request id must be a string, an integer or null.")
    if message.get("jsonrpc") != "2.0":
        raise RpcError(
            INVALID_REQUEST, 'The request must carry "jsonrpc": "2.0".', None, request_id
        )
    method = message.get("method")
    if not isinstance(method, str):
        raise RpcError(INVALID_REQUEST, "The request method must be a string.", None, request_id)
    params = message.get("params", {})
    if not isinstance(params, dict):
        raise RpcError(INVALID_PARAMS, "Params must be an object (by name).", None, request_id)
    return Request(request_id, method, params, is_notification="id" not in message)


def dumps(value: Any) -> bytes:
    """Compact JSON bytes, as every message on the wire is written."""
    return json.dumps(value, separators=(",", ":")).encode()


def encode_result(request_id: RequestId, result: Any) -> bytes:
    return dumps({"jsonrpc": "2.0", "id": request_id, "result": result}) + b"\n"


def encode_raw_result(request_id: RequestId, result_json: bytes) -> bytes:
    """A response whose result is already encoded (the cached snapshot), without re-encoding it."""
    return b'{"jsonrpc":"2.0","id":' + dumps(request_id) + b',"result":' + result_json + b"}\n"


def encode_error(error: RpcError) -> bytes:
    return dumps({"jsonrpc": "2.0", "id": error.request_id, "error": error.to_json()}) + b"\n"


def encode_notification(method: str, params: Any) -> bytes:
    return dumps({"jsonrpc": "2.0", "method": method, "params": params}) + b"\n"


def encode_raw_notification(method: str, params_json: bytes) -> bytes:
    return b'{"jsonrpc":"2.0","method":' + dumps(method) + b',"params":' + params_json + b"}\n"


def encode_request(request_id: RequestId, method: str, params: dict[str, Any]) -> bytes:
    return dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}) + b"\n"


# --- the client's side ------------------------------------------------------------------------


@attrs.frozen
class Response:
    """The answer to request ``id``: its result, or the error it got."""

    id: RequestId
    result: Any = None
    error: RpcError | None = None

    def value(self) -> Any:
        """The result; the error raised."""
        if self.error is not None:
            raise self.error
        return self.result


@attrs.frozen
class Notification:
    method: str  # "fingerprint", "stats"
    params: Any


Message = Response | Notification


class ProtocolError(Exception):
    """The daemon sent something that is not a JSON-RPC response or notification."""


class ClientProtocol:
    """A client's side of one connection, without I/O: requests to bytes, bytes to messages."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._buffer = LineBuffer(MAX_ANSWER_LINE)

    def request(self, method: str, params: dict[str, Any] | None = None) -> tuple[int, bytes]:
        """A new request's id and its bytes."""
        request_id = next(self._ids)
        return request_id, encode_request(request_id, method, params or {})

    def receive(self, data: bytes) -> list[Message]:
        """The messages ``data`` completes."""
        try:
            lines = self._buffer.feed(data)
        except LineTooLong as exc:
            raise ProtocolError(str(exc)) from None
        return [parse_message(line) for line in lines if line.strip()]


def parse_message(line: bytes) -> Message:
    """One line from the daemon as a response or a notification."""
    try:
        message = json.loads(line)
    except ValueError as exc:
        raise ProtocolError(f"the daemon sent a line that is not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError("the daemon sent a JSON value that is not an object")
    if "method" in message and "id" not in message:
        return Notification(str(message["method"]), message.get("params"))
    if "result" in message:
        return Response(message.get("id"), message["result"])
    error = message.get("error")
    if isinstance(error, dict) and isinstance(error.get("code"), int):
        rpc = RpcError(error["code"], str(error.get("message")), error.get("data"), message["id"])
        return Response(message.get("id"), error=rpc)
    raise ProtocolError("the daemon sent a message that is neither answer nor notification")
