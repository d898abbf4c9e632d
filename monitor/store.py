"""The lease file: written so that a crash at any moment leaves the old file or the new one.

Each save writes a temporary file, fsyncs it, renames it over ``leases.json`` and fsyncs the
directory, so the rename itself survives a power cut. A file that cannot be read back is moved
aside, never trusted and never fatal.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

from monitor.leases import Lease

log = logging.getLogger(__name__)

FILE_NAME = "leases.json"
FORMAT_VERSION = 1


class StoreError(Exception):
    """The lease file could not be written; the message says why, for the client too."""


def write_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data``: after a crash it holds either the old or the new bytes."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class LeaseStore:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / FILE_NAME

    def save(self, leases: Iterable[Lease]) -> None:
        """Write the durable leases; ``StoreError`` if the disk refuses (read-only, full)."""
        document = {
            "version": FORMAT_VERSION,
            "leases": [lease.to_json() for lease in leases if lease.durable],
        }
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomically(self.path, json.dumps(document, indent=1).encode())
        except OSError as exc:
            raise StoreError(f"cannot write {self.path}: {exc.strerror or exc}") from None

    def load(self) -> list[Lease]:
        """The leases on disk; a file that is missing gives none, a bad one is moved aside."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            return self._set_aside(f"cannot be read ({exc.strerror or exc})")
        try:
            document = json.loads(raw)
            if not isinstance(document, dict) or document.get("version") != FORMAT_VERSION:
                raise ValueError(f"it is not a version {FORMAT_VERSION} lease file")
            entries = document.get("leases")
            if not isinstance(entries, list):
                raise ValueError("it has no list of leases")
            leases = [Lease.from_json(entry) for entry in entries]
            if len({lease.id for lease in leases}) != len(leases):
                raise ValueError("a reservation ID appears twice")
        except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            return self._set_aside(f"is corrupt ({exc})")
        return leases

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
