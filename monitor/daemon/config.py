"""Settings: defaults that need no file, then the TOML config file, then flags (flags win)."""

from __future__ import annotations

import argparse
import os
import tomllib
from pathlib import Path
from typing import Any

import attrs

from monitor.core.conditions import NAMES as CONDITION_NAMES
from monitor.core.conditions import HealthPolicy
from monitor.core.pci import DEFAULT_MATCH_CLASSES
from monitor.core.replicas import MAX_REPLICAS, SharePolicy, ShareRule, check_match
from monitor.core.xids import XidPolicy
from monitor.daemon.identities import owner_map
from monitor.daemon.kinds import (
    COUNT,
    PATH,
    SECONDS,
    SWITCH,
    Kind,
    at_least,
    choice,
    list_of,
    positive,
    setting,
)
from monitor.daemon.kinds import ConfigError as ConfigError  # raised by every setting's check
from monitor.daemon.values import CLASS, CONDITION, XID, health_interval, path_or_none
from monitor.outputs.files import UnsafePath, read_regular_file
from monitor.wire.paths import SYSTEM_SOCKET, default_socket

UDEV_SOURCES = ("auto", "udev", "kernel")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_TARGETS = ("auto", "journal", "stderr")
CDI_PUBLISH_MODES = ("all", "leased")  # monitor.outputs.cdi: every device, or leases only


def _is_root() -> bool:
    return os.geteuid() == 0


def default_state_dir() -> Path:
    if _is_root():
        return Path("/var/lib/hotplug-monitor")
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "hotplug-monitor"


def default_cdi_dir() -> Path | None:
    """Where container engines look for CDI specs; only root may write there."""
    return Path("/var/run/cdi") if _is_root() else None


DEFAULT_MIG_MINORS = "/proc/driver/nvidia-caps/mig-minors"


def default_kmsg() -> Path | None:
    """The kernel log: only root may read /dev/kmsg on most hosts (dmesg_restrict)."""
    return Path("/dev/kmsg") if _is_root() else None


def default_config() -> Path:
    if _is_root():
        return Path("/etc/hotplug-monitor/config.toml")
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "hotplug-monitor" / "config.toml"


# --- one definition per setting: its file key, how it is read, its flag, its help ------------


def _replica_count(value: Any) -> str | None:
    if 1 <= value <= MAX_REPLICAS:
        return None
    return f"must be from 1 (not shared) to {MAX_REPLICAS}"


def _share_rules(value: list[Any]) -> tuple[ShareRule, ...]:
    """``[[share]]`` tables, each ``match`` (PCI IDs or a group) and ``replicas``."""
    rules = []
    for index, table in enumerate(value):
        if not isinstance(table, dict) or set(table) != {"match", "replicas"}:
            raise ValueError(f'item {index}: must be a table of "match" and "replicas"')
        match, replicas = table["match"], table["replicas"]
        if not isinstance(match, str):
            raise ValueError(f"item {index}: match must be a string")
        if not isinstance(replicas, int) or isinstance(replicas, bool):
            raise ValueError(f"item {index}: replicas must be a whole number")
        problem = _replica_count(replicas)
        if problem:
            raise ValueError(f"item {index}: replicas {problem}")
        try:
            rules.append(ShareRule(check_match(match), replicas))
        except ValueError as exc:
            raise ValueError(f"item {index}: {exc}") from None
    return tuple(rules)


