"""The one nursery: socket server, reducer task, sources, and the systemd chores, wired one way.

sources -> bounded memory channel -> reducer task -> hub -> connections. Nothing but the reducer
task changes the state.
"""

from __future__ import annotations

import gc
import logging
import os
import resource
import signal
import socket
from collections.abc import Callable
from functools import partial

import attrs
import trio

from monitor import logs, systemd
from monitor.config import ConfigError, Settings
from monitor.events import ClassFilterChanged, Event
from monitor.hub import Hub
from monitor.reducer import State, health_transitions, reduce_all
from monitor.server import Server, bind_unix_socket
from monitor.sources.udev import run_udev_source

log = logging.getLogger(__name__)

EVENT_BUFFER = 16  # batches; a full buffer makes the sources wait, and the kernel buffer absorb
MAX_COALESCED = 4096  # events folded into one patch when they are already waiting
STATUS_MIN_INTERVAL = 0.1  # seconds between STATUS= updates, however busy the host


async def run_reducer(hub: Hub, receive: trio.MemoryReceiveChannel[tuple[Event, ...]]) -> None:
    async for batch in receive:
        events = list(batch)
        while len(events) < MAX_COALESCED:
            try:
                events.extend(receive.receive_nowait())
            except trio.WouldBlock:
                break
        old = hub.state
        state, patch = reduce_all(old, events)
        if patch is not None:
            for transition in health_transitions(old, state):
                logs.report_health(log, transition)
        hub.publish(state, patch)


def status_line(hub: Hub, server: Server) -> str:
    devices = [d for _, d in hub.state.fingerprint.devices().values()]
    unhealthy = sum(not d.healthy for d in devices)
    return (
        f"{len(devices)} devices, {unhealthy} unhealthy, {len(hub.subscribers)} subscribers, "
        f"{len(server.reservations)} reservations"
    )


async def report_status(hub: Hub, server: Server) -> None:
    """Keep systemd's STATUS= line current, at most every STATUS_MIN_INTERVAL."""
    last = None
    while True:
        await hub.changed.wait()
        hub.changed = trio.Event()
        line = status_line(hub, server)
        if line != last:
            systemd.notify(STATUS=line)
            last = line
        await trio.sleep(STATUS_MIN_INTERVAL)


async def ping_watchdog(interval: float) -> None:
    """WATCHDOG=1 from the event loop itself: if the loop stalls, the pings stop."""
    while True:
        systemd.notify(WATCHDOG=1)
        await trio.sleep(interval)


def _tune_gc() -> None:
    """Rarer cycle collections. Nearly all our garbage is freed by reference counting, but with a
    thousand clients connected a full collection walks every task and socket object and paused
    fan-out for tens of milliseconds (tests/bench); the thresholds make those rare."""
    gc.set_threshold(50_000, 50, 1_000)


def _raise_fd_limit() -> None:
    """Every client is a file descriptor: allow as many as the hard limit does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except OSError as exc:  # a seccomp filter may forbid it; LimitNOFILE= then decides
            log.info("keeping the file descriptor limit at %d: %s", soft, exc)


async def _reload(
    current: Settings,
    load: Callable[[], Settings],
    events: trio.MemorySendChannel[tuple[Event, ...]],
) -> Settings:
    """Re-read the config; apply what can change live, keep the old settings on any error."""
    systemd.notify(RELOADING=1)
    try:
        try:
            new = await trio.to_thread.run_sync(load)
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            return current
        restart_only = [
            name
            for name in ("socket", "udev_source", "netlink_buffer", "max_clients")
            if getattr(new, name) != getattr(current, name)
        ]
        if restart_only:
            log.warning("changing %s takes a restart; kept as it was", ", ".join(restart_only))
            new = attrs.evolve(new, **{name: getattr(current, name) for name in restart_only})
        logs.setup(new.log_level, new.log_target)
        if new.match_classes != current.match_classes:
            await events.send((ClassFilterChanged(new.match_classes),))
        log.info("configuration reloaded")
        return new
    finally:
        systemd.notify(READY=1)


def _open_socket(settings: Settings) -> tuple[socket.socket, os.stat_result | None]:
    """systemd's socket if we were activated, else our own; with what to unlink on exit."""
    passed = systemd.listen_socket()
    if passed is not None:
        log.info("serving on the socket systemd passed us")
        return passed, None
    mode = 0o660 if os.geteuid() == 0 else 0o600
    sock = bind_unix_socket(settings.socket, mode)
    return sock, os.stat(settings.socket)


async def serve(settings: Settings, load: Callable[[], Settings] | None = None) -> None:
    """Run until SIGTERM or SIGINT; SIGHUP re-reads the config through ``load``."""
    _raise_fd_limit()
    _tune_gc()
    hub = Hub()
    hub.state = State(match_classes=settings.match_classes)
    server = Server(hub, max_clients=settings.max_clients)
    sock, bound = _open_socket(settings)
    socket_path = settings.socket
    send, receive = trio.open_memory_channel[tuple[Event, ...]](EVENT_BUFFER)
    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    try:
        with trio.open_signal_receiver(*handled) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve, sock)
                nursery.start_soon(run_reducer, hub, receive)
                udev = partial(
                    run_udev_source,
                    send.clone(),
                    source=settings.udev_source,
                    receive_buffer=settings.netlink_buffer,
                )
                await nursery.start(udev)
                await hub.ready.wait()
                gc.freeze()  # what start-up built lives as long as we do: never scan it again
                interval = systemd.watchdog_interval()
                if interval is not None:
                    nursery.start_soon(ping_watchdog, interval)
                nursery.start_soon(report_status, hub, server)
                systemd.notify(READY=1, STATUS=status_line(hub, server))
                log.info("serving %d devices", len(hub.state.fingerprint.devices()))
                async for signum in signals:
                    if signum == signal.SIGHUP and load is not None:
                        settings = await _reload(settings, load, send)
                        continue
                    if signum == signal.SIGHUP:
                        continue
                    log.info("received %s; shutting down", signal.Signals(signum).name)
                    systemd.notify(STOPPING=1)
                    nursery.cancel_scope.cancel()
                    break
    finally:
        sock.close()
        if bound is not None:
            _unlink_if_ours(socket_path, bound)


def _unlink_if_ours(path: os.PathLike[str], bound: os.stat_result) -> None:
    try:
        now = os.stat(path)
    except OSError:
        return
    if (now.st_dev, now.st_ino) == (bound.st_dev, bound.st_ino):
        os.unlink(path)
