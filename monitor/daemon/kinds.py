"""How a setting is given: the TOML types its file key takes, its flag, and its checks."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs


def _toml_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    names |= {list: "a list", dict: "a table"}
    return names.get(type(value), type(value).__name__)


class ConfigError(Exception):
    """A setting that cannot be used; the message says which and why."""


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


def flag_type(convert: Callable[[str], Any]) -> Callable[[str], Any]:
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


PATH = Kind(str, "a path (a string)", Path, {"type": Path, "metavar": "PATH"})
SECONDS = Kind((int, float), "a number of seconds", float, {"type": float, "metavar": "SECONDS"})
COUNT = Kind(int, "a whole number", int, {"type": int, "metavar": "N"})
SWITCH = Kind(bool, "true or false")


def at_least(low: float, unit: str = "") -> Callable[[Any], str | None]:
    return lambda v: None if v >= low else f"must be at least {low:g}{unit}"


def positive(v: Any) -> str | None:
    return None if v > 0 else "must be a positive number of seconds"


def setting(
    default: Any = None,
    *,
    kind: Kind,
    help: str,
    key: str | None = None,
    live: bool = False,
    flag: bool = True,
    check: Callable[[Any], str | None] | None = None,
    factory: Callable[[], Any] | None = None,
    off: str | None = None,
) -> Any:
    """A setting: its key in the config file (``key``, else its name), its kind, its help for
    ``serve --help``, whether a reload applies it at once (``live``) or it takes a restart, what
    else its value must satisfy (``check``), and for a path that may be none, the flag that
    turns it off (``off``). A table (``flag=False``) is given in the file only."""
    metadata = {"kind": kind, "help": help, "key": key, "live": live, "check": check, "off": off}
    metadata["flag"] = flag
    if factory is not None:
        return attrs.field(factory=factory, metadata=metadata)
    return attrs.field(default=default, metadata=metadata)
