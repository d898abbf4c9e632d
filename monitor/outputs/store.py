"""The leases on disk: a snapshot, and a journal of the changes since.

Each change to the durable leases is one record appended to ``leases.journal`` and
``fdatasync``ed before anyone hears of it (``monitor.outputs.journal``). At start, and whenever
the journal outgrows ``COMPACT_AT``, the leases are written whole to ``leases.json`` (temporary
file, ``fsync``, rename, ``fsync`` of the directory: the old file or the new, whatever the moment
of a crash) and the journal is emptied. Records and snapshot are numbered, so a crash between the
two leaves records the snapshot already holds, which are skipped. A torn last record was never
answered and is dropped. What cannot be read back is copied aside and left out, and only that: a
damaged record, a lease that is not valid; the records and leases around it are kept. Never
trusted and never fatal. The writer checks each record and snapshot with the reader's own
function before it writes, so that what the daemon writes it can always read back.
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
from monitor.core.text import shown
from monitor.outputs.files import UnsafePath, read_regular_file, write_atomically
from monitor.outputs.records import RecordFile, decode, encode

log = logging.getLogger(__name__)

FILE_NAME = "leases.json"
JOURNAL_NAME = "leases.journal"
# 3: numbered, with a journal; 2: holders by start ticks and boot ID; 1: by epoch start time
FORMAT_VERSION = 3
MAX_FILE = 16 << 20
COMPACT_AT = 1 << 20  # journal bytes; or four times the snapshot, if that is more
LOST_ALL = "starting with no leases, every reservation it held is lost"
LOST_SINCE = "the reservation changes since the last snapshot are lost"
LOST_THOSE = "every other lease and change is kept"


LegacyHolder = Callable[[int, float], Holder | None]


class StoreError(Exception):
    """The leases could not be written; the message says why, for the client too."""


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


# The record reader's decoder, made once: ``json.loads`` with an argument builds one per call.
_RECORD_DECODER = json.JSONDecoder(parse_constant=_not_json)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class LeaseStore:
    def __init__(self, state_dir: Path) -> None:
        """``state_dir``: a directory ``monitor.files.secure_directory`` has checked."""
        self.path = state_dir / FILE_NAME
        self.journal = RecordFile(state_dir / JOURNAL_NAME)
        self._on_disk: dict[str, Lease] = {}  # the durable leases as snapshot and journal hold
        self._seq = 0  # changes recorded so far: the snapshot's number, then each record's
        self._snapshot_size = 0

    def save(self, leases: Iterable[Lease]) -> None:
        """Record the durable leases among ``leases``; ``StoreError`` if the disk refuses (read
        only, full), and then nothing of the change is on disk."""
        durable = {lease.id: lease for lease in leases if lease.durable}
        ended = [i for i in self._on_disk if i not in durable]
        put = [lease for i, lease in durable.items() if self._on_disk.get(i) != lease]
        if not ended and not put:
            return
        # Where its records end unknown (it could not be read), the snapshot takes over.
        size = self.journal.size
        if size is None or size >= max(COMPACT_AT, 4 * self._snapshot_size):
            self.compact(durable.values())
            return
        record = {"seq": self._seq + 1, "put": [lease.to_json() for lease in put], "end": ended}
        payload = _dumps(record)
        _unreadable(_record(payload)[1])
        try:
            self.journal.append(payload)
        except OSError as exc:
            raise StoreError(f"cannot write {self.journal.path}: {exc.strerror or exc}") from None
        self._seq += 1
        self._on_disk = durable

    def compact(self, leases: Iterable[Lease]) -> None:
        """Write the durable leases whole, and empty the journal."""
        durable = {lease.id: lease for lease in leases if lease.durable}
        seq = self._seq + 1 if durable != self._on_disk else self._seq
        document = {
            "version": FORMAT_VERSION,
            "seq": seq,
            "leases": [lease.to_json() for lease in durable.values()],
        }
        data = json.dumps(document, indent=1).encode()
        _unreadable(_snapshot(data, None)[1])
        try:
            write_atomically(self.path, data)
        except OSError as exc:
            raise StoreError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        self._seq, self._on_disk, self._snapshot_size = seq, durable, len(data)
        try:  # the change is on disk: an old journal left behind is skipped when read back
            self.journal.reset()
        except OSError as exc:
            log.warning("cannot empty %s: %s", self.journal.path, exc.strerror or exc)

    def load(self, legacy_holder: LegacyHolder) -> list[Lease]:
        """The leases on disk: the snapshot and the journal after it. Missing files give none;
        a bad one is moved aside. ``compact`` them next, so that what was read is all in one
        sound snapshot again.

        ``legacy_holder`` finds the holder a version 1 file names by PID and start time in epoch
        seconds, if it still runs (``monitor.sources.holders.from_legacy``)."""
        snapshot = self._load_snapshot(legacy_holder)
        if snapshot is None:  # set aside: the journal's changes have nothing to apply to
            leases: dict[str, Lease] = {}
            if self.journal.path.exists():
                self._set_aside(self.journal.path, "follows a snapshot set aside", LOST_ALL)
        else:
            leases, self._seq = snapshot
            leases = self._replay(leases)
        self._on_disk = {i: lease for i, lease in leases.items() if lease.durable}
        return _exclusive(list(leases.values()))

    def _load_snapshot(self, legacy_holder: LegacyHolder) -> tuple[dict[str, Lease], int] | None:
        """The snapshot's leases and number; None when it was bad and is set aside."""
        try:
            raw = read_regular_file(self.path, MAX_FILE, follow_symlinks=False)
        except FileNotFoundError:
            return {}, 0
        except UnsafePath as exc:
            self._set_aside(self.path, f"cannot be used ({exc})", LOST_ALL)
            return None
        self._snapshot_size = len(raw)
        try:
            seq, entries = _snapshot(raw, legacy_holder)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            self._set_aside(self.path, f"is corrupt ({exc})", LOST_ALL)
            return None
        leases: dict[str, Lease] = {}
        bad = []
        for entry in entries:
            if isinstance(entry, str):
                bad.append(entry)
            elif entry.id in leases:
                bad.append(f"reservation {entry.id} appears twice")
            else:
                leases[entry.id] = entry
        if bad:
            self._copy_aside(self.path, raw, f"has leases that are not valid ({'; '.join(bad)})")
        return leases, seq

    def _replay(self, leases: dict[str, Lease]) -> dict[str, Lease]:
        """The leases after the journal's records past the snapshot; the journal is then open
        to append after its last whole line.

        Records are numbered one after another, so a damaged or lying record is one number's
        change lost: the records after it still apply."""
        path = self.journal.path
        try:
            data = read_regular_file(path, MAX_FILE, follow_symlinks=False)
        except FileNotFoundError:
            data = b""
        except UnsafePath as exc:
            self._set_aside(path, f"cannot be used ({exc})", LOST_SINCE)
            data = b""
        decoded = decode(data)
        bad: list[str] = []
        bad_lines: list[bytes] = list(decoded.damaged)
        expected = self._seq + 1  # the number the next record must have
        applied = False  # whether a record past the snapshot came yet
        for number, payload in enumerate(decoded.payloads, 1):
            try:
                if payload is None:
                    raise ValueError("fails its checksum")
                seq, put, ended = _record(payload)
                if seq <= self._seq and not applied:
                    continue  # already in the snapshot: a crash came between the two
                if seq != expected and (applied or not expected < seq <= expected + len(bad)):
                    raise ValueError(f"number {seq} where {expected} was due")
            except (ValueError, RecursionError) as exc:
                bad.append(f"record {number} {exc}")
                if payload is not None:
                    bad_lines.append(encode(payload).rstrip(b"\n"))
                expected += applied
                continue
            for lease_id in ended:
                leases.pop(lease_id, None)
            for lease in put:
                if isinstance(lease, str):
                    bad.append(f"record {number}: {lease}")
                else:
                    leases[lease.id] = lease
            if any(isinstance(lease, str) for lease in put):
                bad_lines.append(encode(payload).rstrip(b"\n"))
            self._seq, expected, applied = seq, seq + 1, True
        if bad:
            aside = b"".join(line + b"\n" for line in bad_lines)
            self._copy_aside(path, aside, f"has records that are not valid ({'; '.join(bad)})")
        if decoded.torn:
            log.warning(
                "lease journal %s: dropped a torn last record (%d bytes): a change "
                "interrupted before it was answered",
                path,
                decoded.torn,
            )
        try:
            self.journal.start(decoded.good)
        except OSError as exc:
            log.error("cannot open %s: %s", path, exc.strerror or exc)
        return leases

    def _copy_aside(self, path: Path, data: bytes, problem: str) -> None:
        """Keep what could not be used for a person to look at, beside ``path``."""
        aside = _aside(path)
        try:
            write_atomically(aside, data)
            where = f"copied to {aside}"
        except OSError as exc:
            where = f"and could not be copied aside ({exc.strerror})"
        log.critical("lease file %s %s: %s; %s", path, shown(problem, 2000), where, LOST_THOSE)

    def _set_aside(self, path: Path, problem: str, lost: str) -> None:
        aside = _aside(path)
        try:
            os.replace(path, aside)
            where = f"moved to {aside}"
        except OSError as exc:
            where = f"and could not be moved aside ({exc.strerror}); it will be overwritten"
        log.critical("lease file %s %s: %s; %s", path, problem, where, lost)