@attrs.frozen
class Settings:
    socket: Path = setting(
        kind=PATH,
        factory=default_socket,
        help=f"where to listen (default: {SYSTEM_SOCKET} as root, "
        "$XDG_RUNTIME_DIR/hotplug-monitor.sock otherwise)",
    )
    state_dir: Path = setting(
        kind=attrs.evolve(PATH, flag={"type": Path, "metavar": "DIR"}),
        factory=default_state_dir,
        help="where reservations are kept across restarts (default: /var/lib/hotplug-monitor "
        "as root, $XDG_STATE_HOME/hotplug-monitor otherwise)",
    )
    udev_source: str = setting(
        "auto",
        kind=choice(UDEV_SOURCES),
        help="uevents from udevd, from the kernel directly, or auto: udevd when it runs "
        "(default: auto)",
    )
    match_classes: tuple[str, ...] = setting(
        DEFAULT_MATCH_CLASSES,
        key="match_class",
        live=True,
        kind=list_of(CLASS, 'PCI class prefixes such as "0x03"', "HEX"),
        help="PCI class prefix of the devices to follow, repeatable "
        "(default: 0x03 display and 0x12 processing accelerators)",
    )
    nvml: bool = setting(
        True,
        kind=SWITCH,
        help="do not use NVIDIA's NVML library (no XIDs, no NVML names or attributes)",
    )
    kmsg: Path | None = setting(
        kind=Kind(str, 'a path, or "" for none', path_or_none, {"type": Path, "metavar": "PATH"}),
        factory=default_kmsg,
        off="--no-kmsg",
        help="read the NVIDIA driver's XID lines from this kernel log (/dev/kmsg, or a FIFO "
        "in its format) (default: /dev/kmsg as root, none otherwise)",
    )
    kmsg_trust_user: bool = setting(
        False,
        kind=Kind(bool, "true or false", flag={"action": "store_const", "const": True}),
        help="also take the kernel log lines userspace wrote (facility 1), not only the "
        "kernel's: any root process could then report XIDs (default: off)",
    )
    mig_minors: Path = setting(
        kind=PATH,
        factory=lambda: Path(DEFAULT_MIG_MINORS),
        help="the NVIDIA driver's MIG capability minors, which give a MIG instance's "
        f"/dev/nvidia-caps nodes (default: {DEFAULT_MIG_MINORS})",
    )
    nvml_timeout: float = setting(
        5.0,
        kind=SECONDS,
        check=positive,
        help="an NVML call slower than this marks its GPU 'NVML not responding', and a GPU "
        "NVML has not named by then is shown under the hardware database's name (default: 5)",
    )
    xid_ignore: tuple[int, ...] = setting(
        (),
        live=True,
        kind=list_of(XID, "XIDs", "XID"),
        help="keep GPUs schedulable on this XID, whatever NVIDIA's catalog says, repeatable",
    )
    xid_fatal: tuple[int, ...] = setting(
        (),
        live=True,
        kind=list_of(XID, "XIDs", "XID"),
        help="take GPUs out on this XID until a reset (a reboot where the catalog says so), "
        "repeatable",
    )
    xid_unknown: str = setting(
        "drain",
        live=True,
        kind=choice(("drain", "report")),
        help="XIDs not in NVIDIA's catalog, or whose action is for a person (CONTACT_SUPPORT, "
        "...): drain the GPU until a reset, or only report them (default: drain)",
    )
    xid_health: bool = setting(
        True, live=True, kind=SWITCH, help="log and count XIDs but never change health on them"
    )
    health_interval: float = setting(
        30.0,
        kind=SECONDS,
        check=health_interval,
        help="read each GPU's health conditions (row remapping, page retirement, ECC, PCIe "
        "replays, clock slowdowns, NVLink) this often; 0 turns the watches off (default: 30)",
    )
    health_ignore: tuple[str, ...] = setting(
        (),
        live=True,
        kind=list_of(CONDITION, "health conditions", "CONDITION"),
        help="keep GPUs schedulable on this health condition (still shown), repeatable; "
        f"one of {', '.join(CONDITION_NAMES)}",
    )
    health_fatal: tuple[str, ...] = setting(
        (),
        live=True,
        kind=list_of(CONDITION, "health conditions", "CONDITION"),
        help="drain GPUs on this health condition until NVML no longer reports it, repeatable",
    )
    # Room for about 13,000 queued uevents: a driver reload on a full host fits, and a storm
    # beyond it overflows into a resync (milliseconds) instead of a backlog that takes seconds.
    netlink_buffer: int = setting(
        8 * 1024 * 1024,
        kind=attrs.evolve(COUNT, flag={"type": int, "metavar": "BYTES"}),
        check=at_least(65536, " bytes"),
        help="uevent socket receive buffer (default: 8 MiB, at least 64 KiB)",
    )
    max_clients: int = setting(
        1024,
        kind=COUNT,
        check=at_least(1),
        help="connections of users other than root and the daemon's, together; root and the "
        "daemon's user have as many of their own (default: 1024)",
    )
    max_clients_per_uid: int = setting(
        64, kind=COUNT, check=at_least(1), help="connections of any one such user (default: 64)"
    )
    client_timeout: float = setting(
        60.0,
        kind=SECONDS,
        check=positive,
        help="close a connection that leaves a request line unfinished, or sends nothing, for "
        "this long; subscribers that read and holders of connection-bound leases may stay "
        "quiet (default: 60)",
    )
    group: str | None = setting(
        None,
        kind=Kind(str, "a group name or ID (a string)", flag={"metavar": "NAME"}),
        help="group that may connect to the socket and reserve devices "
        "(default: hotplug-monitor if it exists and the daemon runs as root or a member; else "
        "only root and the daemon's user)",
    )
    read_group: str | None = setting(
        None,
        kind=Kind(str, "a group name or ID (a string)", flag={"metavar": "NAME"}),
        help="group that may connect to the socket and read (fingerprint, subscribe, stats, "
        "status, leases), and nothing else (default: hotplug-monitor-read if it exists)",
    )
    owners: tuple[tuple[str, tuple[str, ...]], ...] = setting(
        (),
        kind=Kind(dict, 'a table of owner names, each a list such as ["uid:1001", "group:g"]',
                  owner_map),
        flag=False,
        help="who may use each owner name besides root (config file only)",
    )  # fmt: skip
    lease_rate: float = setting(
        20.0,
        kind=attrs.evolve(SECONDS, wanted="a number of requests a second", flag={
            "type": float, "metavar": "PER_SECOND"}),
        check=lambda v: None if v > 0 else "must be a positive number of requests a second",
        help="reserve, release and reconcile requests a second of any one user other than "
        "root and the daemon's; beyond it they are refused with -32000 (default: 20)",
    )  # fmt: skip
    lease_burst: int = setting(
        100,
        kind=COUNT,
        check=at_least(1),
        help="how many such requests a user may make at once before lease_rate applies "
        "(default: 100)",
    )
    cdi_dir: Path | None = setting(
        kind=Kind(str, 'a path, or "" for none', path_or_none, {"type": Path, "metavar": "DIR"}),
        factory=default_cdi_dir,
        off="--no-cdi",
        help="keep a CDI spec (hotplug-monitor.json) of the present devices here "
        "(default: /run/cdi, which CDI names /var/run/cdi, as root; none otherwise)",
    )
    cdi_publish: str = setting(
        "all",
        kind=choice(CDI_PUBLISH_MODES),
        help="what the CDI spec names: all, every present device (whoever holds it); or "
        "leased, each lease as one device named after its reservation ID, and nothing else "
        "(default: all)",
    )
    share_replicas: int = setting(
        1,
        live=True,
        kind=COUNT,
        check=_replica_count,
        help="offer each followed device no [[share]] rule matches as N time-sliced replicas "
        f"(<ID>::0 to <ID>::N-1, in a VENDOR/TYPE.shared group), 1 to {MAX_REPLICAS}; no memory "
        "or fault isolation between them (default: 1, not shared)",
    )
    share: tuple[ShareRule, ...] = setting(
        (),
        live=True,
        kind=Kind(list, 'a list of tables such as {match = "10de:2330", replicas = 4}',
                  _share_rules),
        flag=False,
        help="replicas per device class or group, the first match wins (config file only)",
    )  # fmt: skip
    fail_requests_greater_than_one: bool = setting(
        False,
        live=True,
        kind=Kind(bool, "true or false", flag={"action": "store_const", "const": True}),
        help="refuse a reservation of two replicas of one device: they share its time and give "
        "no more compute than one (default: off)",
    )
    log_level: str = setting("info", live=True, kind=choice(LOG_LEVELS), help="default: info")
    log_target: str = setting(
        "auto",
        live=True,
        kind=choice(LOG_TARGETS),
        help="journal: native entries with fields; stderr: text, with <N> priority prefixes "
        "unless stderr is a terminal; "
        "auto: stderr when it is a terminal, else the journal when it runs (default)",
    )

    @property
    def xid_policy(self) -> XidPolicy:
        return XidPolicy(
            self.xid_health,
            frozenset(self.xid_ignore),
            frozenset(self.xid_fatal),
            self.xid_unknown,
        )

    @property
    def health_policy(self) -> HealthPolicy:
        return HealthPolicy(frozenset(self.health_ignore), frozenset(self.health_fatal))

    @property
    def share_policy(self) -> SharePolicy:
        return SharePolicy(self.share_replicas, self.share, self.fail_requests_greater_than_one)


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """A flag for every setting (``--state-dir``, ``--no-nvml``, ...), none with a default:
    what a flag does not say, the file or the default does."""
    for field in attrs.fields(Settings):
        meta = field.metadata
        if not meta["flag"]:
            continue
        name = flag_name(field)
        kind: Kind = meta["kind"]
        if kind is SWITCH:  # every switch is on by default: its flag turns it off
            off = f"--no-{name[2:]}"
            parser.add_argument(
                off, dest=field.name, action="store_const", const=False, help=meta["help"]
            )
        elif meta["off"]:
            either = parser.add_mutually_exclusive_group()
            either.add_argument(name, dest=field.name, **kind.flag, help=meta["help"])
            either.add_argument(
                meta["off"], dest=field.name, action="store_const", const=False, help="none"
            )
        else:
            parser.add_argument(name, dest=field.name, **kind.flag, help=meta["help"])


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the flags gave (None: not given)."""
    values = {}
    for field in attrs.fields(Settings):
        value = getattr(args, field.name, None)
        values[field.name] = tuple(value) if isinstance(value, list) else value
    return values


SETTINGS = attrs.fields(Settings)
FILE_KEYS = {f.metadata["key"] or f.name: f for f in SETTINGS}
RESTART_ONLY = tuple(f.name for f in SETTINGS if not f.metadata["live"])
MAX_CONFIG_FILE = 1 << 20


def read_config(path: Path) -> dict[str, Any]:
    """The settings a TOML file gives, checked; unknown keys are errors, not silently ignored.

    The file is read as hostile input: a regular file of at most a MiB, owned by root or us and
    writable by nobody else, opened without blocking, parsed without recursing without end."""
    try:
        text = read_regular_file(path, MAX_CONFIG_FILE).decode("utf-8")
        raw = tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"cannot read config file {path}: it does not exist") from None
    except UnsafePath as exc:
        raise ConfigError(f"config file: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"config file {path} nests tables or arrays too deeply") from None
    settings: dict[str, Any] = {}
    for key, value in raw.items():
        field = FILE_KEYS.get(key)
        if field is None:
            known = ", ".join(FILE_KEYS)
            raise ConfigError(f"{path}: unknown setting {key!r} (known: {known})")
        try:
            settings[field.name] = _checked(field, field.metadata["kind"].read(value))
        except ValueError as exc:
            raise ConfigError(f"{path}: {key} {exc}") from None
    return settings


def _checked(field: attrs.Attribute[Any], value: Any) -> Any:
    check = field.metadata["check"]
    problem = check(value) if check is not None and value is not None else None
    if problem:
        raise ValueError(problem)
    return value


def flag_name(field: attrs.Attribute[Any]) -> str:
    return "--" + (field.metadata["key"] or field.name).replace("_", "-")


def load_settings(config: Path | None, overrides: dict[str, Any]) -> Settings:
    """Defaults, then ``config`` (or the default file, if it exists), then non-None overrides."""
    values: dict[str, Any] = {}
    if config is not None:
        values.update(read_config(config))
    else:
        default = default_config()
        try:
            exists = default.is_file()
        except OSError as exc:
            raise ConfigError(
                f"cannot look for the config file {default}: {exc.strerror}; give --config FILE"
            ) from None
        if exists:
            values.update(read_config(default))
    fields = {f.name: f for f in SETTINGS}
    for name, value in overrides.items():
        if value is None:
            continue
        if value is False and fields[name].metadata["off"]:  # --no-cdi
            values[name] = None
            continue
        try:
            values[name] = _checked(fields[name], value)
        except ValueError as exc:
            raise ConfigError(f"{flag_name(fields[name])} {exc}") from None
    settings = Settings(**values)
    both = set(settings.xid_ignore) & set(settings.xid_fatal)
    if both:
        raise ConfigError(f"XIDs both ignored and fatal: {', '.join(map(str, sorted(both)))}")
    either = set(settings.health_ignore) & set(settings.health_fatal)
    if either:
        raise ConfigError(f"health conditions both ignored and fatal: {', '.join(sorted(either))}")
    return settings
