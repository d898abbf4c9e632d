"""The pipe between the daemon and the NVML worker, by plain calls: every event and request
goes through and comes back equal, and hostile lines are a ValueError, never anything else
(``monitor.sources.nvml_worker.pipe``)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from monitor.core.events import (
    NvmlEventReported,
    NvmlGpu,
    NvmlGpuSeen,
    NvmlReachable,
    NvmlUnreachable,
    XidReported,
)
from monitor.core.model import Attribute
from monitor.sources.nvml_worker.pipe import (
    Output,
    OutputReader,
    SampleRequest,
    StatsSample,
    Targets,
    decode_event,
    decode_request,
    encode_event,
    encode_sample_request,
    encode_targets,
)

A = "0000:3b:00.0"
GPU = NvmlGpu(
    address=A,
    uuid="GPU-a",
    name="NVIDIA H100 80GB HBM3",
    minor=5,
    attributes={"memory": Attribute(81559, "MiB"), "mig_mode": Attribute("disabled")},
)
EVENTS: list[Output] = [
    NvmlGpuSeen(GPU),
    NvmlGpuSeen(NvmlGpu(address=A, uuid="GPU-b", name="Tesla T4")),
    XidReported(A, 79),
    NvmlEventReported(A, "double_bit_ecc"),
    NvmlEventReported(A, "recovery_action", 0),
    NvmlUnreachable(A, "GPU has fallen off the bus (NVML: GPU is lost)", lost=True),
    NvmlUnreachable(A, "NVML not responding"),
    NvmlReachable(A),
    StatsSample(7, {A: {"temperature": {"value": 41, "unit": "C"}}}),
    StatsSample(8, {}),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_each_event_comes_back_as_it_was_written(event: Output) -> None:
    line = encode_event(event)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode_event(line.rstrip(b"\n")) == event


def test_requests_come_back_as_they_were_written() -> None:
    assert decode_request(encode_targets({A, "0000:5e:00.0"}, [A])) == Targets(
        {A, "0000:5e:00.0"}, {A}
    )
    assert decode_request(encode_targets([], [])) == Targets(set(), set())
    assert decode_request(encode_sample_request(12)) == SampleRequest(12)
    assert encode_targets(["b", "a"], ["b"]) == b'{"watch": ["a", "b"], "reset": ["b"]}\n'


def _line(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def _gpu(**changes: object) -> bytes:
    gpu = {"address": A, "uuid": "GPU-a", "name": "H100", "minor": 5, "attributes": {}}
    return _line(event="NvmlGpuSeen", gpu={**gpu, **changes})


GARBAGE = [
    b"",
    b"\n",
    b"\x00\x01\x02",
    b"\xff\xfe\xfd not UTF-8",
    b'{"event": "XidReported", "address": "\xff", "xid": 79}',
    b"garbage",
    b"null",
    b"42",
    b'"NvmlReachable"',
    b"[]",
    b'["event", "NvmlReachable"]',
    b"{}",
    b'{"event": "NvmlReachable"',  # truncated
    b'{"event": "NvmlGpuSeen", "gpu": {"address": "0000:3b:00.0", "uu',
    b"[" * 100_000,  # deeper than the parser goes
    b'{"a":' * 100_000,
    b'{"event": ' + b"9" * 5000 + b"}",  # more digits than Python makes an int of
    _line(event="NoSuchEvent", address=A),
    _line(event="__class__"),
    _line(event=["NvmlReachable"], address=A),
    _line(event=None),
    _line(address=A),  # no event
    _line(event="NvmlReachable"),  # missing field
    _line(event="NvmlReachable", address=A, extra=1),
    _line(event="NvmlReachable", address=7),
    _line(event="NvmlReachable", address=None),
    _line(event="XidReported", address=A, xid="79"),
    _line(event="XidReported", address=A, xid=79.5),
    _line(event="XidReported", address=A, xid=True),
    _line(event="XidReported", address=A, xid=None),
    _line(event="NvmlEventReported", address=A, kind="recovery_action", action="reset"),
    _line(event="NvmlEventReported", address=A, kind=["double_bit_ecc"]),
    _line(event="NvmlUnreachable", address=A, reason=5),
    _line(event="NvmlUnreachable", address=A, reason="lost", lost="yes"),
    _line(event="NvmlUnreachable", address=A, reason="lost", lost=1),
    _line(event="NvmlGpuSeen", gpu=None),
    _line(event="NvmlGpuSeen", gpu=[A]),
    _line(event="NvmlGpuSeen", gpu="GPU-a"),
    _line(event="NvmlGpuSeen"),
    _gpu(uuid=1),
    _gpu(name=["H100"]),
    _gpu(minor="5"),
    _gpu(minor=5.0),
    _gpu(attributes=None),
    _gpu(attributes=[1, 2]),
    _gpu(attributes={"memory": 81559}),
    _gpu(attributes={"memory": "81559 MiB"}),
    _gpu(attributes={"memory": {"unit": "MiB"}}),
    _gpu(attributes={"memory": {"value": [81559]}}),
    _gpu(attributes={"memory": {"value": {"a": 1}}}),
    _gpu(attributes={"memory": {"value": None}}),
    _gpu(attributes={"memory": {"value": 1, "unit": 2}}),
    _gpu(attributes={"memory": {"value": 1, "other": 2}}),
    _gpu(sm_count=132),
    b'{"event": "NvmlGpuSeen", "gpu": {"address": "0000:3b:00.0", "uuid": "a", "name": "b", '
    b'"attributes": {"power": {"value": NaN}}}}',
    b'{"event": "NvmlGpuSeen", "gpu": {"address": "0000:3b:00.0", "uuid": "a", "name": "b", '
    b'"attributes": {"power": {"value": -Infinity}}}}',
    b'{"event": "NvmlGpuSeen", "gpu": {"address": "0000:3b:00.0", "uuid": "a", "name": "b", '
    b'"attributes": {"power": {"value": 1e999}}}}',
    _line(event="StatsSample", seq="7", devices={}),
    _line(event="StatsSample", seq=True, devices={}),
    _line(event="StatsSample", seq=7, devices=[]),
    _line(event="StatsSample", seq=7),
]


@pytest.mark.parametrize("line", GARBAGE, ids=lambda line: repr(line[:60]))
def test_a_line_that_is_no_event_is_a_value_error(line: bytes) -> None:
    with pytest.raises(ValueError):  # and nothing else: the daemon logs it and reads on
        decode_event(line)


def test_text_is_taken_as_it_is_and_huge_numbers_as_numbers() -> None:
    """Control characters, non-ASCII and long text are the core's to show or not."""
    odd = "0000:3b:00.0\x1b[31m\u202e\x00"
    assert decode_event(_line(event="NvmlReachable", address=odd)) == NvmlReachable(odd)
    reason = "x" * 1_000_000
    assert decode_event(_line(event="NvmlUnreachable", address=A, reason=reason)) == (
        NvmlUnreachable(A, reason)
    )
    assert decode_event(_line(event="XidReported", address=A, xid=2**200)) == XidReported(A, 2**200)
    assert decode_event(_line(event="StatsSample", seq=2**70, devices={})) == StatsSample(2**70, {})


