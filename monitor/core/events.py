"""Frozen input events: what the sources saw, already translated out of udev's and NVML's terms.

Sources build these at the edge and send them to the reducer; nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from monitor.core.access import Peer
from monitor.core.conditions import HealthPolicy
from monitor.core.leases import Holder
from monitor.core.mig import MigLayout, MigMinors
from monitor.core.model import Attribute, frozen_mapping, frozen_tuple
from monitor.core.replicas import SharePolicy
from monitor.core.xids import XidPolicy


@attrs.frozen
class PciFacts:
    """What the kernel and sysfs say about one PCI function at one moment."""

    address: str  # kernel form, 0000:3b:00.0
    vendor_id: int
    device_id: int
    pci_class: int  # 24 bits: base class, subclass, programming interface
    subsystem_vendor_id: int | None = None
    subsystem_device_id: int | None = None
    driver: str | None = None
    model: str | None = None  # from the hardware database, if it knows the device
    numa_node: int | None = None
    link_speed: str | None = None  # as sysfs writes it: "32.0 GT/s PCIe"
    link_width: int | None = None
    nvidia_minor: int | None = None  # N of /dev/nvidiaN, from the NVIDIA driver's proc file


@attrs.frozen
class DrmNode:
    """A DRM minor (``card1``, ``renderD129``) below a PCI function."""

    name: str
    parent: str  # PCI address
    devnode: str  # /dev/dri/card1


@attrs.frozen
class DeviceSeen:
    """A PCI function was added, bound, unbound or changed: here is all we know of it now."""

    facts: PciFacts


@attrs.frozen
class DeviceGone:
    address: str


@attrs.frozen
class DrmNodeSeen:
    node: DrmNode


@attrs.frozen
class DrmNodeGone:
    name: str


@attrs.frozen
class PciErrorReported:
    """A PCI error-recovery uevent (``ERROR_EVENT`` and/or ``DEVICE_ONLINE``)."""

    address: str
    error_event: str | None  # BEGIN_RECOVERY, SUCCESSFUL_RECOVERY, FAILED_RECOVERY
    online: bool | None


@attrs.frozen
class DrmWedged:
    """A DRM ``WEDGED=<method>`` uevent; method ``none`` means the device works again."""

    name: str
    method: str


@attrs.frozen
class Resync:
    """A full enumeration: every PCI function and DRM node the host has now."""

    devices: tuple[PciFacts, ...] = attrs.field(converter=frozen_tuple)
    drm_nodes: tuple[DrmNode, ...] = attrs.field(converter=frozen_tuple)


@attrs.frozen
class ClassFilterChanged:
    """The set of PCI class prefixes that make a device ours changed (start-up, reload)."""

    match_classes: tuple[str, ...] = attrs.field(converter=frozen_tuple)


@attrs.frozen
class NvmlGpu:
    """What NVML says of one GPU, matched to udev's device by PCI address."""

    address: str  # kernel form, 0000:3b:00.0
    uuid: str
    name: str  # NVML's, e.g. "NVIDIA H100 80GB HBM3"
    minor: int | None = None
    attributes: Mapping[str, Attribute] = attrs.field(converter=frozen_mapping, factory=dict)


@attrs.frozen
class NvmlGpuSeen:
    """NVML enumerated (or re-read, after a rebind or reset) this GPU."""

    gpu: NvmlGpu


@attrs.frozen
class XidReported:
    """An XID, from NVML's events (``source`` "nvml") or the driver's kernel log lines ("kmsg"),
    both judged alike (``monitor.core.xids.judge``).

    ``recovery_action``: the driver's, where the source reports one with the XID (XID 154's
    text in the kernel log). ``at``: when the source read it (trio's clock), so that the core
    can tell one XID seen by both sources from two; None where no time is known (never taken
    for a twin). The kernel log names a GPU by ``0000:3b:00`` (no function): the core finds the
    device. ``inferred``: the line named no XID ("fallen off the bus"), taken as XID 79.
    """

    address: str
    xid: int
    source: str = "nvml"
    at: float | None = None
    inferred: bool = False
    recovery_action: int | None = None
    # The GPU and compute instance NVML attributes it to (MIG), where it names one.
    gpu_instance: int | None = None
    compute_instance: int | None = None


@attrs.frozen
class MigLayoutSeen:
    """NVML's MIG mode and MIG devices of a GPU, read at its watch's start, after NVML said its
    MIG configuration changed, on each health sweep and on SIGHUP."""

    address: str
    layout: MigLayout


