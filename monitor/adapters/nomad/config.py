"""The plugin's settings: what the client's ``plugin`` block says (its ``config``, decoded by
Nomad with our schema and sent to SetConfig as go-cty MessagePack, and its ``args``, our flags),
checked once, with flags winning over the config block.

| setting | config key | flag | default |
| --- | --- | --- | --- |
| the daemon's socket | ``socket`` | ``--socket PATH`` | the system daemon's |
| devices left out | ``ignored_device_ids`` | ``--ignore-device ID`` | none |
| groups offered | ``groups`` | ``--offer GROUP`` | every group the daemon reports |
| the Nomad agent's API | ``nomad_address`` | ``--nomad-address URL`` | ``http://127.0.0.1:4646`` |
| its ACL token, in a file | ``nomad_token_file`` | ``--nomad-token-file PATH`` | none |
| seconds between reconciles | ``reconcile_interval`` | ``--reconcile-interval S`` | 30 (0: off) |

Pure: no I/O; every refusal is a ``ConfigRefused`` whose message Nomad shows as it is.
"""

from __future__ import annotations

import math
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import msgpack

from monitor.adapters.nomad.protos import hclspec_pb2
from monitor.wire.paths import SYSTEM_SOCKET
from monitor.wire.snapshot import PCI_ADDRESS, GroupPattern, is_ignored, is_ignored_device

# Nomad's own device plugin API version, the one its loader accepts for device plugins.
DEVICE_API_VERSION = "v0.1.0"

# NVIDIA's identifiers, as nvidia-smi -L and nomad-device-nvidia's ignored_gpu_ids write them.
GPU_UUID = re.compile(r"(GPU|MIG)-[0-9A-Fa-f-]{8,64}")
# sun_path is 108 bytes on Linux, with its terminating NUL.
MAX_SOCKET_PATH = 107
MAX_ENTRIES = 1024
KEYS = (
    "socket",
    "ignored_device_ids",
    "groups",
    "nomad_address",
    "nomad_token_file",
    "reconcile_interval",
)
NOMAD_ADDRESS = "http://127.0.0.1:4646"  # the local agent, as Nomad's own CLI defaults to
RECONCILE_INTERVAL_S = 30.0
MAX_RECONCILE_INTERVAL_S = 3600.0


class ConfigRefused(ValueError):
    """A setting Nomad (or the command line) gave that the plugin cannot use; says which."""


@attrs.frozen
class Overrides:
    """What the command line said; ``None`` where it said nothing (the config block decides)."""

    socket: Path | None = None
    ignored_device_ids: tuple[str, ...] | None = None
    groups: tuple[str, ...] | None = None
    nomad_address: str | None = None
    nomad_token_file: Path | None = None
    reconcile_interval: float | None = None


@attrs.frozen
class PluginConfig:
    socket: Path = SYSTEM_SOCKET
    ignored: frozenset[str] = frozenset()  # PCI addresses (lower case), GPU and MIG UUIDs
    groups: tuple[GroupPattern, ...] = ()  # none: every group
    nomad_address: str = NOMAD_ADDRESS  # scheme://host[:port], no trailing slash
    nomad_token_file: Path | None = None
    reconcile_interval: float = RECONCILE_INTERVAL_S  # 0: leases are not reconciled

    def offers(self, vendor: str, type_: str, name: str) -> bool:
        return not self.groups or any(g.matches(vendor, type_, name) for g in self.groups)

    def ignores(self, device_id: str, uuid: object = None, pci_address: str | None = None) -> bool:
        return is_ignored(self.ignored, device_id, uuid, pci_address)

    def ignores_device(self, device_id: str, device: Mapping[str, Any]) -> bool:
        """Whether ``ignored_device_ids`` names the device, its GPU or its GPU's PCI address."""
        return is_ignored_device(self.ignored, device_id, device)


def _default(attr: hclspec_pb2.Attr, literal: str) -> hclspec_pb2.Spec:
    return hclspec_pb2.Spec(
        default=hclspec_pb2.Default(
            primary=hclspec_pb2.Spec(Attr=attr),
            default=hclspec_pb2.Spec(literal=hclspec_pb2.Literal(value=literal)),
        )
    )


def schema() -> hclspec_pb2.Spec:
    """The ``config`` block Nomad decodes for us: every key optional, with its default.

    ``socket`` defaults to ``""``, which means the system daemon's socket, so that a flag can
    tell "not set" from a path; likewise ``nomad_address`` and ``nomad_token_file`` (``""``),
    and ``reconcile_interval`` (-1: the default)."""
    return hclspec_pb2.Spec(
        object=hclspec_pb2.Object(
            attributes={
                "socket": _default(hclspec_pb2.Attr(name="socket", type="string"), '""'),
                "ignored_device_ids": _default(
                    hclspec_pb2.Attr(name="ignored_device_ids", type="list(string)"), "[]"
                ),
                "groups": _default(hclspec_pb2.Attr(name="groups", type="list(string)"), "[]"),
                "nomad_address": _default(
                    hclspec_pb2.Attr(name="nomad_address", type="string"), '""'
                ),
                "nomad_token_file": _default(
                    hclspec_pb2.Attr(name="nomad_token_file", type="string"), '""'
                ),
                "reconcile_interval": _default(
                    hclspec_pb2.Attr(name="reconcile_interval", type="number"), "-1"
                ),
            }
        )
    )


