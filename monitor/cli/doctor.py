"""``hotplug-monitor doctor``: is this host's hotplug-monitor set up and working? One screen,
one line a check: ``ok``, ``warn`` or ``fail``, what was found, and the fix.

Exit status 0 when no check failed (warnings allowed: an optional part not set up, such as the
exporter or a scheduler's plugin), 1 when one did. Everything is looked at from this process:
the daemon through its socket (``status``, ``fingerprint``), the rest on disk or over HTTP."""

from __future__ import annotations

import argparse
import grp
import json
import stat
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import attrs

from monitor.cli.parser import version
from monitor.cli.terminal import say
from monitor.daemon.config import default_cdi_dir, default_state_dir
from monitor.outputs.cdi import FILE_NAME as CDI_FILE
from monitor.wire import requests
from monitor.wire.blocking import Client
from monitor.wire.errors import DaemonUnavailable, RpcError
from monitor.wire.mirror import Mirror
from monitor.wire.paths import client_socket

UDEV_CONTROL = Path("/run/udev/control")


@attrs.frozen
class Check:
    level: str  # ok, warn, fail
    name: str
    what: str
    fix: str = ""

    def line(self) -> str:
        return f"{self.level:<4}  {self.name:<10} {self.what}" + (
            f"; {self.fix}" if self.fix else ""
        )


def _daemon(socket: Path) -> tuple[list[Check], dict[str, Any] | None, dict[str, Any] | None]:
    try:
        with Client(socket, timeout=5.0) as client:
            status = client.ask(requests.status())
            fingerprint = client.ask(requests.fingerprint())
    except (DaemonUnavailable, RpcError, OSError) as exc:
        fix = "start it: systemctl start hotplug-monitor (or hotplug-monitor serve)"
        if "permission denied" in str(exc):
            fix = "join the group the socket names above"
        return [Check("fail", "daemon", str(exc), fix)], None, None
    running = status.get("version", "an older version")
    ours = version()
    same = running == ours
    return (
        [
            Check(
                "ok" if same else "warn",
                "daemon",
                f"answers on {socket}: version {running}, {status.get('devices', '?')} devices, "
                f"{status.get('leases', '?')} leases",
                "" if same else f"this command is {ours}: restart the daemon after an upgrade",
            )
        ],
        status,
        fingerprint,
    )


def _udev() -> Check:
    if UDEV_CONTROL.exists():
        return Check("ok", "udev", "udevd runs: --udev-source auto listens to its uevents")
    return Check(
        "warn",
        "udev",
        f"udevd does not run ({UDEV_CONTROL} missing): auto listens to the kernel's uevents",
        "fine in a container; give no --udev-source udev",
    )


def _nvml(fingerprint: dict[str, Any]) -> Check:
    devices = Mirror(fingerprint).devices()
    nvidia = {i: d for i, (key, d) in devices.items() if key.startswith("nvidia/")}
    named = {i: d for i, d in nvidia.items() if "uuid" in d["attributes"]}
    versions = {
        str(d["attributes"]["driver_version"]["value"])
        for d in named.values()
        if "driver_version" in d["attributes"]
    }
    if not nvidia:
        return Check("ok", "nvml", "no NVIDIA GPU followed: NVML not needed")
    driver = f"driver {', '.join(sorted(versions))}" if versions else "no driver version"
    seen = f"NVML names {len(named)} of the {len(nvidia)} NVIDIA GPUs udev sees ({driver})"
    if len(named) == len(nvidia):
        return Check("ok", "nvml", seen)
    return Check(
        "warn" if named else "fail",
        "nvml",
        seen,
        "check nvidia-smi, that libnvidia-ml.so.1 loads, and that serve runs without --no-nvml",
    )


def _kmsg(status: dict[str, Any]) -> Check:
    records, missed = status.get("kmsg_records", 0), status.get("kmsg_missed", 0)
    what = f"{records} kernel log records read, {status.get('kmsg_ignored', 0)} ignored"
    if missed:
        return Check("warn", "kmsg", f"{what}, {missed} missed", "XIDs may have been lost")
    if not records:
        return Check(
            "warn", "kmsg", "no kernel log records read", "run serve as root or give --kmsg PATH"
        )
    return Check("ok", "kmsg", what)