def _aside(path: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return path.with_name(f"{path.name}.corrupt-{stamp}")


def _lease(entry: Any) -> Lease | str:
    """A lease read back, or what is wrong with it."""
    try:
        return Lease.from_json(entry)
    except (ValueError, RecursionError) as exc:
        return str(exc)


def _unreadable(leases: list[Lease | str]) -> None:
    """Refuse to write leases the reader would not take back (``StoreError``)."""
    bad = [entry for entry in leases if isinstance(entry, str)]
    if bad:
        raise StoreError(f"a lease would not read back from disk: {shown(bad[0])}")


def _snapshot(raw: bytes, legacy_holder: LegacyHolder | None) -> tuple[int, list[Lease | str]]:
    """A snapshot's number and its leases, each a ``Lease`` or what is wrong with it;
    ``ValueError`` when it is no lease file at all."""
    document = json.loads(raw, parse_constant=_not_json)
    if not isinstance(document, dict) or document.get("version") not in (1, 2, 3):
        raise ValueError(f"it is not a version {FORMAT_VERSION} lease file")
    entries = document.get("leases")
    if not isinstance(entries, list):
        raise ValueError("it has no list of leases")
    seq = document.get("seq", 0)
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise ValueError("its seq is not a count")
    if document["version"] == 1:
        if legacy_holder is None:
            raise ValueError("a version 1 file is read, never written")
        leases: list[Lease | str] = []
        for entry in entries:
            try:
                converted = _from_version_1(entry, legacy_holder)
            except ValueError as exc:
                leases.append(str(exc))
                continue
            if converted is not None:  # else its holder has exited
                leases.append(_lease(converted))
        return seq, leases
    return seq, [_lease(entry) for entry in entries]


def _record(payload: bytes) -> tuple[int, list[Lease | str], list[str]]:
    """A journal record's number, the leases it puts (each a ``Lease`` or what is wrong with
    it) and the reservation IDs it ends; ``ValueError`` when it is no record at all."""
    record = _RECORD_DECODER.decode(payload.decode(json.detect_encoding(payload), "surrogatepass"))
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    seq, put, ended = record.get("seq"), record.get("put"), record.get("end")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise ValueError("its seq is not a count")
    if not isinstance(put, list) or not isinstance(ended, list):
        raise ValueError("it has no lists put and end")
    if not all(isinstance(i, str) for i in ended):
        raise ValueError("end holds something but reservation IDs")
    return seq, [_lease(entry) for entry in put], ended


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
