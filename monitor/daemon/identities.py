"""Who the daemon's settings name: its groups, and the identities each owner name belongs to.

Looked up at start (and reload), so that a missing group is a ``ConfigError`` naming it.
"""

from __future__ import annotations

import grp
import os
import re
from typing import Any

from monitor.core.access import Identity
from monitor.core.leases import OWNER
from monitor.daemon.kinds import ConfigError

DEFAULT_GROUP = "hotplug-monitor"
DEFAULT_READ_GROUP = "hotplug-monitor-read"
MAX_GID = (1 << 32) - 2  # (gid_t) -1 means "no change" to chown
MAX_UID = (1 << 32) - 2


def _mine(gid: int) -> bool:
    """Whether we may give a file to ``gid``: root may give it to any group, others to theirs."""
    return os.geteuid() == 0 or gid == os.getegid() or gid in os.getgroups()


def resolve_group(name: str | None, default: str = DEFAULT_GROUP) -> int | None:
    """The gid of ``name``; with no name, that of ``default`` if it exists and we may give our
    files to it (root, or a member: a user's daemon beside install.sh's group), else None."""
    try:
        gid = grp.getgrnam(name or default).gr_gid
        return gid if name is not None or _mine(gid) else None
    except KeyError:
        if name is None:
            return None
        if name.isascii() and name.isdigit():
            if int(name) > MAX_GID:
                raise ConfigError(f"group ID {name} is out of range (at most {MAX_GID})") from None
            return int(name)
        raise ConfigError(f"no group named {name!r} on this host") from None


def owner_map(value: dict[str, Any]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``{"batch": ["uid:1001", "group:batch"]}``, each name and identity checked; the groups
    are looked up at start (``owner_identities``)."""
    owners = []
    for name, identities in value.items():
        if not OWNER.fullmatch(name):
            raise ValueError(f"{name!r} is not an owner name (1 to 64 of a-z, 0-9, '.', '_', '-')")
        if not isinstance(identities, list) or not all(
            isinstance(i, str) and _IDENTITY.fullmatch(i) for i in identities
        ):
            raise ValueError(
                f'{name}: must be a list of identities such as "uid:1001" or "group:batch"'
            )
        for identity in identities:
            if identity.startswith("uid:") and int(identity[4:]) > MAX_UID:
                raise ValueError(f"{name}: {identity} is out of range (at most {MAX_UID})")
        owners.append((name, tuple(identities)))
    return tuple(owners)


_IDENTITY = re.compile(r"uid:[0-9]{1,10}|group:[A-Za-z0-9_.][A-Za-z0-9_.-]{0,63}")


def owner_identities(
    owners: tuple[tuple[str, tuple[str, ...]], ...],
) -> dict[str, tuple[Identity, ...]]:
    """The ``owners`` setting with its groups looked up; ``ConfigError`` naming a missing one."""
    mapped = {}
    for name, identities in owners:
        found = []
        for identity in identities:
            kind, _, value = identity.partition(":")
            if kind == "uid":
                found.append(Identity(uid=int(value)))
            else:
                try:
                    found.append(Identity(gid=resolve_group(value)))
                except ConfigError as exc:
                    raise ConfigError(f"owners: {name}: {exc}") from None
        mapped[name] = tuple(found)
    return mapped
