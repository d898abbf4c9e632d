"""The kernel log as a second witness of NVIDIA XIDs: the driver's lines in ``/dev/kmsg``.

The driver prints every XID there (``NVRM: Xid (PCI:0000:3b:00): 79, pid=..., name=..., GPU has
fallen off the bus.``), also when NVML calls hang, which is when XID 79 happens. Each record is
``PRI,SEQ,USEC,FLAGS[,...];TEXT`` and a newline, followed by `` KEY=VALUE`` dictionary lines;
the kernel writes every byte of TEXT that is not printable ASCII (and ``\\``) as ``\\xHH``.

Trust: PRI is facility * 8 + level. The kernel's own lines (the driver's) have facility 0, and
the kernel gives every record written to /dev/kmsg from userspace facility 1 or higher, whatever
prefix it asks for, so a kernel line cannot be forged by a process. Only facility 0 is taken,
unless ``trust_user`` also takes facility 1 (for tests, or a fleet that injects XIDs on purpose):
then any root process, or a container allowed to write /dev/kmsg, can make a GPU unhealthy.

Reading: the file is opened non-blocking and read on the trio loop when ``wait_readable`` says;
/dev/kmsg hands out one record per read. At start we seek to the end, so old XIDs are not replayed
after a restart; a FIFO (given as the path, in tests) cannot seek and is read from what comes.
A reader that falls behind the kernel's ring buffer gets EPIPE once and then the oldest record
still kept: the gap in SEQ says how many it missed, which is logged. Lines that claim to be the
driver's but are malformed, overlong, binary or full of control characters are counted and
ignored; lines of other kernel code are only counted as read.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
from pathlib import Path

import attrs
import trio

from monitor.core.events import Event, XidReported
from monitor.outputs.logs import MESSAGE_IDS
from monitor.sources.counts import Received, SourceCounts

log = logging.getLogger(__name__)

KERNEL, USER = 0, 1  # syslog facilities
# The kernel's longest record text (PRINTK_MESSAGE_MAX), and room for the header before it.
MAX_TEXT = 8192
MAX_LINE = MAX_TEXT + 128
READ_SIZE = 1 << 16  # one /dev/kmsg record, or many lines of a FIFO
BATCH_LIMIT = 64  # reads before the loop lets other tasks run

_HEADER = re.compile(rb"([0-9]{1,10}),([0-9]{1,20}),([0-9]{1,20}),[^;]{0,64};")
_PRINTABLE_ASCII = re.compile(rb"[\x20-\x7e]*")
_ESCAPE = re.compile(rb"\\x([0-9a-fA-F]{2})")
# The driver's forms of a GPU's place: domain:bus:device as it prints them (lowercase hex), and
# with the function where a line has one.
_SLOT = r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}"
_FUNCTION = _SLOT + r"\.[0-7]"
# NVRM: Xid (PCI:0000:3b:00): 79, pid=..., and the older NVRM: Xid (0000:3b:00): 79, ...; on
# a GPU in MIG mode the driver adds the instance it attributes the XID to, as
# NVRM: Xid (PCI:0000:3b:00 GPU-I:05): 94, ... or (PCI:0000:3b:00 GPU-I:01 GPU-CI:02): 13, ...
_XID = re.compile(
    rf"NVRM: Xid \((?:PCI:)?({_SLOT})(?: GPU-I:([0-9]{{1,4}})(?: GPU-CI:([0-9]{{1,4}}))?)?\): "
    r"([0-9]{1,12}),"
)
# NVRM: GPU 0000:3b:00.0: GPU has fallen off the bus.
_FALLEN = re.compile(rf"NVRM: GPU ({_FUNCTION}): GPU has fallen off the bus\.")
# NVRM: The NVIDIA GPU 0000:3b:00.0 (PCI ID: 10de:2330) installed in this system has fallen off
# the bus and is not responding to commands. (one record of several lines, each "NVRM: ")
_FALLEN_AT_PROBE = re.compile(
    rf"NVRM: The NVIDIA GPU ({_FUNCTION}) \(PCI ID: [0-9a-f]{{4}}:[0-9a-f]{{4}}\) installed in "
    r"this system has fallen off the bus"
)
FALLEN_XID = 79  # what NVIDIA's catalog calls "GPU has fallen off the bus"
XID_MESSAGE_ID = MESSAGE_IDS["xid"]


@attrs.frozen
class Record:
    facility: int
    level: int
    seq: int
    text: bytes  # as the kernel wrote it: printable ASCII, with \xHH escapes


@attrs.frozen
class Sighted:
    """An XID the driver's line reports: the GPU as the line names it, the XID, and whether the
    line named no XID (a "fallen off the bus" line, taken as XID 79); on a GPU in MIG mode, the
    GPU and compute instance the driver attributes it to, where the line names them."""

    address: str
    xid: int
    inferred: bool = False
    gpu_instance: int | None = None
    compute_instance: int | None = None


class Malformed(ValueError):
    """A line that is not a record, or a driver line we cannot take."""


def parse_record(line: bytes) -> Record:
    """One record line (without its newline); Malformed if it is not in the kernel's form."""
    header = _HEADER.match(line)
    if header is None:
        raise Malformed("not a kernel log record")
    text = line[header.end() :]
    if len(text) > MAX_TEXT:
        raise Malformed("longer than the kernel writes")
    pri, seq = int(header.group(1)), int(header.group(2))
    return Record(facility=pri >> 3, level=pri & 7, seq=seq, text=text)


