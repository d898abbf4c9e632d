"""Settings: defaults that need no file, then the TOML config file, then flags (flags win)."""

from __future__ import annotations

import argparse
import grp
import os
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from monitor.core.pci import DEFAULT_MATCH_CLASSES
from monitor.core.xids import XidPolicy
from monitor.outputs.files import UnsafePath, read_regular_file
from monitor.wire.paths import SYSTEM_SOCKET, default_socket

UDEV_SOURCES = ("auto", "udev", "kernel")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_TARGETS = ("auto", "journal", "stderr")
CDI_PUBLISH_MODES = ("all", "leased")  # monitor.outputs.cdi: every device, or leases only
_CLASS_PREFIX = re.compile(r"^(?:0x)?((?:[0-9a-f]{2}){1,3})$")


class ConfigError(Exception):
    """A setting that cannot be used; the message says which and why."""


DEFAULT_GROUP = "hotplug-monitor"
MAX_GID = (1 << 32) - 2  # (gid_t) -1 means "no change" to chown


def resolve_group(name: str | None) -> int | None:
    """The gid of ``name``; with no name, that of ``hotplug-monitor`` if it exists, else None."""
    try:
        return grp.getgrnam(name or DEFAULT_GROUP).gr_gid
    except KeyError:
        if name is None:
            return None
        if name.isascii() and name.isdigit():
            if int(name) > MAX_GID:
                raise ConfigError(f"group ID {name} is out of range (at most {MAX_GID})") from None
            return int(name)
        raise ConfigError(f"no group named {name!r} on this host") from None


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


def default_config() -> Path:
    if _is_root():
        return Path("/etc/hotplug-monitor/config.toml")
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "hotplug-monitor" / "config.toml"


def class_prefix(text: str) -> str:
    """``0x03``, ``0302`` or ``0x030200`` -> the hex prefix a class code must start with."""
    match = _CLASS_PREFIX.match(text.strip().lower())
    if match is None:
        raise ValueError(
            f"invalid PCI class {text!r}: give 2, 4 or 6 hex digits, such as 0x03 or 0x0302"
        )
    return match.group(1)


# --- one definition per setting: its file key, how it is read, its flag, its help ------------


def _toml_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    names |= {list: "a list", dict: "a table"}
    return names.get(type(value), type(value).__name__)


@attrs.frozen
class Kind:
    """How a setting's value is given: the TOML types the file may use, what a person is told
    it must be, how it becomes the setting's value (``ValueError`` saying what is wanted), and
    how its flag takes it (``argparse`` keywords)."""

    types: type | tuple[type, ...]
    wanted: str
    convert: Callable[[Any], Any] = attrs.field(default=lambda v: v)
    flag: dict[str, Any] = attrs.field(factory=dict)

    def read(self, value: Any) -> Any:
        if not isinstance(value, self.types) or (self.types is int and isinstance(value, bool)):
            raise ValueError(f"must be {self.wanted}, not {_toml_type(value)}")
        return self.convert(value)