def decode(raw: bytes) -> dict[str, Any]:
    """The config block as SetConfig carries it (a MessagePack map), by key; nothing is
    checked beyond its being a map of known keys."""
    if not raw:
        return {}
    try:
        config = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        raise ConfigRefused(f"the config is not valid MessagePack: {error}") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ConfigRefused(f"the config must be a map, not {type(config).__name__}")
    unknown = sorted(str(k) for k in config if k not in KEYS)
    if unknown:
        raise ConfigRefused(f"unknown config keys: {', '.join(unknown)} (known: {', '.join(KEYS)})")
    return config


def _strings(key: str, value: object) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ConfigRefused(f"{key} must be a list of strings")
    if len(value) > MAX_ENTRIES:
        raise ConfigRefused(f"{key} has {len(value)} entries; at most {MAX_ENTRIES}")
    return list(value)


def _socket(value: object) -> Path:
    if value is None or value == "":
        return SYSTEM_SOCKET
    if not isinstance(value, str | Path):
        raise ConfigRefused("socket must be a string")
    text = str(value)
    if not text.startswith("/"):
        raise ConfigRefused(f"socket must be an absolute path, not {text!r}")
    if "\0" in text or not text.isprintable():
        raise ConfigRefused(f"socket {text!r} has characters no path may have")
    if len(text.encode()) > MAX_SOCKET_PATH:
        raise ConfigRefused(f"socket path is longer than a Unix socket allows: {text!r}")
    return Path(text)


def _device_id(text: str) -> str:
    lowered = text.lower()
    if PCI_ADDRESS.fullmatch(lowered):
        return lowered
    if GPU_UUID.fullmatch(text):
        return text
    raise ConfigRefused(
        f"ignored_device_ids: {text!r} is neither a PCI address (0000:3b:00.0) "
        "nor a GPU or MIG UUID (GPU-..., MIG-...)"
    )


def settle(config: Mapping[str, Any], flags: Overrides = Overrides()) -> PluginConfig:
    """The settings from the decoded config block and the flags (which win), checked."""

    def pick(key: str) -> Any:
        given = getattr(flags, key)
        return given if given is not None else config.get(key)

    return PluginConfig(
        socket=_socket(pick("socket")),
        ignored=frozenset(
            _device_id(i) for i in _strings("ignored_device_ids", pick("ignored_device_ids"))
        ),
        groups=tuple(_group_pattern(g) for g in _strings("groups", pick("groups"))),
        nomad_address=_nomad_address(pick("nomad_address")),
        nomad_token_file=_token_file(pick("nomad_token_file")),
        reconcile_interval=_interval(pick("reconcile_interval")),
    )


def _nomad_address(value: object) -> str:
    if value is None or value == "":
        return NOMAD_ADDRESS
    text = str(value) if isinstance(value, str) else None
    parts = urllib.parse.urlsplit(text) if text is not None and text.isprintable() else None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.username is not None
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        raise ConfigRefused(  # without the value: it may hold a password
            "nomad_address must be the agent's http:// or https:// address, scheme, host and "
            f"port only, such as {NOMAD_ADDRESS}"
        )
    return f"{parts.scheme}://{parts.netloc}"


def _token_file(value: object) -> Path | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str | Path):
        raise ConfigRefused("nomad_token_file must be a string")
    text = str(value)
    if not text.startswith("/") or "\0" in text or not text.isprintable():
        raise ConfigRefused(f"nomad_token_file must be an absolute path, not {text[:200]!r}")
    return Path(text)


def _interval(value: object) -> float:
    if value is None or value == -1:
        return RECONCILE_INTERVAL_S
    if (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0 <= value <= MAX_RECONCILE_INTERVAL_S
    ):
        return float(value)
    raise ConfigRefused(
        f"reconcile_interval must be 0 (off) or a number of seconds up to "
        f"{MAX_RECONCILE_INTERVAL_S:g}, not {str(value)[:80]!r}"
    )


def describe(config: PluginConfig) -> dict[str, Any]:
    """The settings, for one log line."""
    return {
        "socket": str(config.socket),
        "ignored_device_ids": sorted(config.ignored),
        "groups": [str(g) for g in config.groups] or "all",
        "nomad_address": config.nomad_address,
        "nomad_token_file": str(config.nomad_token_file or "none"),  # the path, never the token
        "reconcile_interval": config.reconcile_interval,
    }


def flags_from(
    socket: Path | None,
    ignore: Iterable[str] | None,
    offer: Iterable[str] | None,
    nomad_address: str | None = None,
    nomad_token_file: Path | None = None,
    reconcile_interval: float | None = None,
) -> Overrides:
    """The command line's values as overrides (an option not given stays None)."""
    return Overrides(
        socket=socket,
        ignored_device_ids=tuple(ignore) if ignore is not None else None,
        groups=tuple(offer) if offer is not None else None,
        nomad_address=nomad_address,
        nomad_token_file=nomad_token_file,
        reconcile_interval=reconcile_interval,
    )


def _group_pattern(text: str) -> GroupPattern:
    try:
        return GroupPattern.parse(text)
    except ValueError as error:
        raise ConfigRefused(f"groups: {error}") from None
