"""Command line: the daemon (``serve``), its clients, and a demo on simulated hardware."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import trio

from monitor.daemon.config import (
    ConfigError,
    add_setting_flags,
    flag_values,
    load_settings,
)
from monitor.daemon.systemd import ActivationError
from monitor.outputs import logs
from monitor.outputs.cdi import KIND as CDI_KIND
from monitor.outputs.files import InUse, UnsafePath
from monitor.serving.socketfile import SocketInUse, SocketPathError
from monitor.wire.blocking import Client
from monitor.wire.errors import DaemonUnavailable, RpcError
from monitor.wire.mirror import Mirror
from monitor.wire.paths import client_socket
from monitor.wire.reservations import BadAnswer, check_reservation

PROG = "hotplug-monitor"


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


def _socket_arg(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--socket", type=Path, help=f"daemon socket (default: {default})")


CLIENT_SOCKET_HELP = "your own daemon's socket if it runs, else the system one"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Follow GPUs and PCI accelerators as the kernel adds, removes, binds and breaks them, "
            "and serve their fingerprint, health and container reservations on a Unix socket."
        ),
        epilog=f"Run '{PROG} COMMAND --help' for a command's options.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the daemon",
        description="Run the daemon in the foreground until SIGTERM or SIGINT. "
        "Flags override the config file; without one, the defaults below apply.",
    )
    serve.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML config file (default: /etc/hotplug-monitor/config.toml as root, "
        "$XDG_CONFIG_HOME/hotplug-monitor/config.toml otherwise, if it exists)",
    )
    add_setting_flags(serve)

    devices = commands.add_parser("devices", help="list devices, their groups and health")
    _socket_arg(devices, CLIENT_SOCKET_HELP)
    devices.add_argument("--json", action="store_true", help="print the raw fingerprint")

    watch = commands.add_parser("watch", help="print each change as it happens")
    _socket_arg(watch, CLIENT_SOCKET_HELP)
    watch.add_argument("--json", action="store_true", help="print the raw notifications")

    reserve = commands.add_parser("reserve", help="reserve devices for a container")
    _socket_arg(reserve, CLIENT_SOCKET_HELP)
    reserve.add_argument("device_ids", nargs="+", metavar="ID", help="PCI address or GPU UUID")
    reserve.add_argument(
        "--holder-pid",
        type=int,
        metavar="PID",
        help="end the reservation when this process ends (default: it lasts until released)",
    )
    output = reserve.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the raw reservation")
    output.add_argument("--env", action="store_true", help="print shell export lines")
    output.add_argument(
        "--cdi", action="store_true", help=f"print the CDI device names ({CDI_KIND}=ID)"
    )
    output.add_argument(
        "--docker-args",
        action="store_true",
        help="print --device, -e and --mount arguments for docker or podman run",
    )

    leases = commands.add_parser("leases", help="list reservations and who holds them")
    _socket_arg(leases, CLIENT_SOCKET_HELP)
    leases.add_argument("--json", action="store_true", help="print the raw list")

    release = commands.add_parser("release", help="release reserved devices")
    _socket_arg(release, CLIENT_SOCKET_HELP)
    release.add_argument("device_ids", nargs="*", metavar="ID", help="PCI address or GPU UUID")
    release.add_argument("--reservation", metavar="ID", help="release a whole reservation")

    demo = commands.add_parser(
        "demo", help="run the daemon on simulated hardware (needs umockdev) and watch it"
    )
    demo.add_argument("--speed", type=float, default=1.0, help="faster (2) or slower (0.5)")
    return parser


def _connect(args: argparse.Namespace) -> Client:
    return Client(args.socket or client_socket())


def cmd_serve(args: argparse.Namespace) -> None:
    from monitor.daemon import app

    overrides = flag_values(args)
    load = partial(load_settings, args.config, overrides)
    settings = load()
    logs.setup(settings.log_level, settings.log_target)
    try:
        trio.run(app.serve, settings, load)
    except* SocketInUse as group:
        raise CliError(str(group.exceptions[0])) from None
    except* (ActivationError, ConfigError, SocketPathError, UnsafePath, InUse) as group:
        raise CliError(str(group.exceptions[0])) from None


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _value(device: dict[str, Any], name: str) -> str:
    attribute = device["attributes"].get(name)
    return "-" if attribute is None else str(attribute["value"])


def _health(device: dict[str, Any]) -> str:
    return "healthy" if device["healthy"] else f"UNHEALTHY: {device['health_desc']}"


def _ask(args: argparse.Namespace, method: str) -> Any:
    """The method's result; with ``--json``, printed as it came and None returned."""
    with _connect(args) as client:
        result = client.call(method)
    if args.json:
        print(json.dumps(result, indent=2))
        return None
    return result


def cmd_devices(args: argparse.Namespace) -> None:
    result = _ask(args, "fingerprint")
    if result is None:
        return
    devices = Mirror(result).devices()
    if not devices:
        print("no matching devices")
        return
    rows = [["ID", "GROUP", "DRIVER", "NUMA", "HEALTH"]]
    for device_id, (key, device) in sorted(devices.items()):
        numa, driver = _value(device, "numa_node"), _value(device, "driver")
        rows.append([device_id, key, driver, numa, _health(device)])
    print(_table(rows))


