"""The lease file: written so that a crash at any moment leaves the old file or the new one.

Each save writes a temporary file, fsyncs it, renames it over ``leases.json`` and fsyncs the
directory, so the rename itself survives a power cut. A file that cannot be read back, or that
holds anything but valid leases, is moved aside: never trusted and never fatal.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from monitor.core.leases import Holder, Lease
from monitor.outputs.files import UnsafePath, read_regular_file, write_atomically

log = logging.getLogger(__name__)

FILE_NAME = "leases.json"
FORMAT_VERSION = 2  # 2: holders by start ticks and boot ID; 1: by start time in epoch seconds
MAX_FILE = 16 << 20


LegacyHolder = Callable[[int, float], Holder | None]


class StoreError(Exception):
    """The lease file could not be written; the message says why, for the client too."""


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


class LeaseStore:
    def __init__(self, state_dir: Path) -> None:
        """``state_dir``: a directory ``monitor.files.secure_directory`` has checked."""
        self.path = state_dir / FILE_NAME

    def save(self, leases: Iterable[Lease]) -> None:
        """Write the durable leases; ``StoreError`` if the disk refuses (read-only, full)."""
        document = {
            "version": FORMAT_VERSION,
            "leases": [lease.to_json() for lease in leases if lease.durable],
        }
        try:
            write_atomically(self.path, json.dumps(document, indent=1).encode())
        except OSError as exc:
            raise StoreError(f"cannot write {self.path}: {exc.strerror or exc}") from None

    def load(self, legacy_holder: LegacyHolder) -> list[Lease]:
        """The leases on disk; a file that is missing gives none, a bad one is moved aside.

        ``legacy_holder`` finds the holder a version 1 file names by PID and start time in epoch
        seconds, if it still runs (``monitor.sources.holders.from_legacy``)."""
        try:
            raw = read_regular_file(self.path, MAX_FILE, follow_symlinks=False)
        except FileNotFoundError:
            return []
        except UnsafePath as exc:
            return self._set_aside(f"cannot be used ({exc})")
        try:
            document = json.loads(raw, parse_constant=_not_json)
            if not isinstance(document, dict) or document.get("version") not in (1, 2):
                raise ValueError(f"it is not a version {FORMAT_VERSION} lease file")
            entries = document.get("leases")
            if not isinstance(entries, list):
                raise ValueError("it has no list of leases")
            if document["version"] == 1:
                entries = [_from_version_1(e, legacy_holder) for e in entries]
                entries = [e for e in entries if e is not None]
            leases = [Lease.from_json(entry) for entry in entries]
            if len({lease.id for lease in leases}) != len(leases):
                raise ValueError("a reservation ID appears twice")
        except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            return self._set_aside(f"is corrupt ({exc})")
        return _exclusive(leases)

    def _set_aside(self, problem: str) -> list[Lease]:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        try:
            os.replace(self.path, aside)
            where = f"moved to {aside}"
        except OSError as exc:
            where = f"and could not be moved aside ({exc.strerror}); it will be overwritten"
        log.critical(
            "lease file %s %s: %s; starting with no leases, every reservation it held is lost",
            self.path,
            problem,
            where,
        )
        return []


def _from_version_1(entry: Any, legacy_holder: LegacyHolder) -> Any:
    """A version 1 lease as version 2; None when its holder process has exited."""
    if not isinstance(entry, dict) or entry.get("holder_pid") is None:
        return entry
    pid, started = entry["holder_pid"], entry.get("holder_start")
    if not isinstance(pid, int) or not isinstance(started, int | float) or pid <= 0:
        raise ValueError("a lease's holder_pid or holder_start is not a number")
    holder = legacy_holder(pid, float(started))
    if holder is None:
        lease_id = entry.get("reservation_id")
        log.info("reservation %s ends: its holder process %d has exited", lease_id, pid)
        return None
    return {**entry, "holder_start": holder.start_ticks, "holder_boot_id": holder.boot_id}


def _exclusive(leases: list[Lease]) -> list[Lease]:
    """The leases with no device in two of them: a later one naming a held device is dropped."""
    holding: dict[str, Lease] = {}
    kept = []
    for lease in leases:
        clash = next((holding[d] for d in lease.devices if d in holding), None)
        if clash is not None:
            log.critical(
                "lease file: reservations %s and %s both hold %s; keeping %s, dropping %s",
                clash.id,
                lease.id,
                ", ".join(d for d in lease.devices if d in clash.devices),
                clash.id,
                lease.id,
            )
            continue
        holding.update(dict.fromkeys(lease.devices, lease))
        kept.append(lease)
    return kept