def driver_text(text: bytes) -> str | None:
    """A driver line as the driver printed it (escapes undone, its lines joined), or None when
    it is not one of the NVIDIA driver's; Malformed when it claims to be one but is not text."""
    if not text.startswith(b"NVRM: "):
        return None
    if _PRINTABLE_ASCII.fullmatch(text) is None:
        raise Malformed("bytes the kernel would have escaped")
    raw = _ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), text)
    try:
        plain = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Malformed("not UTF-8 text") from None
    plain = plain.replace("\nNVRM: ", " ").replace("\n", " ")
    if not plain.isprintable():
        raise Malformed("control characters in a driver line")
    return plain


def sighted(text: str) -> Sighted | None:
    """The XID a driver line reports, if it reports one."""
    found = _XID.match(text)
    if found is not None:
        xid = int(found.group(4))
        if not 0 < xid < 1 << 16:
            raise Malformed(f"XID {xid} is out of range")
        gi, ci = (int(g) if g is not None else None for g in found.group(2, 3))
        return Sighted(found.group(1), xid, gpu_instance=gi, compute_instance=ci)
    found = _FALLEN.match(text) or _FALLEN_AT_PROBE.match(text)
    if found is not None:
        return Sighted(found.group(1), FALLEN_XID, inferred=True)
    return None


def trusted(record: Record, trust_user: bool) -> bool:
    return record.facility == KERNEL or (trust_user and record.facility == USER)


class Lines:
    """Bytes into lines of at most ``limit`` bytes: a longer one is dropped whole (and counted),
    so that a writer without newlines cannot make the buffer grow."""

    def __init__(self, limit: int = MAX_LINE) -> None:
        self.limit = limit
        self._buffer = bytearray()
        self._skipping = False  # inside an overlong line: drop up to its newline
        self.overlong = 0

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        lines = []
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                break
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if self._skipping:
                self._skipping = False
            elif len(line) > self.limit:
                self.overlong += 1
            else:
                lines.append(line)
        if len(self._buffer) > self.limit:
            if not self._skipping:
                self.overlong += 1
            self._skipping = True
            self._buffer.clear()
        return lines


def open_log(path: Path) -> int:
    """The log, opened for non-blocking reads and placed at its end. A FIFO is opened for
    writing too, so that it never reads as ended when its last writer closes it. OSError when it
    is neither a character device nor a FIFO."""
    mode = os.stat(path).st_mode
    fifo = stat.S_ISFIFO(mode)
    if not fifo and not stat.S_ISCHR(mode):
        raise OSError(errno.EINVAL, "neither /dev/kmsg nor a FIFO", str(path))
    flags = (os.O_RDWR if fifo else os.O_RDONLY) | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(path, flags)
    if not fifo:
        try:
            os.lseek(fd, 0, os.SEEK_END)  # /dev/kmsg: from the next record on
        except OSError:
            os.close(fd)
            raise
    return fd