@attrs.frozen
class MigMinorsRead:
    """The driver's mig-minors file, read again (``problem``: why it could not be)."""

    minors: MigMinors


@attrs.frozen
class NvmlEventReported:
    """An NVML health event other than an XID.

    kind: ``double_bit_ecc``, ``gpu_unavailable``, or ``recovery_action`` with ``action`` being
    NVML's recovery action (``monitor.core.xids.RECOVERY_ACTIONS``: 0 none, 1 GPU reset, ...).
    """

    address: str
    kind: str
    action: int | None = None


@attrs.frozen
class NvmlUnreachable:
    """NVML calls for this GPU fail or hang; ``lost``: NVML says it fell off the bus."""

    address: str
    reason: str
    lost: bool = False


@attrs.frozen
class NvmlReachable:
    """NVML answers for this GPU again."""

    address: str


@attrs.frozen
class XidPolicyChanged:
    policy: XidPolicy


@attrs.frozen
class GpuConditions:
    """The health conditions NVML reports for a GPU now (``monitor.core.conditions``): name ->
    what was found (which links, ...; "" for nothing more). Sent by the worker when they change,
    and at each watch's first read, so that a condition gone meanwhile is not kept."""

    address: str
    conditions: Mapping[str, str] = attrs.field(converter=frozen_mapping, factory=dict)


@attrs.frozen
class HealthPolicyChanged:
    policy: HealthPolicy


@attrs.frozen
class SharePolicyChanged:
    """The sharing settings changed (start-up, reload): ``monitor.core.rules.sharing``."""

    policy: SharePolicy


@attrs.frozen
class NvmlNameWaitOver:
    """The wait for NVML to name a GPU bound to ``nvidia`` (``wait``, as the state numbered it)
    is over: it is shown under the hardware database's name."""

    address: str
    wait: int


@attrs.frozen
class NvmlAbsent:
    """NVML cannot be used on this host: nothing will name NVIDIA GPUs but the database."""


@attrs.frozen
class ReserveRequested:
    """A client asks for ``device_ids``; the lease it gets, if granted, is ``lease_id``.

    The server makes the ID (unique across restarts) and finds the holder process; the reducer
    decides. ``token`` identifies the request among the reducer's answers."""

    token: int
    peer: Peer
    device_ids: tuple[str, ...] = attrs.field(converter=frozen_tuple)
    lease_id: str
    created: float  # seconds since the epoch
    holder: Holder | None = None
    connection: int | None = None  # bind the lease to this connection
    owner: str | None = None  # a scheduler's lease (``monitor.core.rules.leasing``)
    # For CDI: only devices the CDI spec names may be leased. The vendor device nodes present
    # on disk, which the server checked (``plan.vendor_nodes``); None: not asked for CDI.
    cdi_nodes: frozenset[str] | None = None


@attrs.frozen
class ReleaseRequested:
    """A client releases a whole lease, some devices from the leases holding them, or (an
    ``owner`` alone) every lease of that owner. With an owner, its leases may be released
    whoever made them."""

    token: int
    peer: Peer
    lease_id: str | None = None
    device_ids: tuple[str, ...] = attrs.field(converter=frozen_tuple, factory=tuple)
    owner: str | None = None


@attrs.frozen
class ReconcileRequested:
    """A scheduler says which devices it still uses: its leases on every other device end."""

    token: int
    peer: Peer
    owner: str
    device_ids: tuple[str, ...] = attrs.field(converter=frozen_tuple)


@attrs.frozen
class LeaseEnded:
    """A lease's holder process exited."""

    lease_id: str


@attrs.frozen
class ConnectionClosed:
    """A client connection closed: the leases bound to it end."""

    connection: int


Request = ReserveRequested | ReleaseRequested | ReconcileRequested

Event = (
    DeviceSeen
    | DeviceGone
    | DrmNodeSeen
    | DrmNodeGone
    | PciErrorReported
    | DrmWedged
    | Resync
    | ClassFilterChanged
    | NvmlGpuSeen
    | MigLayoutSeen
    | MigMinorsRead
    | XidReported
    | NvmlEventReported
    | NvmlUnreachable
    | NvmlReachable
    | NvmlNameWaitOver
    | NvmlAbsent
    | XidPolicyChanged
    | GpuConditions
    | HealthPolicyChanged
    | SharePolicyChanged
    | Request
    | LeaseEnded
    | ConnectionClosed
)
