"""MIG: a GPU in MIG mode shown as its MIG devices, each a device of its own.

What a MIG device is (``MigInstance``, as the NVML worker reads it), how NVIDIA names its
profile, which device IDs are MIG UUIDs, and what the driver's ``mig-minors`` file says. What
is shown when, and who may lease what, is ``monitor.core.rules.mig``'s; the container edits are
``monitor.core.plan``'s.

The profile is derived once, here, from the instance's slices and memory as NVML's
``nvmlDeviceGetAttributes`` gives them: ``<G>g.<N>gb`` for a GPU instance of G slices with its
whole compute, ``<C>c.<G>g.<N>gb`` for a compute instance of C of its G slices; N is the memory
in GiB rounded up, which is how NVIDIA's names come out of the memory it lists for each profile
(an H100 80GB: 9.75 GiB for 1g.10gb, 19.62 for 2g.20gb, 39.50 for 3g.40gb, 79.25 for 7g.80gb;
an A100 40GB: 4.75 for 1g.5gb, 39.25 for 7g.40gb). A "+me" (media extensions) profile differs
from its plain one only in decoders, which the attributes do not show: it is named as the plain.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import attrs

from monitor.core.model import frozen_tuple

# The form NVML gives today; the old "MIG-GPU-<uuid>/<gi>/<ci>" form is not a device ID.
MIG_UUID = re.compile(
    r"MIG-[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
MIG_TYPE = "mig"
NO_INSTANCE = 0xFFFFFFFF  # NVML's "no GPU (or compute) instance" in an event's data
MIG_MINORS_LIMIT = 1 << 20  # bytes of the mig-minors file read (the driver's is ~30 KiB for 8)
CAPS_DIR = "/dev/nvidia-caps"
_MINORS_LINE = re.compile(r"gpu(\d{1,4})/gi(\d{1,4})(?:/ci(\d{1,4}))?/access (\d{1,9})")


def _frozen(items: Mapping[Any, int]) -> Mapping[Any, int]:
    return items if isinstance(items, MappingProxyType) else MappingProxyType(dict(items))


def is_mig_uuid(value: object) -> bool:
    return isinstance(value, str) and MIG_UUID.fullmatch(value) is not None


def profile_name(gpu_slices: int, compute_slices: int, memory_mib: int) -> str:
    """NVIDIA's profile name for these slices and memory (``1g.10gb``, ``1c.2g.20gb``)."""
    gib = -(-memory_mib // 1024)  # rounded up
    name = f"{gpu_slices}g.{gib}gb"
    if 0 < compute_slices < gpu_slices:
        name = f"{compute_slices}c.{name}"
    return name


@attrs.frozen
class MigInstance:
    """One MIG device as NVML shows it: its UUID, GPU and compute instance IDs, slices and
    memory (MiB)."""

    uuid: str
    gpu_instance_id: int
    compute_instance_id: int
    gpu_slices: int
    compute_slices: int
    memory_mib: int

    @property
    def profile(self) -> str:
        return profile_name(self.gpu_slices, self.compute_slices, self.memory_mib)


@attrs.frozen
class MigLayout:
    """A GPU's MIG mode and its MIG devices now (none while the mode is off)."""

    enabled: bool
    instances: tuple[MigInstance, ...] = attrs.field(converter=frozen_tuple, default=())

    def find(self, uuid: str) -> MigInstance | None:
        return next((i for i in self.instances if i.uuid == uuid), None)


@attrs.frozen
class MigMinors:
    """The driver's capability minors: ``(gpu minor, gi)`` and ``(gpu minor, gi, ci)`` access
    entries, each the N of ``/dev/nvidia-caps/nvidia-capN``."""

    gi_access: Mapping[tuple[int, int], int] = attrs.field(converter=_frozen, factory=dict)
    ci_access: Mapping[tuple[int, int, int], int] = attrs.field(converter=_frozen, factory=dict)
    problem: str | None = None  # why the file could not be read (then both are empty)

    def nodes(self, gpu_minor: int, gi: int, ci: int) -> list[str] | None:
        """The instance's two capability nodes, or None where the file lacks either."""
        g, c = self.gi_access.get((gpu_minor, gi)), self.ci_access.get((gpu_minor, gi, ci))
        if g is None or c is None:
            return None
        return [f"{CAPS_DIR}/nvidia-cap{g}", f"{CAPS_DIR}/nvidia-cap{c}"]


def parse_mig_minors(text: str) -> MigMinors:
    """The access entries of a mig-minors file; ``config``/``monitor`` lines and anything
    malformed are skipped (the file is input like any other)."""
    gi: dict[tuple[int, int], int] = {}
    ci: dict[tuple[int, int, int], int] = {}
    for line in text.splitlines():
        found = _MINORS_LINE.fullmatch(line.strip())
        if found is None:
            continue
        gpu, g, c, minor = found.groups()
        if c is None:
            gi[(int(gpu), int(g))] = int(minor)
        else:
            ci[(int(gpu), int(g), int(c))] = int(minor)
    return MigMinors(gi, ci)
