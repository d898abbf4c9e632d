"""A small blocking client for the daemon's socket, used by the CLI and the tests."""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import json_merge_patch

from monitor.wire.protocol import (
    CGROUP_PERMS,
    DEVICE_LINK,
    DEVICE_NODE,
    ENV_NAME,
    encode_request,
)


class DaemonUnavailable(Exception):
    """Nobody answers on the socket."""


class BadAnswer(Exception):
    """The daemon answered with something no client should use; the message says what."""


class RpcFailure(Exception):
    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


class Client:
    def __init__(self, path: Path, timeout: float | None = 10.0) -> None:
        self.path = path
        self._ids = itertools.count(1)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(path))
        except FileNotFoundError:
            self._sock.close()
            raise DaemonUnavailable(f"no daemon is running: {path} does not exist") from None
        except ConnectionRefusedError:
            self._sock.close()
            raise DaemonUnavailable(
                f"no daemon is running on {path} (connection refused)"
            ) from None
        except PermissionError:
            self._sock.close()
            raise DaemonUnavailable(f"permission denied connecting to {path}") from None
        self._reader = self._sock.makefile("rb")

    def settimeout(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # wakes a thread blocked reading notifications
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._reader.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self) -> dict[str, Any]:
        line = self._reader.readline()
        if not line:
            raise DaemonUnavailable(f"the daemon on {self.path} closed the connection")
        message: dict[str, Any] = json.loads(line)
        return message

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        request_id = next(self._ids)
        self._sock.sendall(encode_request(request_id, method, params or {}))
        while True:
            message = self._read()
            if message.get("id") == request_id:
                break
        if "error" in message:
            error = message["error"]
            raise RpcFailure(error["code"], error["message"], error.get("data"))
        return message["result"]

    def notifications(self) -> Iterator[dict[str, Any]]:
        """The params of each ``fingerprint`` notification, after ``call("subscribe")``."""
        while True:
            message = self._read()
            if message.get("method") == "fingerprint":
                yield message["params"]


class Mirror:
    """A client's copy of the snapshot, kept current by applying notifications."""

    def __init__(self, result: dict[str, Any]) -> None:
        self.generation: int = result["generation"]
        self.snapshot: dict[str, Any] = result["snapshot"]

    def apply(self, params: dict[str, Any]) -> None:
        if "snapshot" in params:
            self.snapshot = params["snapshot"]
        else:
            if params["base"] != self.generation:
                raise ValueError(f"patch base {params['base']} != generation {self.generation}")
            self.snapshot = json_merge_patch.merge(copy.deepcopy(self.snapshot), params["patch"])
        self.generation = params["generation"]

    def devices(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """Every device by ID, with its group key."""
        return {
            device_id: (key, device)
            for key, group in self.snapshot["groups"].items()
            for device_id, device in group["devices"].items()
        }


_ID = re.compile(r"[A-Za-z0-9:._-]{1,64}")  # reservation and device IDs: safe to print anywhere


def check_reservation(result: Any) -> dict[str, Any]:
    """A ``reserve`` result whose every part has a shape the daemon plans
    (``monitor.wire.protocol``); ``BadAnswer`` naming the first that does not."""

    def bad(what: str, value: Any) -> BadAnswer:
        return BadAnswer(f"refusing the daemon's reservation: {what} {str(value)[:80]!r}")

    if not isinstance(result, dict):
        raise bad("not an object:", result)
    for text in [result.get("reservation_id"), *(result.get("device_ids") or [None])]:
        if not isinstance(text, str) or not _ID.fullmatch(text):
            raise bad("an unexpected ID", text)
    envs = result.get("envs")
    if not isinstance(envs, dict):
        raise bad("envs is not an object:", envs)
    for name, value in envs.items():
        if not ENV_NAME.fullmatch(name):
            raise bad("an environment variable name", name)
        if not isinstance(value, str) or not value.isprintable():
            raise bad(f"the value of {name}", value)
    for device in _list(result, "devices", bad):
        host, task, perms = (device.get(k) for k in ("host_path", "task_path", "cgroup_perms"))
        if not isinstance(host, str) or host != task or not DEVICE_NODE.fullmatch(host):
            raise bad("a device node", host)
        if not isinstance(perms, str) or not perms or not CGROUP_PERMS.fullmatch(perms):
            raise bad("cgroup permissions", perms)
    for mount in _list(result, "mounts", bad):
        host, task = mount.get("host_path"), mount.get("task_path")
        if not isinstance(host, str) or host != task or not DEVICE_LINK.fullmatch(host):
            raise bad("a mount", host)
        if mount.get("read_only") is not True:
            raise bad("a writable mount of", host)
    return result


def _list(result: dict[str, Any], key: str, bad: Any) -> list[dict[str, Any]]:
    items = result.get(key)
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise bad(f"{key} is not a list of objects:", items)
    return items
