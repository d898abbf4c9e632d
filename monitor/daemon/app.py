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
from pathlib import Path

import attrs
import trio

from monitor.core.access import Access, stranded
from monitor.core.events import (
    ClassFilterChanged,
    HealthPolicyChanged,
    LeaseEnded,
    SharePolicyChanged,
    XidPolicyChanged,
)
from monitor.core.leases import Lease
from monitor.core.state import State
from monitor.daemon import systemd
from monitor.daemon.config import RESTART_ONLY, ConfigError, Settings
from monitor.daemon.identities import DEFAULT_READ_GROUP, owner_identities, resolve_group
from monitor.daemon.memory import GiveBack
from monitor.engine.hub import Hub
from monitor.engine.inbox import Inbox, InboxReader, Item
from monitor.engine.reducer_task import run_engine
from monitor.engine.stats import StatsHub, Telemetry, sysfs_sampler
from monitor.outputs import logs
from monitor.outputs.cdi import CdiSpec
from monitor.outputs.files import UnsafePath, lock_directory, secure_directory, unsafe_for
from monitor.outputs.leaselog import LeaseLog
from monitor.outputs.store import LeaseStore, StoreError
from monitor.serving.limits import ConnectionLimits, LeaseRate
from monitor.serving.server import Server
from monitor.serving.socketfile import ReadGroupRefused, SocketFile, let_read_group_in
from monitor.sources import holders
from monitor.sources.holders import HolderWatch
from monitor.sources.kmsg import run_kmsg_source
from monitor.sources.nvml import NvmlStats, run_nvml_source
from monitor.sources.udev import pick_source, run_udev_source

log = logging.getLogger(__name__)

EVENT_BUFFER = 16  # batches; a full buffer makes the sources wait, and the kernel buffer absorb
STATUS_MIN_INTERVAL = 0.1  # seconds between STATUS= updates, however busy the host


@attrs.frozen
class Claimed:
    """The directories a daemon holds for as long as it runs, locked, and what it restored."""

    state_dir: Path
    cdi_dir: Path | None
    store: LeaseStore
    leases: tuple[Lease, ...]
    locks: tuple[int, ...]  # fds; closing them lets a next daemon in


def status_line(hub: Hub) -> str:
    devices = [d for _, d in hub.state.fingerprint.devices().values()]
    unhealthy = sum(not d.healthy for d in devices)
    return (
        f"{len(devices)} devices, {unhealthy} unhealthy, {len(hub.subscribers)} subscribers, "
        f"{len(hub.state.leases)} reservations"
    )


