"""The pipe between the daemon and the NVML worker: what each side writes, one JSON line each.

To the worker, on its stdin: ``{"watch": [address, ...], "reset": [address, ...]}``, the NVIDIA
GPUs udev shows bound to ``nvidia`` and those a recovery reset (the core's ``nvml_targets`` and
``nvml_resets``); or ``{"sample": N}``, asking for the GPUs' statistics. The worker exits at the
end of its stdin, or with EXIT_NO_NVML after saying once that NVML is not there.

From the worker, on its stdout: one line per event, ``{"event": <class name>, <its fields>}``,
and for each ``{"sample": N}`` one ``{"event": "StatsSample", "seq": N, "devices": {...}}`` with
the GPUs that answered within SAMPLE_WINDOW.

Nothing here loads NVML: the daemon imports this module alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import attrs

from monitor.core.events import (
    NvmlEventReported,
    NvmlGpu,
    NvmlGpuSeen,
    NvmlReachable,
    NvmlUnreachable,
    XidReported,
)
from monitor.core.model import Attribute

NvmlEvent = NvmlGpuSeen | XidReported | NvmlEventReported | NvmlUnreachable | NvmlReachable
Stats = dict[str, dict[str, Any]]  # stat name -> {"value", "unit"}

EXIT_NO_NVML = 3  # NVML is not there: nothing to restart
SAMPLE_WINDOW = 0.5  # how long a sample waits for the GPUs' reads (at most the deadline)


@attrs.frozen
class StatsSample:
    """The answer to ``{"sample": seq}``: each GPU that answered in time, by PCI address."""

    seq: int
    devices: dict[str, Stats]


Output = NvmlEvent | StatsSample


@attrs.frozen
class Targets:
    """The GPUs to watch now, and those of them to watch afresh (a recovery reset them)."""

    watch: set[str]
    reset: set[str]


@attrs.frozen
class SampleRequest:
    """A request for the GPUs' statistics, answered by the ``StatsSample`` of the same seq."""

    seq: int


Request = Targets | SampleRequest


# --- to the worker ---------------------------------------------------------------------------


def encode_targets(watch: Iterable[str], reset: Iterable[str]) -> bytes:
    return json.dumps({"watch": sorted(watch), "reset": sorted(reset)}).encode() + b"\n"


def encode_sample_request(seq: int) -> bytes:
    return json.dumps({"sample": seq}).encode() + b"\n"


def decode_request(line: bytes) -> Request:
    """One line of the worker's input as the request it stands for."""
    message = json.loads(line)
    if "sample" in message:
        return SampleRequest(int(message["sample"]))
    return Targets(set(message["watch"]), set(message["reset"]))


# --- from the worker -------------------------------------------------------------------------

_EVENT_TYPES: dict[str, type[NvmlEvent]] = {
    cls.__name__: cls
    for cls in (NvmlGpuSeen, XidReported, NvmlEventReported, NvmlUnreachable, NvmlReachable)
}


def _plain(value: Any) -> Any:
    """For json.dumps: a frozen mapping as a dict, an attribute as its JSON."""
    if isinstance(value, Attribute):
        return value.to_json()
    return dict(value)


def encode_event(event: Output) -> bytes:
    fields = {"event": type(event).__name__, **attrs.asdict(event, recurse=False)}
    if isinstance(event, NvmlGpuSeen):
        fields["gpu"] = attrs.asdict(event.gpu, recurse=False)
    return json.dumps(fields, default=_plain).encode() + b"\n"


def decode_event(line: bytes) -> Output:
    """One line of the worker's output as the event it stands for; ValueError if it is none."""
    try:
        fields = json.loads(line)
        name = fields.pop("event")
        if name == "StatsSample":
            seq, devices = fields["seq"], fields["devices"]
            if not isinstance(seq, int) or not isinstance(devices, dict):
                raise TypeError("malformed sample")
            return StatsSample(seq, devices)
        cls = _EVENT_TYPES[name]
        if cls is NvmlGpuSeen:
            gpu = fields["gpu"]
            attributes = {k: Attribute(**v) for k, v in gpu.pop("attributes").items()}
            return NvmlGpuSeen(NvmlGpu(**gpu, attributes=attributes))
        return cls(**fields)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not an NVML event: {line[:200]!r} ({exc!r})") from None
