"""The kernel log's records and the NVIDIA driver's lines in them, by plain calls: every form the
driver prints, what is trusted, and hostile input."""

from __future__ import annotations

import pytest

from monitor.core.events import XidReported
from monitor.sources.counts import SourceCounts
from monitor.sources.kmsg import (
    MAX_TEXT,
    Lines,
    Malformed,
    Reader,
    Sighted,
    driver_text,
    parse_record,
    sighted,
)


def line(text: str) -> Sighted | None:
    plain = driver_text(text.encode())
    return sighted(plain) if plain is not None else None


@pytest.mark.parametrize(
    ("text", "found"),
    [
        (
            "NVRM: Xid (PCI:0000:3b:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off "
            "the bus.",
            Sighted("0000:3b:00", 79),
        ),
        ("NVRM: Xid (PCI:0000:cb:00): 13, pid=1234, name=python3, Graphics SM Warp Exception",
         Sighted("0000:cb:00", 13)),
        ("NVRM: Xid (0000:03:00): 14, Channel 00000001", Sighted("0000:03:00", 14)),
        ("NVRM: Xid (PCI:0001:3b:00): 119, Timeout waiting for RPC", Sighted("0001:3b:00", 119)),
        ("NVRM: GPU 0000:3b:00.0: GPU has fallen off the bus.", Sighted("0000:3b:00.0", 79, True)),
        # MIG: the driver names the GPU instance, and the compute instance where it knows it
        ("NVRM: Xid (PCI:0000:01:00 GPU-I:05): 94, pid=7194, Contained: CE User Channel (0x9).",
         Sighted("0000:01:00", 94, gpu_instance=5)),
        ("NVRM: Xid (PCI:0000:3b:00 GPU-I:09 GPU-CI:00): 13, pid=9, name=a, Graphics Exception",
         Sighted("0000:3b:00", 13, gpu_instance=9, compute_instance=0)),
        (
            r"NVRM: The NVIDIA GPU 0000:b3:00.0\x0aNVRM: (PCI ID: 10de:26b5) installed in this "
            r"system has\x0aNVRM: fallen off the bus and is not responding to commands.",
            Sighted("0000:b3:00.0", 79, True),
        ),
    ],
)  # fmt: skip
def test_the_drivers_forms(text: str, found: Sighted) -> None:
    assert line(text) == found


@pytest.mark.parametrize(
    "text",
    [
        "NVRM: GPU at PCI:0000:3b:00: GPU-0a0a0a0a-1111-2222-3333-444444444444",  # a header line
        "NVRM: GPU Board Serial Number: 1234",
        "NVRM: loading NVIDIA UNIX x86_64 Kernel Module  550.54.15",
        "NVRM: Xid (PCI:0000:3B:00): 79, upper-case hex is not what the driver prints",
        "NVRM: Xid (PCI:0000:3b:00.0): 79, a function the driver does not print",
        "NVRM: Xid (PCI:0000:3b:00): seventy-nine, GPU has fallen off the bus.",
        "NVRM: Xid (PCI:0000:3b:00) 79 without its punctuation",
        "NVRM: Xid (PCI:0000:3b:00 GPU-CI:01): 13, a compute instance without its GPU instance",
        "NVRM: Xid (PCI:0000:3b:00 GPU-I:x): 13, an instance that is no number",
        "xNVRM: Xid (PCI:0000:3b:00): 79, not at the start",
    ],
)
def test_other_driver_lines_report_nothing(text: str) -> None:
    assert line(text) is None


def test_lines_of_other_kernel_code_are_not_looked_at() -> None:
    assert driver_text(b"usb 1-1: new USB device NVRM: Xid (PCI:0000:3b:00): 79,") is None
    assert driver_text(b"EXT4-fs (sda1): \\x1b[2J mounted") is None  # not ours to judge


@pytest.mark.parametrize(
    "text",
    [
        b"NVRM: Xid (PCI:0000:3b:00): 79, \x1b[2J raw escape",  # the kernel escapes these
        b"NVRM: Xid (PCI:0000:3b:00): 79, \xff\xfe binary",
        b"NVRM: Xid (PCI:0000:3b:00): 79, \\x1b[2J an escape the kernel wrote",
        b"NVRM: Xid (PCI:0000:3b:00): 79, \\xff not UTF-8",
        b"NVRM: Xid (PCI:0000:3b:00): 79, \\x00 a NUL",
    ],
)
def test_driver_lines_that_are_not_text_are_refused(text: bytes) -> None:
    with pytest.raises(Malformed):
        driver_text(text)