def _flag_type(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type from a converter that raises ValueError with a sentence."""

    def parse(text: str) -> Any:
        try:
            return convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def choice(choices: tuple[str, ...]) -> Kind:
    def convert(value: str) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, not {value!r}")
        return value

    return Kind(str, f"one of {', '.join(choices)}", convert, {"choices": choices})


def list_of(item: Kind, items: str, metavar: str) -> Kind:
    """A list of ``items``, each of ``item``; an item's error names its index. Its flag is
    given once per item."""

    def convert(values: list[Any]) -> tuple[Any, ...]:
        out = []
        for index, value in enumerate(values):
            try:
                out.append(item.read(value))
            except ValueError as exc:
                raise ValueError(f"item {index} ({value!r}): {exc}") from None
        return tuple(out)

    flag = {"action": "append", "type": item.flag.get("type"), "metavar": metavar}
    return Kind(list, f"a list of {items}", convert, flag)


def xid(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 1 << 16:
        raise ValueError(f"an XID is a whole number from 1 to 65535, not {value!r}")
    return value


PATH = Kind(str, "a path (a string)", Path, {"type": Path, "metavar": "PATH"})
SECONDS = Kind((int, float), "a number of seconds", float, {"type": float, "metavar": "SECONDS"})
COUNT = Kind(int, "a whole number", int, {"type": int, "metavar": "N"})
SWITCH = Kind(bool, "true or false")
CLASS = Kind(str, 'a PCI class such as "0x03"', class_prefix, {"type": _flag_type(class_prefix)})
XID = Kind(int, "an XID (a whole number)", xid, {"type": _flag_type(lambda t: xid(int(t)))})


def _path_or_none(value: str) -> Path | None:
    return Path(value) if value else None


def _at_least(low: float, unit: str = "") -> Callable[[Any], str | None]:
    return lambda v: None if v >= low else f"must be at least {low:g}{unit}"


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be a positive number of seconds"


def setting(
    default: Any = None,
    *,
    kind: Kind,
    help: str,
    key: str | None = None,
    live: bool = False,
    check: Callable[[Any], str | None] | None = None,
    factory: Callable[[], Any] | None = None,
    off: str | None = None,
) -> Any:
    """A setting: its key in the config file (``key``, else its name), its kind, its help for
    ``serve --help``, whether a reload applies it at once (``live``) or it takes a restart, what
    else its value must satisfy (``check``), and for a path that may be none, the flag that
    turns it off (``off``)."""
    metadata = {"kind": kind, "help": help, "key": key, "live": live, "check": check, "off": off}
    if factory is not None:
        return attrs.field(factory=factory, metadata=metadata)
    return attrs.field(default=default, metadata=metadata)


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
    nvml_timeout: float = setting(
        5.0,
        kind=SECONDS,
        check=_positive,
        help="an NVML call slower than this marks its GPU 'NVML not responding', and a GPU "
        "NVML has not named by then is shown under the hardware database's name (default: 5)",
    )
    xid_ignore: tuple[int, ...] = setting(
        (),
        live=True,
        kind=list_of(XID, "XIDs", "XID"),
        help="treat this XID as an application error (GPU stays healthy), repeatable",
    )
    xid_fatal: tuple[int, ...] = setting(
        (),
        live=True,
        kind=list_of(XID, "XIDs", "XID"),
        help="treat this XID as fatal (GPU unhealthy until reset), repeatable",
    )
    xid_health: bool = setting(
        True, live=True, kind=SWITCH, help="log and count XIDs but never change health on them"
    )
    # Room for about 13,000 queued uevents: a driver reload on a full host fits, and a storm
    # beyond it overflows into a resync (milliseconds) instead of a backlog that takes seconds.
    netlink_buffer: int = setting(
        8 * 1024 * 1024,
        kind=attrs.evolve(COUNT, flag={"type": int, "metavar": "BYTES"}),
        check=_at_least(65536, " bytes"),
        help="uevent socket receive buffer (default: 8 MiB, at least 64 KiB)",
    )
    max_clients: int = setting(
        1024,
        kind=COUNT,
        check=_at_least(1),
        help="connections of users other than root and the daemon's, together; root and the "
        "daemon's user have as many of their own (default: 1024)",
    )
    max_clients_per_uid: int = setting(
        64, kind=COUNT, check=_at_least(1), help="connections of any one such user (default: 64)"
    )
    client_timeout: float = setting(
        60.0,
        kind=SECONDS,
        check=_positive,
        help="close a connection that leaves a request line unfinished, or sends nothing, for "
        "this long; subscribers that read and holders of connection-bound leases may stay "
        "quiet (default: 60)",
    )
    group: str | None = setting(
        None,
        kind=Kind(str, "a group name or ID (a string)", flag={"metavar": "NAME"}),
        help="group that may connect to the socket and reserve devices "
        "(default: hotplug-monitor if it exists; else only root and the daemon's user)",
    )
    cdi_dir: Path | None = setting(
        kind=Kind(str, 'a path, or "" for none', _path_or_none, {"type": Path, "metavar": "DIR"}),
        factory=default_cdi_dir,
        off="--no-cdi",
        help="keep a CDI spec (hotplug-monitor.json) of the present devices here "
        "(default: /var/run/cdi as root, none otherwise)",
    )
    cdi_publish: str = setting(
        "all",
        kind=choice(CDI_PUBLISH_MODES),
        help="what the CDI spec names: all, every present device (whoever holds it); or "
        "leased, each lease as one device named after its reservation ID, and nothing else "
        "(default: all)",
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
        return XidPolicy(self.xid_health, frozenset(self.xid_ignore), frozenset(self.xid_fatal))


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """A flag for every setting (``--state-dir``, ``--no-nvml``, ...), none with a default:
    what a flag does not say, the file or the default does."""
    for field in attrs.fields(Settings):
        meta = field.metadata
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
        value = getattr(args, field.name)
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
    return settings
