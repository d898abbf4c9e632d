"""The command line's words: each command's options and help."""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from monitor.cli import adapter_options
from monitor.cli.adapter_options import CLIENT_SOCKET_HELP, Commands
from monitor.daemon.config import FILE_KEYS, add_setting_flags
from monitor.wire.reservations import CDI_KIND

PROG = "hotplug-monitor"
EXPORTER_URL = "http://localhost:10082/metrics"  # the exporter's default --listen
KUBELET_DIR = Path("/var/lib/kubelet/device-plugins")
NOMAD_PLUGIN_DIR = Path("/opt/nomad/plugins")  # docs/nomad.md's; Nomad's own is data_dir/plugins


def missing_extra(command: str, extra: str, error: ImportError) -> int:
    """Say in one line that ``command`` needs ``extra`` installed; the exit status."""
    print(
        f"{PROG}: error: {command} needs the {extra} extra: ./install.sh --with {extra} "
        f"from the source, or {sys.executable} -m pip install 'hotplug-monitor[{extra}]' "
        f"({error})",
        file=sys.stderr,
    )
    return 1


def version() -> str:
    try:
        return importlib.metadata.version("hotplug-monitor")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
        return "unknown (not installed)"


class _Version(argparse.Action):
    """``--version``, looked up only when asked (the metadata lookup costs every command)."""

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        print(f"{PROG} {version()}")
        parser.exit()


class _TopParser(argparse.ArgumentParser):
    """An option given before any command is named as unrecognized, rather than reported as a
    missing COMMAND (``hotplug-monitor --verbose``)."""

    _given: tuple[str, ...] = ()

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self._given = tuple(sys.argv[1:] if args is None else args)
        return super().parse_known_args(list(self._given), namespace)

    def error(self, message: str) -> NoReturn:
        unknown = [a for a in self._given if a.startswith("-")]
        if message.startswith("the following arguments are required") and unknown:
            message = f"unrecognized arguments: {' '.join(unknown)} (and no COMMAND given)"
        super().error(message)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser, and each command's own (for usage errors that show the command's usage)."""
    parser = _TopParser(
        prog=PROG,
        description=(
            "Follow GPUs and PCI accelerators as the kernel adds, removes, binds and breaks them, "
            "and serve their fingerprint, health and container reservations on a Unix socket."
        ),
        epilog=f"Run '{PROG} COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action=_Version, nargs=0, help="show the version and exit")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=argparse.ArgumentParser
    )
    parsers = {
        "serve": _serve(commands),
        "devices": _devices(commands),
        "watch": _watch(commands),
        "reserve": _reserve(commands),
        "release": _release(commands),
        "leases": _leases(commands),
        "stats": _stats(commands),
        "demo": _demo(commands),
        "explain-xid": _explain_xid(commands),
        "doctor": _doctor(commands),
        "nomad-plugin": adapter_options.nomad_plugin(commands),
        "exporter": adapter_options.exporter(commands),
        "kubelet-plugin": adapter_options.kubelet_plugin(commands),
    }
    return parser, parsers


def _client(commands: Commands, name: str, help: str) -> argparse.ArgumentParser:
    command: argparse.ArgumentParser = commands.add_parser(name, help=help, description=help)
    command.add_argument("--socket", type=Path, metavar="PATH", help=CLIENT_SOCKET_HELP)
    return command


def _serve(commands: Commands) -> argparse.ArgumentParser:
    serve: argparse.ArgumentParser = commands.add_parser(
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
    return serve


def _devices(commands: Commands) -> argparse.ArgumentParser:
    devices = _client(commands, "devices", "list devices: group, driver, health, who holds them")
    devices.add_argument("--json", action="store_true", help="print the raw fingerprint")
    return devices


def _watch(commands: Commands) -> argparse.ArgumentParser:
    watch = _client(commands, "watch", "print each change as it happens")
    watch.add_argument("--json", action="store_true", help="print the raw notifications")
    return watch


def _reserve(commands: Commands) -> argparse.ArgumentParser:
    reserve = _client(commands, "reserve", "reserve devices for a container")
    reserve.add_argument("device_ids", nargs="+", metavar="ID", help="PCI address or GPU UUID")
    ends = reserve.add_mutually_exclusive_group()
    ends.add_argument(
        "--holder-pid",
        type=int,
        metavar="PID",
        help="end the reservation when this process ends (default: it lasts until released)",
    )
    ends.add_argument(
        "--owner",
        metavar="NAME",
        help="reserve for a scheduler (nomad, kubelet): it ends only by release or reconcile",
    )
    output = reserve.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the raw reservation")
    output.add_argument("--env", action="store_true", help="print shell export lines")
    output.add_argument(
        "--cdi",
        action="store_true",
        help=f"print --device={CDI_KIND}=ID arguments for podman run $(...)",
    )
    output.add_argument(
        "--docker-args",
        action="store_true",
        help="print --device, -e and --mount arguments for docker or podman run",
    )
    return reserve


def _release(commands: Commands) -> argparse.ArgumentParser:
    release = _client(commands, "release", "release reserved devices")
    release.add_argument("device_ids", nargs="*", metavar="ID", help="PCI address or GPU UUID")
    release.add_argument("--reservation", metavar="ID", help="release a whole reservation")
    release.add_argument(
        "--owner", metavar="NAME", help="speak for this scheduler's reservations (with --all: all)"
    )
    release.add_argument(
        "--all", action="store_true", help="every reservation of --owner: a scheduler's leftovers"
    )
    return release


def _leases(commands: Commands) -> argparse.ArgumentParser:
    leases = _client(commands, "leases", "list reservations and who holds them")
    leases.add_argument("--json", action="store_true", help="print the raw list")
    return leases


def _interval(text: str) -> float:
    """Seconds between two samples: 1 to 3600."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 1 <= seconds <= 3600:
        raise argparse.ArgumentTypeError(f"must be from 1 to 3600 seconds, not {text!r}")
    return seconds


