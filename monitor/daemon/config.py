"""Settings: defaults that need no file, then the TOML config file, then flags (flags win)."""

from __future__ import annotations

import os
import re
import stat
import tomllib
from pathlib import Path
from typing import Any

import attrs

from monitor.core.fingerprint import DEFAULT_MATCH_CLASSES
from monitor.core.xids import XidPolicy
from monitor.outputs.files import UnsafePath, read_regular_file

UDEV_SOURCES = ("auto", "udev", "kernel")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_TARGETS = ("auto", "journal", "stderr")
_CLASS_PREFIX = re.compile(r"^(?:0x)?((?:[0-9a-f]{2}){1,3})$")


class ConfigError(Exception):
    """A setting that cannot be used; the message says which and why."""


def _is_root() -> bool:
    return os.geteuid() == 0


SYSTEM_SOCKET = Path("/run/hotplug-monitor/hotplug-monitor.sock")


def default_socket() -> Path:
    """Where ``serve`` listens by default: the system path for root, else the user's own."""
    if _is_root():
        return SYSTEM_SOCKET
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "hotplug-monitor.sock"
    return Path(f"/tmp/hotplug-monitor-{os.getuid()}/hotplug-monitor.sock")


def _private(directory: Path) -> bool:
    """Whether ``directory`` is the user's own and closed to everyone else (mode 0700)."""
    try:
        st = directory.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077


def client_socket() -> Path:
    """Where clients connect by default: the user's own daemon if one runs, else the system's.

    The fallback below /tmp is anyone's to create: it counts only when it is the user's own
    private directory, or another user could pose as the daemon there."""
    own = default_socket()
    trusted = _is_root() or os.environ.get("XDG_RUNTIME_DIR") or _private(own.parent)
    if trusted and (own.exists() or not SYSTEM_SOCKET.exists()):
        return own
    return SYSTEM_SOCKET


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
        raise ConfigError(
            f"invalid PCI class {text!r}: give 2, 4 or 6 hex digits, such as 0x03 or 0x0302"
        )
    return match.group(1)


def _xid(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 1 << 16:
        raise ConfigError(f"an XID is a positive number, not {value!r}")
    return value


def _choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
    return value


@attrs.frozen
class Settings:
    socket: Path = attrs.field(factory=default_socket)
    state_dir: Path = attrs.field(factory=default_state_dir)
    udev_source: str = "auto"
    match_classes: tuple[str, ...] = DEFAULT_MATCH_CLASSES
    nvml: bool = True
    nvml_timeout: float = 5.0  # seconds an NVML call may take before its GPU is "not responding"
    xid_ignore: tuple[int, ...] = ()  # XIDs to treat as application errors
    xid_fatal: tuple[int, ...] = ()  # XIDs to treat as fatal
    xid_health: bool = True  # False: XIDs are logged and counted, never change health
    # Room for about 13,000 queued uevents: a driver reload on a full host fits, and a storm
    # beyond it overflows into a resync (milliseconds) instead of a backlog that takes seconds.
    netlink_buffer: int = 8 * 1024 * 1024
    max_clients: int = 1024  # of users other than root and the daemon's; those have as many
    max_clients_per_uid: int = 64
    client_timeout: float = 60.0  # to finish a request line, or to send anything at all
    group: str | None = None  # None: hotplug-monitor if that group exists
    cdi_dir: Path | None = attrs.field(factory=default_cdi_dir)  # None: write no CDI spec
    log_level: str = "info"
    log_target: str = "auto"

    @property
    def xid_policy(self) -> XidPolicy:
        return XidPolicy(self.xid_health, frozenset(self.xid_ignore), frozenset(self.xid_fatal))


# name in the file -> (type the file must give, how to turn it into the setting)
_FILE_KEYS: dict[str, tuple[type | tuple[type, ...], Any]] = {
    "socket": (str, Path),
    "state_dir": (str, Path),
    "udev_source": (str, lambda v: _choice("udev_source", v, UDEV_SOURCES)),
    "match_class": (list, lambda v: tuple(class_prefix(str(c)) for c in v)),
    "nvml": (bool, bool),
    "nvml_timeout": ((int, float), float),
    "xid_ignore": (list, lambda v: tuple(_xid(x) for x in v)),
    "xid_fatal": (list, lambda v: tuple(_xid(x) for x in v)),
    "xid_health": (bool, bool),
    "netlink_buffer": (int, int),
    "max_clients": (int, int),
    "max_clients_per_uid": (int, int),
    "client_timeout": ((int, float), float),
    "group": (str, str),
    "cdi_dir": (str, lambda v: Path(v) if v else None),
    "log_level": (str, lambda v: _choice("log_level", v, LOG_LEVELS)),
    "log_target": (str, lambda v: _choice("log_target", v, LOG_TARGETS)),
}
_SETTING_OF = {"match_class": "match_classes"}


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
        if key not in _FILE_KEYS:
            known = ", ".join(_FILE_KEYS)
            raise ConfigError(f"{path}: unknown setting {key!r} (known: {known})")
        expected, convert = _FILE_KEYS[key]
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ConfigError(f"{path}: {key} has the wrong type ({type(value).__name__})")
        settings[_SETTING_OF.get(key, key)] = convert(value)
    return settings


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
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values.get("cdi_dir") is False:
        values["cdi_dir"] = None
    settings = Settings(**values)
    if settings.netlink_buffer < 64 * 1024:
        raise ConfigError("netlink_buffer must be at least 65536 bytes")
    if settings.max_clients < 1 or settings.max_clients_per_uid < 1:
        raise ConfigError("max_clients and max_clients_per_uid must be at least 1")
    if not settings.client_timeout > 0:
        raise ConfigError("client_timeout must be a positive number of seconds")
    if not settings.nvml_timeout > 0:
        raise ConfigError("nvml_timeout must be a positive number of seconds")
    for xid in settings.xid_ignore + settings.xid_fatal:
        _xid(xid)  # flags come here unchecked
    both = set(settings.xid_ignore) & set(settings.xid_fatal)
    if both:
        raise ConfigError(f"XIDs both ignored and fatal: {', '.join(map(str, sorted(both)))}")
    return settings