def test_an_xid_out_of_range_is_refused() -> None:
    with pytest.raises(Malformed):
        line("NVRM: Xid (PCI:0000:3b:00): 99999, too big")
    with pytest.raises(Malformed):
        line("NVRM: Xid (PCI:0000:3b:00): 0, zero")


def test_records_in_the_kernels_form() -> None:
    record = parse_record(b"4,1234,5678901,-;NVRM: Xid (PCI:0000:3b:00): 79, x")
    assert (record.facility, record.level, record.seq) == (0, 4, 1234)
    assert record.text.startswith(b"NVRM: Xid")
    # a caller field after the flags (CONFIG_PRINTK_CALLER), and a continuation flag
    record = parse_record(b"14,7,8,c,caller=T123;text")
    assert (record.facility, record.level, record.seq, record.text) == (1, 6, 7, b"text")


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"NVRM: Xid (PCI:0000:3b:00): 79, no header",
        b"x,1,2,-;letters for a priority",
        b"4,1,2-;no flags field",
        b"4;1;2;-;semicolons",
        b"99999999999,1,2,-;a priority beyond ten digits",
        b"4,1,2,-;" + b"x" * (MAX_TEXT + 1),
    ],
)
def test_malformed_records_are_refused(raw: bytes) -> None:
    with pytest.raises(Malformed):
        parse_record(raw)


def test_lines_are_split_and_overlong_ones_dropped_whole() -> None:
    lines = Lines(limit=16)
    assert lines.feed(b"one\ntw") == [b"one"]
    assert lines.feed(b"o\n" + b"x" * 40) == [b"two"]
    assert lines.feed(b"y" * 40 + b"\nthree\n") == [b"three"]  # the rest of the long one goes
    assert lines.overlong == 1
    assert lines.feed(b"z" * 17 + b"\nfour\n") == [b"four"]
    assert lines.overlong == 2


def reader(trust_user: bool = False) -> tuple[Reader, SourceCounts]:
    counts = SourceCounts()
    return Reader(trust_user, counts), counts


XID_TEXT = b"NVRM: Xid (PCI:0000:3b:00): 79, pid=1, name=x, GPU has fallen off the bus."


def test_the_reader_takes_the_kernels_lines_and_userspace_ones_only_when_told() -> None:
    kernel = b"4,10,1,-;" + XID_TEXT + b"\n SUBSYSTEM=pci\n DEVICE=+pci:0000:3b:00.0\n"
    user = b"12,11,2,-;" + XID_TEXT + b"\n"
    daemon = b"28,12,3,-;" + XID_TEXT + b"\n"  # facility 3: never, whatever we trust
    take, counts = reader()
    assert take.take(kernel + user + daemon, at=5.0) == [XidReported("0000:3b:00", 79, "kmsg", 5.0)]
    assert (counts.kmsg_records, counts.kmsg_ignored) == (3, 0)
    take, counts = reader(trust_user=True)
    assert len(take.take(kernel + user + daemon, at=5.0)) == 2


def test_the_reader_counts_hostile_records_and_goes_on() -> None:
    take, counts = reader()
    hostile = [
        b"garbage without a header",
        b"4,1,2,-;NVRM: Xid (PCI:0000:3b:00): 79, \\x1b]0;title\\x07",
        b"4,1,2,-;NVRM: Xid (PCI:0000:3b:00): 79, \xc3\x28",
        b"4,1,2,-;NVRM: " + b"A" * (MAX_TEXT + 50),
        b"4,1,2,-;NVRM: Xid (PCI:0000:3b:00): 123456, x",
    ]
    events = take.take(b"\n".join(hostile) + b"\n4,2,3,-;" + XID_TEXT + b"\n", at=1.0)
    assert events == [XidReported("0000:3b:00", 79, "kmsg", 1.0)]
    assert counts.kmsg_ignored == len(hostile)


def test_a_reader_that_fell_behind_counts_what_it_missed() -> None:
    take, counts = reader()
    take.take(b"6,100,1,-;hello\n", at=1.0)
    take.fell_behind()
    take.take(b"6,142,1,-;the oldest record still kept\n", at=2.0)
    assert counts.kmsg_missed == 41
    take.take(b"6,143,1,-;next\n", at=3.0)
    assert counts.kmsg_missed == 41  # a gap is counted only after EPIPE said so