def _stats(commands: Commands) -> argparse.ArgumentParser:
    stats = _client(commands, "stats", "show device telemetry: utilization, memory, power...")
    stats.add_argument(
        "--interval",
        type=_interval,
        default=2.0,
        metavar="S",
        help="seconds between samples, 1 to 3600 (default: 2)",
    )
    stats.add_argument("--json", action="store_true", help="print the raw notifications")
    return stats


def _speed(text: str) -> float:
    """A positive, finite factor: the demo's pauses are divided by it."""
    try:
        speed = float(text)
    except ValueError:
        speed = math.nan
    if not 0 < speed < math.inf:
        raise argparse.ArgumentTypeError(f"a speed is a positive number (2, 0.5), not {text!r}")
    return speed


def _demo(commands: Commands) -> argparse.ArgumentParser:
    demo: argparse.ArgumentParser = commands.add_parser(
        "demo",
        help="run the daemon on simulated hardware and watch it (needs umockdev)",
        description="Start a daemon on simulated GPUs (umockdev, and NVIDIA's NVML through a "
        "stand-in library), then hot-add, break, mend, reserve and remove them while watching.",
    )
    demo.add_argument("--speed", type=_speed, default=1.0, help="faster (2) or slower (0.5)")
    return demo


def _said(setting: str) -> str:
    """What ``serve --help`` says of a setting: the same words for the same policy."""
    return str(FILE_KEYS[setting].metadata["help"])


def _explain_xid(commands: Commands) -> argparse.ArgumentParser:
    explain: argparse.ArgumentParser = commands.add_parser(
        "explain-xid",
        help="what the daemon does with an NVIDIA XID (no daemon needed)",
        description="Print NVIDIA's catalog entry for XID N, its action, the daemon's verdict "
        "and which policy decided it (--xid-ignore, --xid-fatal, --xid-unknown as the daemon's).",
    )
    explain.add_argument("xid", type=int, help="the XID number")
    for flag, policy in (("--xid-ignore", "xid_ignore"), ("--xid-fatal", "xid_fatal")):
        explain.add_argument(
            flag, type=int, action="append", default=[], metavar="XID", help=_said(policy)
        )
    explain.add_argument(
        "--xid-unknown", choices=("drain", "report"), default="drain", help=_said("xid_unknown")
    )
    return explain


def _doctor(commands: Commands) -> argparse.ArgumentParser:
    doctor: argparse.ArgumentParser = commands.add_parser(
        "doctor",
        help="check this host's setup: daemon, udev, NVML, kernel log, CDI, plugins, exporter",
        description="One line a check: ok, warn or fail, what was found, and the fix. Exit "
        "status 0 when nothing failed (warnings allowed), 1 when something did.",
    )
    doctor.add_argument("--socket", type=Path, metavar="PATH", help="the daemon's socket")
    doctor.add_argument("--json", action="store_true", help="the checks as JSON")
    doctor.add_argument(
        "--cdi-dir",
        type=Path,
        metavar="DIR",
        help="where the daemon writes its CDI spec (default: the daemon's)",
    )
    doctor.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="the daemon's state directory (default: the daemon's)",
    )
    doctor.add_argument(
        "--kubelet-dir",
        type=Path,
        default=KUBELET_DIR,
        metavar="DIR",
        help=f"the kubelet's device plugin directory (default: {KUBELET_DIR})",
    )
    doctor.add_argument(
        "--nomad-plugin-dir",
        type=Path,
        default=NOMAD_PLUGIN_DIR,
        metavar="DIR",
        help=f"Nomad's plugin_dir (default: {NOMAD_PLUGIN_DIR})",
    )
    doctor.add_argument(
        "--exporter",
        default=EXPORTER_URL,
        metavar="URL",
        help=f"the exporter's metrics URL (default: {EXPORTER_URL})",
    )
    return doctor
