"""An append-only file of records, each one on disk before ``append`` returns.

A record is one line: the CRC-32 of its payload in 8 hex digits, a space, the payload (which
holds no newline). Appending costs one write and one ``fdatasync``, against a temporary file, two
``fsync``s and a rename for rewriting a whole file. A crash in the middle of an append leaves a
torn last line, which ``decode`` tells apart from damage anywhere else: a torn record was never
acknowledged and is dropped; a damaged line before the end is corruption of that record alone.
"""

from __future__ import annotations

import contextlib
import os
import stat
import zlib
from pathlib import Path

import attrs

from monitor.outputs.files import fsync_directory

CRC_DIGITS = 8


def encode(payload: bytes) -> bytes:
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


@attrs.frozen
class Decoded:
    # Each whole line's payload in order, or None where its checksum fails (a damaged record,
    # which still stands in its place in the sequence).
    payloads: list[bytes | None]
    good: int  # bytes of whole lines from the start, sound or damaged: where appends go on
    torn: int = 0  # bytes of a torn last record after them (dropped)
    damaged: list[bytes] = attrs.Factory(list)  # the damaged lines, as they are


def decode(data: bytes) -> Decoded:
    """The sound records in a file's bytes. A damaged line before the end is one record lost,
    never the records after it: each line carries its own checksum."""
    payloads: list[bytes | None] = []
    damaged: list[bytes] = []
    offset = 0
    while offset < len(data):
        end = data.find(b"\n", offset)
        if end < 0:  # no newline: the last append never finished
            return Decoded(payloads, offset, torn=len(data) - offset, damaged=damaged)
        line = data[offset:end]
        crc, space, payload = line[:CRC_DIGITS], line[CRC_DIGITS : CRC_DIGITS + 1], line[9:]
        if space != b" " or not _is_crc(crc) or int(crc, 16) != zlib.crc32(payload):
            if end + 1 == len(data):  # the last line: torn inside, its newline came first
                return Decoded(payloads, offset, torn=len(data) - offset, damaged=damaged)
            damaged.append(line)
            payloads.append(None)
        else:
            payloads.append(payload)
        offset = end + 1
    return Decoded(payloads, offset, damaged=damaged)


def _is_crc(text: bytes) -> bool:
    return len(text) == CRC_DIGITS and all(c in b"0123456789abcdef" for c in text)


class RecordFile:
    """The record file at ``path``, appended to at ``size``, the end of its last sound record: bytes
    after it (a torn record, an append that failed) are cut off before the next append.

    The file is opened for each append and closed after, so that nothing holds it open for
    writing between changes (``mount -o remount,ro`` of the state directory still works)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size: int | None = None  # None: not yet known, so not to be appended to
        self._tail = False  # bytes past ``size`` may be there

    def start(self, size: int) -> None:
        """Append from now on after the file's first ``size`` bytes (made empty if missing)."""
        fd = self._open()
        try:
            self._tail = os.fstat(fd).st_size != size
        finally:
            os.close(fd)
        self.size = size

    def append(self, payload: bytes) -> None:
        """Write one record and wait until it is on disk; ``OSError`` if the disk refuses, and
        then nothing of it is left to be read back."""
        if self.size is None:
            raise OSError(f"{self.path}: where its records end is not known")
        line = encode(payload)
        fd = self._open()
        try:
            if self._tail:
                os.ftruncate(fd, self.size)
                self._tail = False
            written = 0
            while written < len(line):  # a short write is followed by its reason
                written += os.pwrite(fd, line[written:], self.size + written)
            os.fdatasync(fd)
        except OSError:
            self._tail = True
            with contextlib.suppress(OSError):  # else tried again before the next append
                os.ftruncate(fd, self.size)  # a record whose fdatasync failed must not stay
                self._tail = False
            raise
        finally:
            os.close(fd)
        self.size += len(line)

    def reset(self) -> None:
        """Empty it (its records are in a snapshot now)."""
        fd = self._open()
        try:
            os.ftruncate(fd, 0)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        self.size, self._tail = 0, False

    def _open(self) -> int:
        flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags)
        except FileNotFoundError:
            fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                fsync_directory(self.path.parent)  # the new name survives a power cut too
            except BaseException:
                os.close(fd)
                raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(f"{self.path} is not a regular file")
        return fd