async def report_status(hub: Hub) -> None:
    """Keep systemd's STATUS= line current, at most every STATUS_MIN_INTERVAL."""
    last = None
    async for _ in hub.changes():
        line = status_line(hub)
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
    thousand clients connected a full collection walks every task and socket object and pauses
    fan-out (the benchmark's fan-out scenario); the thresholds make those rare."""
    gc.set_threshold(50_000, 50, 1_000)


def _raise_fd_limit() -> None:
    """Every client is a file descriptor: allow as many as the hard limit does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except OSError as exc:  # a seccomp filter may forbid it; LimitNOFILE= then decides
            log.info("keeping the file descriptor limit at %d: %s", soft, exc)


async def reload(current: Settings, load: Callable[[], Settings], events: Inbox) -> Settings:
    """Re-read the config; apply what can change live, keep the old settings on any error."""
    systemd.notify(RELOADING=1)
    try:
        try:
            new = await trio.to_thread.run_sync(load)
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            return current
        except Exception as exc:  # whatever the file holds, the running daemon carries on
            log.error("reload failed, keeping the running configuration: %r", exc)
            return current
        restart = [name for name in RESTART_ONLY if getattr(new, name) != getattr(current, name)]
        if restart:
            log.warning("changing %s takes a restart; kept as it was", ", ".join(restart))
            new = attrs.evolve(new, **{name: getattr(current, name) for name in restart})
        logs.setup(new.log_level, new.log_target)
        if new.match_classes != current.match_classes:
            await events.send((ClassFilterChanged(new.match_classes),))
        if new.xid_policy != current.xid_policy:
            await events.send((XidPolicyChanged(new.xid_policy),))
        if new.health_policy != current.health_policy:
            await events.send((HealthPolicyChanged(new.health_policy),))
        if new.share_policy != current.share_policy:
            await events.send((SharePolicyChanged(new.share_policy),))
        log.info("configuration reloaded")
        return new
    finally:
        systemd.notify(READY=1)


def _open_socket(settings: Settings, access: Access) -> tuple[socket.socket, SocketFile | None]:
    """systemd's socket if we were activated, else our own, with the file we keep for it."""
    passed = systemd.listen_socket()
    if passed is not None:
        log.info("serving on the socket systemd passed us")
        if access.read_gid is not None:
            try:
                let_read_group_in(passed, access.read_gid)
            except ReadGroupRefused as exc:
                log.error("the read-only group %d cannot connect: %s", access.read_gid, exc)
        return passed, None
    socket_file = SocketFile(settings.socket, access.gid, access.read_gid)
    return socket_file.bind(), socket_file


def restore_leases(store: LeaseStore) -> list[Lease]:
    """The leases on disk whose holder, if they name one, still runs."""
    kept = []
    for lease in store.load(holders.from_legacy):
        try:
            running = lease.holder is None or holders.is_running(lease.holder)
        except OSError as exc:  # cannot tell: the holder watch will look again
            log.error("cannot look at the holder of reservation %s: %s", lease.id, exc)
            running = True
        if not running:
            log.info(
                "reservation %s ends: its holder process %d exited while the daemon was down",
                lease.id,
                lease.holder_pid,
            )
            continue
        kept.append(lease)
    return kept


def claim_directory(path: Path, what: str, create_mode: int, flag: str) -> tuple[Path, int | None]:
    """A directory of ours, checked and locked: its real path, and the lock's fd (None when it
    cannot be made or opened, which the caller's writes will then report). ``UnsafePath``
    naming ``flag`` when others could change it."""
    try:
        real, created = secure_directory(path, create_mode)
        lock = lock_directory(real)
    except UnsafePath as exc:
        raise unsafe_for(flag, path, exc) from None
    except OSError as exc:
        log.error("cannot use the %s %s: %s", what, path, exc.strerror or exc)
        return path, None
    if created:
        log.info("created the %s %s", what, real)
    return real, lock


async def claim(settings: Settings) -> Claimed:
    """The state and CDI directories, locked, and the leases restored from the state directory.

    Each held for as long as we run: a second daemon on the same state or CDI directory would
    grant devices this one has granted, and remove the spec this one serves."""
    state_dir, state_lock = claim_directory(
        settings.state_dir, "state directory", 0o700, "--state-dir"
    )
    cdi_dir, cdi_lock = None, None
    if settings.cdi_dir is not None:
        cdi_dir, cdi_lock = claim_directory(settings.cdi_dir, "CDI directory", 0o755, "--cdi-dir")
    store = LeaseStore(state_dir)
    leases = await trio.to_thread.run_sync(restore_leases, store)
    try:
        # one sound snapshot of what was read; and it tells at once if the disk refuses
        await trio.to_thread.run_sync(store.compact, leases)
    except StoreError as exc:
        log.error("%s: reserve and release will be refused until it can be written", exc)
    if leases:
        log.info("restored %d reservations from %s", len(leases), store.path)
    locks = tuple(fd for fd in (state_lock, cdi_lock) if fd is not None)
    return Claimed(state_dir, cdi_dir, store, tuple(leases), locks)


def access_of(settings: Settings) -> Access:
    """Who may do what: the groups and owner names of the settings, looked up."""
    gid = resolve_group(settings.group)
    read_gid = resolve_group(settings.read_group, DEFAULT_READ_GROUP)
    return Access(gid, os.geteuid(), read_gid, owner_identities(settings.owners))


def warn_stranded(access: Access, leases: tuple[Lease, ...]) -> None:
    """One warning naming the restored owner leases that their own user may no longer end."""
    found = stranded(access, leases)
    if found:
        named = ", ".join(f"{lease.id} ({lease.owner}, uid {lease.uid})" for lease in found)
        log.warning(
            "reservations whose user may no longer use their owner name, kept until root or "
            "the name's owner releases them: %s",
            named,
        )


def first_state(settings: Settings, claimed: Claimed, access: Access) -> State:
    return State(
        match_classes=settings.match_classes,
        leases={lease.id: lease for lease in claimed.leases},
        xid_policy=settings.xid_policy,
        health_policy=settings.health_policy,
        share=settings.share_policy,
        nvml_names=settings.nvml,
        access=access,
    )


async def run_tasks(
    nursery: trio.Nursery,
    settings: Settings,
    claimed: Claimed,
    hub: Hub,
    inbox: Inbox,
    receive: InboxReader,
    telemetry: Telemetry,
    nvml_stats: NvmlStats,
    spec: CdiSpec | None,
) -> None:
    """Start every task of the daemon, in the order that makes it ready: the socket listens,
    the reducer runs, the first enumeration is in the state and NVML has named its GPUs (or
    they have waited long enough), then the rest."""

    async def holder_exited(lease_id: str) -> None:
        await inbox.send((LeaseEnded(lease_id),))

    watch = HolderWatch(nursery, holder_exited)
    watch.update(hub.state.leases)
    lease_log = LeaseLog(logging.getLogger("monitor.engine.reducer_task"), os.geteuid())
    nursery.start_soon(lease_log.run)
    engine = partial(run_engine, report=lease_log.report)
    nursery.start_soon(engine, hub, receive, claimed.store, watch, telemetry.latency)
    udev = partial(
        run_udev_source,
        inbox.clone(),
        source=settings.udev_source,
        receive_buffer=settings.netlink_buffer,
        counts=telemetry.counts,
    )
    await nursery.start(udev)
    if settings.kmsg is not None:  # placed at the log's end before we are ready: no XID lost
        kmsg = partial(
            run_kmsg_source,
            inbox.clone(),
            settings.kmsg,
            trust_user=settings.kmsg_trust_user,
            counts=telemetry.counts,
        )
        await nursery.start(kmsg)
    if settings.nvml:  # before the wait: it names the NVIDIA GPUs the state is ready with
        nvml = partial(
            run_nvml_source,
            deadline=settings.nvml_timeout,
            health_interval=settings.health_interval,
            mig_minors=settings.mig_minors,
            log_level=settings.log_level,
            log_target=settings.log_target,
            stats=nvml_stats,
            counts=telemetry.counts,
        )
        nursery.start_soon(nvml, inbox.clone(), hub.changes)
    await hub.ready.wait()
    if spec is not None:
        nursery.start_soon(spec.keep, hub.changes(), lambda: hub.state)
    interval = systemd.watchdog_interval()
    if interval is not None:
        nursery.start_soon(ping_watchdog, interval)
    nursery.start_soon(report_status, hub)


def started_line(settings: Settings, claimed: Claimed, hub: Hub, where: str) -> str:
    """The one line that says the daemon is up: where, how many devices, from which sources."""
    udevd = pick_source(settings.udev_source) == "udev"
    sources = f"uevents from {'udevd' if udevd else 'the kernel'}"
    sources += ", NVML worker started" if settings.nvml else ", NVML off"
    sources += f", kernel log {settings.kmsg}" if settings.kmsg else ", kernel log off"
    leases = " (leases only)" if settings.cdi_publish == "leased" else ""
    sources += f", CDI spec in {claimed.cdi_dir}{leases}" if claimed.cdi_dir else ", no CDI spec"
    count = len(hub.state.fingerprint.devices())
    return f"serving {count} device{'s' * (count != 1)} on {where} ({sources})"


async def serve(settings: Settings, load: Callable[[], Settings] | None = None) -> None:
    """Run until SIGTERM or SIGINT; SIGHUP re-reads the config through ``load``."""
    _raise_fd_limit()
    _tune_gc()
    access = access_of(settings)
    claimed = await claim(settings)
    warn_stranded(access, claimed.leases)
    hub = Hub(first_state(settings, claimed, access))
    inbox, receive = trio.open_memory_channel[Item](EVENT_BUFFER)
    limits = ConnectionLimits(
        settings.max_clients, settings.max_clients_per_uid, settings.client_timeout
    )
    nvml_stats = NvmlStats()

    async def nvml_sample(_: State) -> dict[str, dict[str, dict[str, object]]]:
        return await nvml_stats.sample()

    telemetry = Telemetry(StatsHub(hub, [nvml_sample, sysfs_sampler()]))
    leased = settings.cdi_publish == "leased"
    spec = CdiSpec(claimed.cdi_dir, leased=leased) if claimed.cdi_dir is not None else None
    give_back = GiveBack()
    lease_rate = LeaseRate(settings.lease_rate, settings.lease_burst)
    server = Server(
        hub, inbox.clone(), limits=limits, lease_rate=lease_rate, cdi=spec, telemetry=telemetry,
        on_close=give_back.activity,
    )  # fmt: skip
    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    sock = socket_file = None
    try:
        sock, socket_file = _open_socket(settings, access)
        with trio.open_signal_receiver(*handled) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve, sock)
                if socket_file is not None:
                    nursery.start_soon(socket_file.keep, server.listen_on)
                await run_tasks(
                    nursery, settings, claimed, hub, inbox, receive, telemetry, nvml_stats, spec
                )
                nursery.start_soon(give_back.run)
                nursery.start_soon(give_back.follow, hub.changes())
                gc.freeze()  # what start-up built lives as long as we do: never scan it again
                systemd.notify(READY=1, STATUS=status_line(hub))
                where = str(settings.socket) if socket_file else "the socket systemd passed"
                log.info("%s", started_line(settings, claimed, hub, where))
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        nursery.start_soon(nvml_stats.rescan_mig)  # MIG layouts read again
                        if load is not None:
                            settings = await reload(settings, load, inbox)
                        continue
                    log.info("received %s; shutting down", signal.Signals(signum).name)
                    systemd.notify(STOPPING=1)
                    nursery.cancel_scope.cancel()
                    break
    finally:
        if sock is not None:
            sock.close()
        if socket_file is not None:
            socket_file.unlink_if_ours()
        for lock in claimed.locks:
            os.close(lock)