class Reader:
    """Records into events, with the counters the ``status`` method shows."""

    def __init__(self, trust_user: bool, counts: SourceCounts) -> None:
        self.trust_user = trust_user
        self.counts = counts
        self.lines = Lines()
        self.last_seq: int | None = None
        self.behind = False  # EPIPE seen: the next record says how many were missed

    def take(self, data: bytes, at: float) -> list[Event]:
        events: list[Event] = []
        overlong = self.lines.overlong
        for line in self.lines.feed(data):
            if line.startswith(b" "):  # a dictionary line of the record before
                continue
            event = self._record(line, at)
            if event is not None:
                events.append(event)
        self.counts.kmsg_ignored += self.lines.overlong - overlong
        return events

    def _record(self, line: bytes, at: float) -> Event | None:
        self.counts.kmsg_records += 1
        try:
            record = parse_record(line)
            self._caught_up(record.seq)
            text = driver_text(record.text) if trusted(record, self.trust_user) else None
            found = sighted(text) if text is not None else None
        except Malformed as exc:
            self.counts.kmsg_ignored += 1
            log.debug("ignoring a kernel log record: %s", exc)
            return None
        if found is None:
            return None
        journal: dict[str, object] = {
            "MESSAGE_ID": XID_MESSAGE_ID,
            "PCI_BUS_ID": found.address,
            "XID": found.xid,
            "XID_SOURCE": "kmsg",
        }
        where = ""
        if found.gpu_instance is not None:  # MIG: the instance the driver attributes it to
            journal["GPU_INSTANCE_ID"] = found.gpu_instance
            where = f", GPU instance {found.gpu_instance}"
            if found.compute_instance is not None:
                journal["COMPUTE_INSTANCE_ID"] = found.compute_instance
                where += f", compute instance {found.compute_instance}"
        log.warning(
            "%s: XID %d (kernel log%s%s)",
            found.address,
            found.xid,
            ": fallen off the bus" if found.inferred else "",
            where,
            extra={"journal": journal},
        )
        return XidReported(
            found.address,
            found.xid,
            "kmsg",
            at,
            found.inferred,
            gpu_instance=found.gpu_instance,
            compute_instance=found.compute_instance,
        )

    def _caught_up(self, seq: int) -> None:
        if self.behind:
            self.behind = False
            if self.last_seq is not None and seq > self.last_seq + 1:
                missed = seq - self.last_seq - 1
                self.counts.kmsg_missed += missed
                log.warning("the kernel log overran its reader: %d records were missed", missed)
            else:
                log.warning("the kernel log overran its reader: some records were missed")
        self.last_seq = seq

    def fell_behind(self) -> None:
        self.behind = True


async def run_kmsg_source(
    send: trio.MemorySendChannel[tuple[Event, ...] | Received],
    path: Path,
    *,
    trust_user: bool = False,
    counts: SourceCounts | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Report started once placed at the end of the log, then send the XIDs its lines report.
    A log that cannot be opened is said once; the daemon carries on without it."""
    try:
        fd = open_log(path)
    except OSError as exc:
        log.warning("not reading the kernel log %s: %s", path, exc.strerror or exc)
        task_status.started()
        return
    users = " and userspace's (facility 1)" if trust_user else ""
    log.info("reading NVIDIA XIDs from the kernel log %s: the kernel's lines%s", path, users)
    reader = Reader(trust_user, counts or SourceCounts())
    try:
        task_status.started()
        while True:
            # Blocks in epoll until the log has a record: no wake-up, and no read, without one.
            await trio.lowlevel.wait_readable(fd)
            at = trio.current_time()
            events: list[Event] = []
            for _ in range(BATCH_LIMIT):
                try:
                    data = os.read(fd, READ_SIZE)
                except BlockingIOError:
                    break
                except BrokenPipeError:  # /dev/kmsg: records we had not read were overwritten
                    reader.fell_behind()
                    continue
                if not data:  # not for /dev/kmsg nor a FIFO we also hold open; never spin
                    await trio.sleep(1)
                    break
                events += reader.take(data, at)
            if events:
                await send.send(Received(tuple(events), at))
            await trio.lowlevel.checkpoint()
    finally:
        os.close(fd)