def describe_changes(before: Mirror | None, after: Mirror) -> list[str]:
    """One line per device that appeared, vanished, changed health or changed attributes."""
    old = before.devices() if before else {}
    new = after.devices()
    lines = []
    for device_id in sorted(old.keys() | new.keys()):
        if device_id not in new:
            lines.append(f"- {device_id} {old[device_id][0]} removed")
            continue
        key, device = new[device_id]
        if device_id not in old:
            lines.append(f"+ {device_id} {key} {_health(device)}")
            continue
        previous = old[device_id][1]
        if (previous["healthy"], previous["health_desc"]) != (
            device["healthy"],
            device["health_desc"],
        ):
            mark = "*" if device["healthy"] else "!"
            lines.append(f"{mark} {device_id} {key} {_health(device)}")
        changed = sorted(
            name
            for name in previous["attributes"].keys() | device["attributes"].keys()
            if previous["attributes"].get(name) != device["attributes"].get(name)
        )
        if changed:
            values = ", ".join(f"{name}={_value(device, name)}" for name in changed)
            lines.append(f"~ {device_id} {key} {values}")
    return [f"[{after.generation}] {line}" for line in lines]


def cmd_watch(args: argparse.Namespace) -> None:
    with Client(args.socket or client_socket(), timeout=None) as client:
        result = client.call("subscribe")
        mirror = Mirror(result)
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            for line in describe_changes(None, mirror) or [f"[{mirror.generation}] no devices"]:
                print(line, flush=True)
        for params in client.notifications():
            if args.json:
                print(json.dumps(params), flush=True)
                continue
            before = Mirror({"generation": mirror.generation, "snapshot": mirror.snapshot})
            mirror.apply(params)
            for line in describe_changes(before, mirror):
                print(line, flush=True)


def cmd_reserve(args: argparse.Namespace) -> None:
    params: dict[str, Any] = {"device_ids": args.device_ids}
    if args.holder_pid is not None:
        params["holder_pid"] = args.holder_pid
    with _connect(args) as client:
        result = check_reservation(client.call("reserve", params))
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.env:
        for name, value in result["envs"].items():
            print(f"export {name}={shlex.quote(value)}")
    elif args.cdi:
        print(" ".join(f"{CDI_KIND}={device_id}" for device_id in result["device_ids"]))
    elif args.docker_args:
        words = []
        for device in result["devices"]:
            spec = f"{device['host_path']}:{device['task_path']}:{device['cgroup_perms']}"
            words += ["--device", spec]
        for name, value in result["envs"].items():
            words += ["-e", f"{name}={value}"]
        for mount in result["mounts"]:
            # --mount, not -v: paths such as /dev/dri/by-path/pci-0000:3b:00.0-card have colons
            spec = f"type=bind,source={mount['host_path']},target={mount['task_path']}"
            words += ["--mount", spec + (",readonly" if mount["read_only"] else "")]
        print(shlex.join(words))
    else:
        print(f"reservation {result['reservation_id']}: {', '.join(result['device_ids'])}")
        for name, value in result["envs"].items():
            print(f"  env    {name}={value}")
        for mount in result["mounts"]:
            mode = "ro" if mount["read_only"] else "rw"
            print(f"  mount  {mount['host_path']} -> {mount['task_path']} ({mode})")
        for device in result["devices"]:
            print(f"  device {device['host_path']} ({device['cgroup_perms']})")


def cmd_leases(args: argparse.Namespace) -> None:
    result = _ask(args, "leases")
    if result is None:
        return
    if not result["leases"]:
        print("no reservations")
        return
    rows = [["RESERVATION", "DEVICES", "UID", "PID", "ENDS WITH", "SINCE", "STATE"]]
    for lease in result["leases"]:
        if lease["holder_pid"] is not None:
            ends = f"process {lease['holder_pid']}"
        elif lease["bind"] == "connection":
            ends = "connection"
        else:
            ends = "release"
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(lease["created"]))
        orphaned = lease["orphaned"]
        state = f"orphaned: {', '.join(orphaned)} gone" if orphaned else "held"
        devices = ",".join(lease["devices"])
        rows.append(
            [
                lease["reservation_id"],
                devices,
                str(lease["uid"]),
                str(lease["pid"]),
                ends,
                since,
                state,
            ]
        )
    print(_table(rows))


def cmd_release(args: argparse.Namespace) -> None:
    if bool(args.device_ids) == bool(args.reservation):
        raise CliError("give either device IDs or --reservation, not both or neither")
    params: dict[str, Any] = (
        {"reservation_id": args.reservation}
        if args.reservation
        else {"device_ids": args.device_ids}
    )
    with _connect(args) as client:
        result = client.call("release", params)
    released = result["released"]
    print(f"released {', '.join(released)}" if released else "nothing was reserved")


def cmd_demo(args: argparse.Namespace) -> None:
    from monitor.sim import umockdev as sim

    missing = sim.umockdev_missing()
    if missing:
        raise CliError(missing)
    try:
        sim.demo(speed=args.speed)
    except RuntimeError as exc:
        raise CliError(f"demo failed: {exc}") from None


COMMANDS = {
    "serve": cmd_serve,
    "devices": cmd_devices,
    "watch": cmd_watch,
    "reserve": cmd_reserve,
    "release": cmd_release,
    "leases": cmd_leases,
    "demo": cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (CliError, ConfigError, DaemonUnavailable, BadAnswer) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except RpcError as exc:
        print(f"{PROG}: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