def test_a_sample_is_passed_on_as_it_came_for_the_engine_to_clean() -> None:
    devices: dict[str, Any] = {"x": "not a device", A: {"temperature": {"value": "hot"}}}
    assert decode_event(_line(event="StatsSample", seq=1, devices=devices)) == StatsSample(
        1, devices
    )


REQUEST_GARBAGE = [
    b"",
    b"\xff\xfe",
    b"garbage",
    b"null",
    b"[]",
    b'"sample"',
    b"[" * 100_000,
    b'{"sample": ' + b"9" * 5000 + b"}",
    b'{"watch": ["0000:3b:00.0"]',  # truncated
    _line(),
    _line(sample="3"),
    _line(sample=3.5),
    _line(sample=1e300),
    _line(sample=None),
    _line(sample=True),
    _line(watch=[A]),  # no reset
    _line(reset=[]),  # no watch
    _line(watch=A, reset=[]),
    _line(watch=[A, 7], reset=[]),
    _line(watch=[A], reset=[[A]]),
    _line(watch={A: 1}, reset=[]),
    _line(watch=None, reset=None),
]


@pytest.mark.parametrize("line", REQUEST_GARBAGE, ids=lambda line: repr(line[:60]))
def test_a_line_that_is_no_request_is_a_value_error(line: bytes) -> None:
    with pytest.raises(ValueError):  # and nothing else: the worker logs it and reads on
        decode_request(line)


def test_the_reader_gives_each_line_s_event_however_the_bytes_are_cut() -> None:
    written = b"".join(encode_event(e) for e in EVENTS)
    for size in (1, 7, 64, len(written)):
        reader, found = OutputReader(1 << 16), []
        for start in range(0, len(written), size):
            outputs, errors = reader.feed(written[start : start + size])
            assert errors == []
            found += outputs
        assert found == EVENTS


def test_the_reader_says_why_a_line_is_no_event_and_reads_on() -> None:
    reader = OutputReader(1 << 16)
    ok = encode_event(NvmlReachable(A))
    outputs, errors = reader.feed(b"\xff\xfe garbage\n" + ok + b"[" * 50_000 + b"\n" + ok)
    assert outputs == [NvmlReachable(A), NvmlReachable(A)]
    assert len(errors) == 2


def test_an_over_long_line_is_skipped_to_its_end_and_reading_goes_on() -> None:
    reader = OutputReader(1000)
    ok = encode_event(XidReported(A, 79))
    assert reader.feed(ok) == ([XidReported(A, 79)], [])
    outputs, errors = reader.feed(b'{"event": "NvmlUnreachable", "reason": "' + b"x" * 2000)
    assert outputs == [] and errors == ["a line is longer than 1000 bytes: skipped"]
    assert reader.feed(b"y" * 5000) == ([], [])  # still the same line
    assert reader.feed(b'yyy"}\n' + ok) == ([XidReported(A, 79)], [])
    outputs, errors = reader.feed(b"z" * 2000 + b"\n" + ok)  # ended within one feed
    assert outputs == [] and len(errors) == 1
    assert reader.feed(ok) == ([XidReported(A, 79)], [])
