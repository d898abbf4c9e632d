"""What each command does: ask the daemon (``monitor.wire``), print what ``show`` makes of it."""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import trio

from monitor.cli import show
from monitor.cli.terminal import say
from monitor.core.pci import DEFAULT_MATCH_CLASSES
from monitor.daemon.config import ConfigError, flag_values, load_settings
from monitor.daemon.systemd import ActivationError
from monitor.outputs import logs
from monitor.outputs.files import InUse, UnsafePath
from monitor.serving.socketfile import SocketInUse, SocketPathError
from monitor.wire import requests
from monitor.wire.blocking import Client
from monitor.wire.mirror import Mirror
from monitor.wire.paths import client_socket
from monitor.wire.reservations import check_reservation


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


class UsageError(CliError):
    """Options that do not go together: said with the command's usage, exit status 2."""


def _connect(args: argparse.Namespace, timeout: float | None = 10.0) -> Client:
    return Client(args.socket or client_socket(), timeout=timeout)


def _print_json(value: Any) -> None:
    say(json.dumps(value, indent=2))


def _note(text: str) -> None:
    """A line for the person, on stderr: stdout stays what a shell or script takes."""
    say(f"hotplug-monitor: {text}", err=True)


def cmd_serve(args: argparse.Namespace) -> None:
    from monitor.daemon import app

    load = partial(load_settings, args.config, flag_values(args))
    settings = load()
    logs.setup(settings.log_level, settings.log_target)
    try:
        trio.run(app.serve, settings, load)
    except* (
        ActivationError,
        ConfigError,
        SocketInUse,
        SocketPathError,
        UnsafePath,
        InUse,
    ) as group:
        raise CliError(str(group.exceptions[0])) from None


def cmd_devices(args: argparse.Namespace) -> None:
    with _connect(args) as client:
        fingerprint = client.ask(requests.fingerprint())
        leases = client.ask(requests.leases())["leases"]
    if args.json:
        _print_json(fingerprint)
    elif not Mirror(fingerprint).devices():
        say(show.no_devices(DEFAULT_MATCH_CLASSES))
    else:
        say(show.devices_table(fingerprint, leases))


def cmd_watch(args: argparse.Namespace) -> None:
    with _connect(args, timeout=None) as client:
        result = client.ask(requests.subscribe())
        mirror = Mirror(result)
        if args.json:
            say(json.dumps(result), flush=True)
        else:
            for line in show.describe_changes(None, mirror) or [
                f"[{mirror.generation}] no devices"
            ]:
                say(line, flush=True)
        for params in client.notifications():
            if args.json:
                say(json.dumps(params), flush=True)
                continue
            before = mirror.copy()
            mirror.apply(params)
            for line in show.describe_changes(before, mirror):
                say(line, flush=True)


def cmd_reserve(args: argparse.Namespace) -> None:
    # With --cdi the daemon refuses devices its CDI spec does not name before granting anything
    call = requests.reserve(
        args.device_ids, holder_pid=args.holder_pid, owner=args.owner, cdi=args.cdi
    )
    with _connect(args) as client:
        result = check_reservation(client.ask(call))
    lease = result["reservation_id"]
    if args.cdi and "cdi_devices" not in result:
        raise CliError(
            f"the daemon granted {lease} without naming its CDI devices; "
            f"hotplug-monitor release --reservation {lease} ends it"
        )
    if args.json:
        _print_json(result)
        return
    if not (args.env or args.cdi or args.docker_args):
        say("\n".join(show.reservation_lines(result)))
        return
    # stdout is for the shell or engine; the person learns on stderr what was reserved
    _note(f"reserved {', '.join(result['device_ids'])} as {lease} "
          f"(hotplug-monitor release --reservation {lease} ends it)")  # fmt: skip
    if args.env:
        lines = show.env_lines(result)
        if not lines:
            _note("these devices need no environment variables")
        say("\n".join(lines))
    elif args.cdi:
        say(show.cdi_arguments(result["cdi_devices"]))
    else:
        arguments = show.engine_arguments(result)
        if not arguments:
            _note("these devices have nothing a container engine could be given")
        say(arguments)


def cmd_leases(args: argparse.Namespace) -> None:
    with _connect(args) as client:
        result = client.ask(requests.leases())
    if args.json:
        _print_json(result)
    else:
        say(show.leases_table(result["leases"]))


def cmd_release(args: argparse.Namespace) -> None:
    given = [bool(args.device_ids), bool(args.reservation), args.all]
    if sum(given) != 1:
        raise UsageError("give device IDs, --reservation ID, or --owner NAME --all: one of them")
    if args.all and not args.owner:
        raise UsageError("--all releases every lease of one owner: give --owner NAME")
    call = requests.release(
        args.device_ids or None, reservation_id=args.reservation, owner=args.owner
    )
    with _connect(args) as client:
        result = client.ask(call)
    released, not_reserved = result["released"], result.get("not_reserved", [])
    if released:
        say(f"released {', '.join(released)}")
    for device_id in not_reserved:
        say(f"{device_id} was not reserved")
    if not released and not not_reserved:
        say(f"{args.owner} held no reservations" if args.all else "nothing was released")


CLEAR_SCREEN = "\x1b[H\x1b[2J"


def cmd_stats(args: argparse.Namespace) -> None:
    screen = sys.stdout.isatty()  # a terminal: one table, redrawn; else one after another
    with _connect(args, timeout=None) as client:
        first = client.ask(requests.stats(args.interval))
        for params in itertools.chain([first], client.notifications("stats")):
            if args.json:
                say(json.dumps(params), flush=True)
            elif screen:
                sys.stdout.write(CLEAR_SCREEN)  # ours, the one escape sequence let through
                say(show.stats_table(params), flush=True)
            else:
                say(show.stats_table(params) + "\n", flush=True)


def cmd_demo(args: argparse.Namespace) -> None:
    try:
        from monitor.sim import demo
    except ImportError as exc:  # the demo extra is not installed
        raise CliError(f"the demo needs the simulator: {exc}") from None
    missing = demo.missing()
    if missing:
        raise CliError(missing)
    try:
        demo.run(speed=args.speed)
    except RuntimeError as exc:
        raise CliError(f"demo failed: {exc}") from None


def cmd_explain_xid(args: argparse.Namespace) -> None:
    from monitor.cli.xid_table import explain
    from monitor.core.xids import XidPolicy

    policy = XidPolicy(
        ignore=frozenset(args.xid_ignore), fatal=frozenset(args.xid_fatal), unknown=args.xid_unknown
    )
    sys.stdout.write(explain(args.xid, policy))


def cmd_doctor(args: argparse.Namespace) -> int:
    from monitor.cli import doctor

    return doctor.cmd_doctor(args)


COMMANDS: dict[str, Callable[[argparse.Namespace], int | None]] = {
    "serve": cmd_serve,
    "devices": cmd_devices,
    "watch": cmd_watch,
    "reserve": cmd_reserve,
    "release": cmd_release,
    "leases": cmd_leases,
    "stats": cmd_stats,
    "demo": cmd_demo,
    "explain-xid": cmd_explain_xid,
    "doctor": cmd_doctor,
}
