"""``hotplug-monitor exporter``: one trio nursery that follows the daemon and serves /metrics.

Three tasks write what they hear into ``Known`` and the HTTP server reads it, so a scrape never
waits on the daemon:

- the snapshot, through ``monitor.wire.trio_transport.follow`` (a subscription kept through
  daemon restarts, with backoff);
- on a second connection, a ``stats`` stream at STATS_INTERVAL and the daemon's ``status``
  counters asked at the same pace, opened again whenever the daemon comes back;
- the HTTP server (``http.py``).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio

from monitor.adapters.exporter import http, metrics
from monitor.adapters.exporter.known import Known
from monitor.wire import requests
from monitor.wire.backoff import Backoff
from monitor.wire.errors import METHOD_NOT_FOUND, DaemonUnavailable, RpcError
from monitor.wire.mirror import Mirror
from monitor.wire.trio_transport import TrioClient, follow

log = logging.getLogger("hotplug-monitor.exporter")

STATS_INTERVAL = 1.0  # seconds: the daemon samples only while asked, at its 1 s minimum


INDEX = b"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>hotplug-monitor exporter</title></head>
<body><h1>hotplug-monitor exporter</h1>
<p>The devices, health, reservations and telemetry of this host's hotplug-monitor daemon,
for Prometheus: <a href="/metrics">/metrics</a>.</p></body></html>
"""


def site(known: Known) -> http.Site:
    def page(path: str) -> http.Page:
        if path == "/metrics":
            return http.Page(200, metrics.render(known), metrics.CONTENT_TYPE)
        if path == "/":
            return http.Page(200, INDEX, "text/html; charset=utf-8")
        return http.Page(404, b"not found: try /metrics\n")

    return page


class Watcher:
    """Logs the daemon's comings and goings once each, and keeps ``Known`` current."""

    def __init__(self, known: Known, socket: Path) -> None:
        self.known = known
        self.socket = socket
        self._said: bool | None = None

    async def snapshot(self, mirror: Mirror | None) -> None:
        self.known.snapshot(mirror)
        up = mirror is not None
        if up != self._said:
            if up:
                log.info("subscribed to the daemon on %s", self.socket)
            else:
                log.warning(
                    "the daemon on %s cannot be reached%s: its devices are shown stale, "
                    "hotplug_monitor_up is 0",
                    self.socket,
                    _why(self.socket),
                )
            self._said = up


def _why(socket: Path) -> str:
    """What an operator checks first when the daemon cannot be reached."""
    if not socket.exists():
        return " (no socket there: is the daemon running?)"
    if not os.access(socket, os.R_OK | os.W_OK):
        return " (permission denied: run the exporter as a member of the daemon's group)"
    return ""


async def follow_snapshot(watcher: Watcher, sleep: Callable[[float], Awaitable[Any]]) -> None:
    """The daemon's snapshot, through restarts. An answer that cannot be read (or a transport
    error ``follow`` lets through) counts as the daemon being away: we try again later."""
    backoff = Backoff()
    while True:
        try:
            await follow(watcher.socket, watcher.snapshot, backoff)
        except* Exception as group:
            log.debug("following the daemon failed: %r", group.exceptions[:3])
        await watcher.snapshot(None)
        await sleep(backoff.delay())


async def follow_telemetry(known: Known, socket: Path, interval: float = STATS_INTERVAL) -> None:
    """Device statistics and the daemon's counters, on a connection of their own."""
    backoff = Backoff()
    while True:
        try:
            async with TrioClient.open(socket) as client:
                known.stats(await client.ask(requests.stats(interval)))
                backoff.reset()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_poll_status, client, known, interval)
                    async for message in client.messages():
                        if message.method == "stats":
                            known.stats(message.params)
        except* (DaemonUnavailable, OSError, RpcError):
            pass
        except* Exception as group:  # an answer we could not read: as if the daemon were gone
            log.debug("the daemon's telemetry failed: %r", group.exceptions[:3])
        known.no_stats()
        known.no_counters()
        await trio.sleep(backoff.delay())


async def _poll_status(client: TrioClient, known: Known, interval: float) -> None:
    while True:
        try:
            known.counters(await client.ask(requests.status()))
        except RpcError as error:
            if error.code == METHOD_NOT_FOUND:  # an older daemon: no counters, statistics still
                known.no_counters()
                return
            raise
        await trio.sleep(interval)


async def run(
    socket: Path,
    listeners: list[trio.SocketListener],
    *,
    head_timeout: float = http.HEAD_TIMEOUT,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    known = Known()
    watcher = Watcher(known, socket)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow_snapshot, watcher, trio.sleep)
        nursery.start_soon(follow_telemetry, known, socket)
        server = http.Server(site(known), head_timeout=head_timeout)
        await nursery.start(http.serve, server, listeners)
        task_status.started()


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPV6]:PORT`` or ``:PORT`` (every address); ValueError says why not."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--listen must be HOST:PORT with a port from 1 to 65535, not {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"--listen: write an IPv6 address in brackets ([::1]:PORT), not {text!r}")
    return host, int(port)


def describe(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host or "*"
    return f"http://{shown}:{port}/metrics"


def main(socket: Path, listen: str, head_timeout: float = http.HEAD_TIMEOUT) -> int:
    """Run until SIGINT or SIGTERM; the exit status."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("hotplug-monitor exporter: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        host, port = parse_listen(listen)
    except ValueError as error:
        print(f"hotplug-monitor: error: {error}", file=sys.stderr)
        return 2
    if not 0 < head_timeout <= http.REQUEST_TIMEOUT:
        print(
            "hotplug-monitor: error: --head-timeout must be more than 0 and at most "
            f"{http.REQUEST_TIMEOUT:g} seconds, not {head_timeout:g}",
            file=sys.stderr,
        )
        return 2
    if os.geteuid() == 0:
        log.warning("running as root: run it as its own user in the daemon's group instead")

    async def serve() -> None:
        try:
            listeners = await http.listen(host, port)
        except OSError as error:
            raise _ListenError(f"cannot listen on {listen}: {error.strerror or error}") from None
        log.info("serving %s for the daemon on %s", describe(host, port), socket)
        with trio.open_signal_receiver(2, 15) as signals:  # SIGINT, SIGTERM
            async with trio.open_nursery() as nursery:
                await nursery.start(partial(run, socket, listeners, head_timeout=head_timeout))
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(serve)
    except _ListenError as error:
        print(f"hotplug-monitor: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


class _ListenError(Exception):
    pass