def _cdi(directory: Path | None) -> Check:
    if directory is None:
        return Check("warn", "cdi", "no CDI directory (not root)", "give --cdi-dir DIR")
    path = directory / CDI_FILE
    try:
        spec = json.loads(path.read_text())
    except FileNotFoundError:
        return Check("warn", "cdi", f"no spec at {path}", "the daemon writes it when run as root")
    except (OSError, ValueError) as exc:
        return Check(
            "fail",
            "cdi",
            f"{path} is not valid JSON: {exc}",
            "restart the daemon: it writes the spec again",
        )
    if not isinstance(spec, dict) or not isinstance(spec.get("devices"), list):
        return Check(
            "fail",
            "cdi",
            f"{path} is no CDI spec (no devices list)",
            "restart the daemon: it writes the spec again",
        )
    return Check("ok", "cdi", f"{path}: kind {spec.get('kind')}, {len(spec['devices'])} devices")


def _state(directory: Path) -> Check:
    try:
        st = directory.stat()
    except FileNotFoundError:
        return Check("warn", "state", f"{directory} does not exist", "the daemon makes it at start")
    except OSError as exc:
        return Check("fail", "state", f"cannot look at {directory}: {exc.strerror}")
    mode = stat.S_IMODE(st.st_mode)
    if st.st_mode & 0o022:
        return Check(
            "fail",
            "state",
            f"others can write to {directory} (mode {mode:04o})",
            f"chmod go-w {directory}",
        )
    return Check("ok", "state", f"{directory} (mode {mode:04o}, uid {st.st_uid})")


def _socket(path: Path) -> Check:
    try:
        st = path.stat()
    except OSError as exc:
        return Check("fail", "socket", f"cannot look at {path}: {exc.strerror}", "start the daemon")
    mode = stat.S_IMODE(st.st_mode)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    if mode & 0o002:
        return Check(
            "fail",
            "socket",
            f"{path} is mode {mode:04o}: anyone may connect",
            "restart the daemon, which makes it 0660",
        )
    who = f"root and group {group}" if mode & 0o020 else f"root and uid {st.st_uid} only"
    return Check("ok", "socket", f"{path} mode {mode:04o}: {who} may connect")


def _plugins(kubelet_dir: Path, nomad_dir: Path) -> list[Check]:
    checks = []
    ours = sorted(p.name for p in kubelet_dir.glob("hotplug-monitor*.sock"))
    if ours:
        checks.append(Check("ok", "kubelet", f"registered in {kubelet_dir}: {', '.join(ours)}"))
    else:
        checks.append(
            Check(
                "warn",
                "kubelet",
                f"no plugin socket in {kubelet_dir}",
                "if Kubernetes: systemctl enable --now hotplug-monitor-kubelet-plugin",
            )
        )
    plugin = nomad_dir / "hotplug-monitor"
    if plugin.exists():
        checks.append(Check("ok", "nomad", f"plugin installed at {plugin}"))
    else:
        checks.append(
            Check(
                "warn",
                "nomad",
                f"no plugin at {plugin}",
                "if Nomad: see docs/nomad.md",
            )
        )
    return checks


def _exporter(url: str) -> Check:
    try:
        with urllib.request.urlopen(url, timeout=3) as answer:
            text = answer.read(1 << 22).decode("utf-8", "replace")
    except (OSError, ValueError) as exc:
        return Check(
            "warn",
            "exporter",
            f"nothing answers at {url} ({exc})",
            "if wanted: ./install.sh --with exporter, or give --exporter URL",
        )
    if "hotplug_monitor_up 1" in text:
        return Check("ok", "exporter", f"{url} answers, the daemon up")
    return Check(
        "fail",
        "exporter",
        f"{url} answers, but hotplug_monitor_up is not 1",
        "the exporter cannot reach the daemon: its user must be in the read group",
    )


def checks(args: argparse.Namespace) -> list[Check]:
    socket = args.socket or client_socket()
    found, status, fingerprint = _daemon(socket)
    found.append(_udev())
    if fingerprint is not None and status is not None:
        found += [_nvml(fingerprint), _kmsg(status)]
    found += [
        _cdi(args.cdi_dir or default_cdi_dir()),
        _state(args.state_dir or default_state_dir()),
    ]
    found.append(_socket(socket))
    found += _plugins(args.kubelet_dir, args.nomad_plugin_dir)
    found.append(_exporter(args.exporter))
    return found


def cmd_doctor(args: argparse.Namespace) -> int:
    found = checks(args)
    if args.json:
        say(json.dumps([attrs.asdict(check) for check in found], indent=2))
    else:
        say("\n".join(check.line() for check in found))
    return 1 if any(check.level == "fail" for check in found) else 0
