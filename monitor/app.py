"""The one nursery: socket server, reducer task and sources, wired one way.

sources -> bounded memory channel -> reducer task -> hub -> connections. Nothing but the reducer
task changes the state.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
from functools import partial

import trio

from monitor.config import Settings
from monitor.events import Event
from monitor.hub import Hub
from monitor.model import Device, Fingerprint
from monitor.reducer import State, reduce_all
from monitor.server import Server, bind_unix_socket
from monitor.sources.udev import run_udev_source

log = logging.getLogger(__name__)

EVENT_BUFFER = 16  # batches; a full buffer makes the sources wait, and the kernel buffer absorb
MAX_COALESCED = 4096  # events folded into one patch when they are already waiting


def health_changes(old: Fingerprint, new: Fingerprint) -> list[tuple[Device | None, Device]]:
    """Devices that appeared unhealthy or changed health: (before or None, after)."""
    before = {d.id: d for _, d in old.devices().values()}
    changes: list[tuple[Device | None, Device]] = []
    for _, device in new.devices().values():
        previous = before.get(device.id)
        if previous is None:
            if not device.healthy:
                changes.append((None, device))
        elif (previous.healthy, previous.health_desc) != (device.healthy, device.health_desc):
            changes.append((previous, device))
    return changes


def _log_health(old: Fingerprint, new: Fingerprint) -> None:
    for previous, device in health_changes(old, new):
        if device.healthy:
            log.info("%s is healthy again (was: %s)", device.id, previous and previous.health_desc)
        else:
            log.warning("%s is unhealthy: %s", device.id, device.health_desc)


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
            _log_health(old.fingerprint, state.fingerprint)
        hub.publish(state, patch)


def _raise_fd_limit() -> None:
    """Every client is a file descriptor: allow as many as the hard limit does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT; the socket file is removed on the way out."""
    _raise_fd_limit()
    hub = Hub()
    hub.state = State(match_classes=settings.match_classes)
    server = Server(hub, max_clients=settings.max_clients)
    mode = 0o660 if os.geteuid() == 0 else 0o600
    sock = bind_unix_socket(settings.socket, mode)
    bound = os.stat(settings.socket)
    send, receive = trio.open_memory_channel[tuple[Event, ...]](EVENT_BUFFER)
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve, sock)
                nursery.start_soon(run_reducer, hub, receive)
                udev = partial(
                    run_udev_source,
                    send,
                    source=settings.udev_source,
                    receive_buffer=settings.netlink_buffer,
                )
                await nursery.start(udev)
                await hub.ready.wait()
                log.info(
                    "serving %d devices on %s",
                    len(hub.state.fingerprint.devices()),
                    settings.socket,
                )
                async for signum in signals:
                    log.info("received %s; shutting down", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break
    finally:
        sock.close()
        _unlink_if_ours(settings.socket, bound)


def _unlink_if_ours(path: os.PathLike[str], bound: os.stat_result) -> None:
    try:
        now = os.stat(path)
    except OSError:
        return
    if (now.st_dev, now.st_ino) == (bound.st_dev, bound.st_ino):
        os.unlink(path)
