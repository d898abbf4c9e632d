"""The protocol's error codes, and the one error class both sides use.

Standard JSON-RPC 2.0 codes, and ours (``../shared/DESIGN.md`` section 3): the daemon answers
with them; a client raises ``RpcError`` when it gets one.
"""

from __future__ import annotations

from typing import Any

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
SERVER_BUSY = -32000  # implementation-defined range: too many clients, too quiet
UNKNOWN_DEVICE = -32001
DEVICE_UNHEALTHY = -32002
DEVICE_RESERVED = -32003
PERMISSION_DENIED = -32004

RequestId = str | int | None


class RpcError(Exception):
    """An error on the wire: a JSON-RPC code, a sentence, optional data, and the request's id."""

    def __init__(
        self, code: int, message: str, data: Any = None, request_id: RequestId = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data
        self.request_id = request_id

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            body["data"] = self.data
        return body


class DaemonUnavailable(Exception):
    """Nobody answers on the socket, or the daemon closed the connection."""
