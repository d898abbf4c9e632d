"""The pipe between the daemon and the NVML worker: what each side writes, one JSON line each.

To the worker, on its stdin: ``{"watch": [address, ...], "reset": [address, ...]}``, the NVIDIA
GPUs udev shows bound to ``nvidia`` and those a recovery reset (the core's ``nvml_targets`` and
``nvml_resets``); or ``{"sample": N}``, asking for the GPUs' statistics. The worker exits at the
end of its stdin, or with EXIT_NO_NVML after saying once that NVML is not there.

From the worker, on its stdout: one line per event, ``{"event": <class name>, <its fields>}``,
and for each ``{"sample": N}`` one ``{"event": "StatsSample", "seq": N, "devices": {...}}`` with
the GPUs that answered within SAMPLE_WINDOW. A GPU that NVML's enumeration (made at the
worker's nvmlInit) does not hold, or holds as lost, is ``{"event": "NotFound", ...}``: whether
a fresh enumeration may find it is the daemon's to decide (``monitor.sources.nvml_pool``).

Nothing here loads NVML: the daemon imports this module alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any, TypeGuard

import attrs

from monitor.core.events import (
    GpuConditions,
    MigLayoutSeen,
    NvmlEventReported,
    NvmlGpu,
    NvmlGpuSeen,
    NvmlReachable,
    NvmlUnreachable,
    XidReported,
)
from monitor.core.mig import MigInstance, MigLayout
from monitor.core.model import Attribute
from monitor.wire.framing import LineBuffer, LineTooLong

NvmlEvent = (
    NvmlGpuSeen
    | XidReported
    | NvmlEventReported
    | NvmlUnreachable
    | NvmlReachable
    | GpuConditions
    | MigLayoutSeen
)
Stats = dict[str, dict[str, Any]]  # stat name -> {"value", "unit"}

EXIT_NO_NVML = 3  # NVML is not there: nothing to restart
SAMPLE_WINDOW = 0.5  # how long a sample waits for the GPUs' reads (at most the deadline)


@attrs.frozen
class StatsSample:
    """The answer to ``{"sample": seq}``: each GPU that answered in time, by PCI address."""

    seq: int
    devices: dict[str, Stats]


@attrs.frozen
class NotFound:
    """NVML's handle lookup for this GPU failed with "not found" or "GPU is lost"."""

    address: str
    reason: str
    lost: bool = False


Output = NvmlEvent | StatsSample | NotFound


@attrs.frozen
class Targets:
    """The GPUs to watch now, and those of them to watch afresh (a recovery reset them)."""

    watch: set[str]
    reset: set[str]


@attrs.frozen
class SampleRequest:
    """A request for the GPUs' statistics, answered by the ``StatsSample`` of the same seq."""

    seq: int


@attrs.frozen
class MigRescan:
    """Read every watched GPU's MIG layout again (the daemon got SIGHUP)."""


Request = Targets | SampleRequest | MigRescan


# --- to the worker ---------------------------------------------------------------------------


def encode_targets(watch: Iterable[str], reset: Iterable[str]) -> bytes:
    return json.dumps({"watch": sorted(watch), "reset": sorted(reset)}).encode() + b"\n"


def encode_sample_request(seq: int) -> bytes:
    return json.dumps({"sample": seq}).encode() + b"\n"


def encode_mig_rescan() -> bytes:
    return json.dumps({"mig_rescan": True}).encode() + b"\n"


def decode_request(line: bytes) -> Request:
    """One line of the worker's input as the request it stands for; ValueError if it is none."""
    message = _loads(line)
    if isinstance(message, dict) and message.get("mig_rescan") is True:
        return MigRescan()
    if isinstance(message, dict) and "sample" in message:
        seq = message["sample"]
        if _is(seq, int):
            return SampleRequest(seq)
    elif isinstance(message, dict):
        watch, reset = message.get("watch"), message.get("reset")
        if _texts(watch) and _texts(reset):
            return Targets(set(watch), set(reset))
    raise ValueError(f"not a request to the NVML worker: {line[:200]!r}")


def _loads(line: bytes) -> Any:
    """JSON; ValueError for anything else, a nesting too deep for the parser included."""
    try:
        return json.loads(line)
    except RecursionError:
        raise ValueError(f"nested too deeply: {line[:200]!r}") from None


def _is(value: Any, *types: type) -> bool:
    """``isinstance``, where a bool is not an int, and a float is finite."""
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return isinstance(value, types)


def _texts(value: Any) -> TypeGuard[list[str]]:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


# --- from the worker -------------------------------------------------------------------------

_EVENT_TYPES: dict[str, type[NvmlEvent]] = {
    cls.__name__: cls
    for cls in (
        NvmlGpuSeen,
        XidReported,
        NvmlEventReported,
        NvmlUnreachable,
        NvmlReachable,
        GpuConditions,
    )
}
MAX_CONDITIONS = 32  # a GPU's conditions: the table has 9; more is not a worker of ours
MAX_MIG_DEVICES = 16  # a GPU's MIG devices: 7 on an A100 or H100


def _plain(value: Any) -> Any:
    """For json.dumps: a frozen mapping as a dict, an attribute as its JSON."""
    if isinstance(value, Attribute):
        return value.to_json()
    return dict(value)


def encode_event(event: Output) -> bytes:
    fields = {"event": type(event).__name__, **attrs.asdict(event, recurse=False)}
    if isinstance(event, NvmlGpuSeen):
        fields["gpu"] = attrs.asdict(event.gpu, recurse=False)
    if isinstance(event, MigLayoutSeen):
        del fields["layout"]
        fields["enabled"] = event.layout.enabled
        fields["instances"] = [attrs.asdict(i) for i in event.layout.instances]
    return json.dumps(fields, default=_plain).encode() + b"\n"


