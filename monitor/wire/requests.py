"""A builder for every method of the socket protocol, so that clients name each param once."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs


@attrs.frozen
class Call:
    method: str
    params: dict[str, Any] = attrs.field(factory=dict)


def fingerprint() -> Call:
    return Call("fingerprint")


def subscribe() -> Call:
    return Call("subscribe")


def leases() -> Call:
    return Call("leases")


def reserve(
    device_ids: Iterable[str],
    *,
    holder_pid: int | None = None,
    bind: str | None = None,
    owner: str | None = None,
    cdi: bool = False,
) -> Call:
    """``cdi``: only devices the daemon's CDI spec names, refused before any lease otherwise."""
    params: dict[str, Any] = {"device_ids": list(device_ids)}
    for name, value in (("holder_pid", holder_pid), ("bind", bind), ("owner", owner)):
        if value is not None:
            params[name] = value
    if cdi:
        params["cdi"] = True
    return Call("reserve", params)


def release(
    device_ids: Iterable[str] | None = None,
    *,
    reservation_id: str | None = None,
    owner: str | None = None,
) -> Call:
    """By devices, by reservation, or (``owner`` alone) every lease of that owner."""
    params: dict[str, Any] = {}
    if device_ids is not None:
        params["device_ids"] = list(device_ids)
    if reservation_id is not None:
        params["reservation_id"] = reservation_id
    if owner is not None:
        params["owner"] = owner
    return Call("release", params)


def reconcile(owner: str, device_ids: Iterable[str]) -> Call:
    return Call("reconcile", {"owner": owner, "device_ids": list(device_ids)})


def stats(interval: float) -> Call:
    return Call("stats", {"interval": interval})


def status() -> Call:
    return Call("status")
