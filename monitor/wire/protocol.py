"""JSON-RPC 2.0 over newline-delimited JSON, without any I/O: bytes in, requests out, bytes back.

The server feeds received bytes to a ``LineBuffer``, parses each line with ``parse_request`` and
writes what the ``encode_*`` functions return. Clients use the same encoders.
"""

from __future__ import annotations

import json
import re
from typing import Any

import attrs

MAX_LINE = 1 << 20  # 1 MiB, newline excluded

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
SERVER_BUSY = -32000  # implementation-defined range: too many clients
UNKNOWN_DEVICE = -32001
DEVICE_UNHEALTHY = -32002
DEVICE_RESERVED = -32003
PERMISSION_DENIED = -32004

RequestId = str | int | None

# What a reservation may hand a container, in the shapes the daemon plans them: a client checks
# what it got against these before printing it for a shell or passing it to a container engine,
# so that a daemon it should not have trusted cannot run commands or expose host files.
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
DEVICE_NODE = re.compile(
    r"/dev/(nvidia[0-9]{1,3}|nvidiactl|nvidia-uvm|nvidia-uvm-tools|nvidia-modeset|kfd"
    r"|dri/(card|renderD)[0-9]{1,7})"
)
DEVICE_LINK = re.compile(
    r"/dev/dri/by-path/pci-[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]-(card|render)"
)
CGROUP_PERMS = re.compile(r"r?w?m?")


class RpcError(Exception):
    """An error to send back to the client: a JSON-RPC code, a sentence, and optional data."""

    def __init__(
        self, code: int, message: str, data: Any = None, request_id: RequestId = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data
        self.request_id = request_id


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


def parse_request(line: bytes) -> Request:
    """One line to a ``Request``; raises ``RpcError`` with the right code when it is not one."""
    try:
        # Decoded here, not by json.loads: the wire is UTF-8 only, never UTF-16 or UTF-32.
        message = json.loads(line.decode("utf-8"), parse_constant=_not_json)
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
    body: dict[str, Any] = {"code": error.code, "message": error.message}
    if error.data is not None:
        body["data"] = error.data
    return dumps({"jsonrpc": "2.0", "id": error.request_id, "error": body}) + b"\n"


def encode_notification(method: str, params: Any) -> bytes:
    return dumps({"jsonrpc": "2.0", "method": method, "params": params}) + b"\n"


def encode_raw_notification(method: str, params_json: bytes) -> bytes:
    return b'{"jsonrpc":"2.0","method":' + dumps(method) + b',"params":' + params_json + b"}\n"


def encode_request(request_id: RequestId, method: str, params: dict[str, Any]) -> bytes:
    return dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}) + b"\n"