# The fields of each event the worker writes, with the types each may have.
_NONE = type(None)
_FIELDS: dict[type, dict[str, tuple[type, ...]]] = {
    # source, at and inferred are the daemon's to set (monitor.sources.nvml): taken, then replaced
    XidReported: {
        "address": (str,),
        "xid": (int,),
        "source": (str,),
        "recovery_action": (int, _NONE),
        "at": (float, _NONE),
        "inferred": (bool,),
        "gpu_instance": (int, _NONE),
        "compute_instance": (int, _NONE),
    },
    MigLayoutSeen: {"address": (str,), "enabled": (bool,), "instances": (list,)},
    MigInstance: {
        "uuid": (str,),
        "gpu_instance_id": (int,),
        "compute_instance_id": (int,),
        "gpu_slices": (int,),
        "compute_slices": (int,),
        "memory_mib": (int,),
    },
    NvmlEventReported: {"address": (str,), "kind": (str,), "action": (int, _NONE)},
    NvmlUnreachable: {"address": (str,), "reason": (str,), "lost": (bool,)},
    NvmlReachable: {"address": (str,)},
    GpuConditions: {"address": (str,)},
    NotFound: {"address": (str,), "reason": (str,), "lost": (bool,)},
    NvmlGpu: {"address": (str,), "uuid": (str,), "name": (str,), "minor": (int, _NONE)},
    Attribute: {"value": (str, int, float, bool), "unit": (str, _NONE)},
}


def _checked(cls: type, fields: Any) -> dict[str, Any]:
    """``fields`` if they are a mapping of ``cls``'s fields, each of its type; else TypeError.
    (A missing field is found by ``cls`` itself.)"""
    if not isinstance(fields, dict):
        raise TypeError(f"{cls.__name__}: not an object")
    types = _FIELDS[cls]
    for name, value in fields.items():
        if name not in types or not _is(value, *types[name]):
            raise TypeError(f"{cls.__name__}: {name!r} is not one of its fields, of its type")
    return fields


def decode_event(line: bytes) -> Output:
    """One line of the worker's output as the event it stands for; ValueError if it is none.

    The worker loads a vendor library, so what it writes is checked like any input: an event
    with a field of the wrong type would otherwise reach the reducer."""
    try:
        fields = _loads(line)
        name = fields.pop("event")
        if name == "StatsSample":
            seq, devices = fields["seq"], fields["devices"]
            if not _is(seq, int) or not isinstance(devices, dict):
                raise TypeError("malformed sample")
            return StatsSample(seq, devices)
        if name == "NotFound":
            return NotFound(**_checked(NotFound, fields))
        if name == "MigLayoutSeen":
            return _mig_layout(_checked(MigLayoutSeen, fields))
        cls = _EVENT_TYPES[name]
        if cls is GpuConditions:
            conditions = fields.pop("conditions")
            if (
                not isinstance(conditions, dict)
                or len(conditions) > MAX_CONDITIONS
                or not all(isinstance(v, str) and len(v) <= 200 for v in conditions.values())
            ):
                raise TypeError("GpuConditions: not a small object of strings")
            return GpuConditions(**_checked(cls, fields), conditions=conditions)
        if cls is NvmlGpuSeen:
            gpu = fields["gpu"]
            if not isinstance(gpu, dict):
                raise TypeError("NvmlGpu: not an object")
            attributes = gpu.pop("attributes")
            if not isinstance(attributes, dict):
                raise TypeError("NvmlGpu: its attributes are not an object")
            found = {k: Attribute(**_checked(Attribute, v)) for k, v in attributes.items()}
            return NvmlGpuSeen(NvmlGpu(**_checked(NvmlGpu, gpu), attributes=found))
        return cls(**_checked(cls, fields))
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not an NVML event: {line[:200]!r} ({exc!r})") from None


def _mig_layout(fields: dict[str, Any]) -> MigLayoutSeen:
    found = fields["instances"]
    if len(found) > MAX_MIG_DEVICES:
        raise TypeError(f"MigLayoutSeen: more than {MAX_MIG_DEVICES} MIG devices")
    instances = []
    for item in found:
        checked = _checked(MigInstance, item)
        if len(checked.get("uuid", "")) > 200:
            raise TypeError("MigInstance: its UUID is too long")
        instances.append(MigInstance(**checked))
    return MigLayoutSeen(fields["address"], MigLayout(fields["enabled"], tuple(instances)))


class OutputReader:
    """The worker's output without I/O: bytes in; each line's event or sample out, and for each
    line that is none, why. A line longer than ``limit`` is skipped to its end, with whatever
    else the same ``feed`` held, and reading goes on."""

    def __init__(self, limit: int) -> None:
        self._buffer = LineBuffer(limit)
        self._skipping = False  # to the end of an over-long line

    def feed(self, data: bytes | bytearray) -> tuple[list[Output], list[str]]:
        outputs: list[Output] = []
        errors: list[str] = []
        if self._skipping:
            end = data.find(b"\n")
            if end < 0:
                return outputs, errors
            data, self._skipping = data[end + 1 :], False
        try:
            lines = self._buffer.feed(data)
        except LineTooLong as exc:
            self._buffer.clear()
            self._skipping = not data.endswith(b"\n")
            return outputs, [f"{exc}: skipped"]
        for line in lines:
            try:
                outputs.append(decode_event(line))
            except ValueError as exc:
                errors.append(str(exc))
        return outputs, errors
