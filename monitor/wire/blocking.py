"""A blocking client for the daemon's socket: the CLI's, and for code that has no event loop."""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from monitor.wire.errors import DaemonUnavailable
from monitor.wire.framing import ClientProtocol, Notification, Response
from monitor.wire.requests import Call

RECEIVE_SIZE = 1 << 16


def who_may(path: Path) -> str:
    """Who may connect to the socket at ``path`` and how to join them, from the file's mode and
    group (", ..." or nothing when the file cannot be looked at)."""
    try:
        st = os.stat(path)
    except OSError:
        return ""
    if not st.st_mode & 0o020:
        return f": only root and uid {st.st_uid} may connect (run it as one of them)"
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        user = str(os.getuid())
    return (
        f": only root and the group {group} may connect "
        f"(sudo usermod -aG {group} {user}, then log in again)"
    )


def connect_error(path: Path, exc: OSError) -> DaemonUnavailable:
    """What a failed connect means, in one line (every transport says it alike)."""
    if isinstance(exc, FileNotFoundError):
        return DaemonUnavailable(f"no daemon is running: {path} does not exist")
    if isinstance(exc, ConnectionRefusedError):
        return DaemonUnavailable(f"no daemon is running on {path} (connection refused)")
    if isinstance(exc, PermissionError):
        return DaemonUnavailable(f"permission denied connecting to {path}{who_may(path)}")
    return DaemonUnavailable(f"cannot connect to {path}: {exc.strerror or exc}")


class Client:
    """One connection; ``call`` one request at a time, then ``notifications`` if subscribed."""

    def __init__(self, path: Path, timeout: float | None = 10.0) -> None:
        self.path = path
        self._protocol = ClientProtocol()
        self._pending: list[Response | Notification] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(path))
        except OSError as exc:
            self._sock.close()
            raise connect_error(path, exc) from None

    def settimeout(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # wakes a thread blocked reading notifications
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _hung_up(self) -> DaemonUnavailable:
        return DaemonUnavailable(f"the daemon on {self.path} closed the connection")

    def _next(self) -> Response | Notification:
        while not self._pending:
            try:
                data = self._sock.recv(RECEIVE_SIZE)
            except ConnectionError:  # reset: it closed with our request unread
                raise self._hung_up() from None
            if not data:
                raise self._hung_up()
            self._pending.extend(self._protocol.receive(data))
        return self._pending.pop(0)

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """The method's result; ``RpcError`` if it was refused. Notifications that come before
        the answer are kept for ``notifications``."""
        request_id, data = self._protocol.request(method, params)
        try:
            self._sock.sendall(data)
        except ConnectionError:  # a broken pipe here is the daemon's, not stdout's
            raise self._hung_up() from None
        kept: list[Response | Notification] = []
        try:
            while True:
                message = self._next()
                if isinstance(message, Response) and message.id == request_id:
                    return message.value()
                if isinstance(message, Notification):
                    kept.append(message)
        finally:
            self._pending[:0] = kept

    def ask(self, call: Call) -> Any:
        return self.call(call.method, call.params)

    def messages(self) -> Iterator[Notification]:
        """Each notification, as it comes."""
        while True:
            message = self._next()
            if isinstance(message, Notification):
                yield message

    def notifications(self, method: str = "fingerprint") -> Iterator[dict[str, Any]]:
        """The params of each notification of ``method``, after subscribing."""
        for message in self.messages():
            if message.method == method:
                yield message.params
