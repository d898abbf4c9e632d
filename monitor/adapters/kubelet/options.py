"""The kubelet plugin's settings, and which daemon group becomes which Kubernetes resource.

| setting | flag | default |
| --- | --- | --- |
| the daemon's socket | ``--socket PATH`` | the system daemon's |
| the kubelet's plugin directory | ``--kubelet-dir DIR`` | ``/var/lib/kubelet/device-plugins`` |
| the kubelet's PodResources | ``--pod-resources-socket PATH`` | its ``/var/lib/kubelet`` one |
| a group's resource name | ``--resource GROUP=NAME`` | ``hotplug-monitor.io/VENDOR-TYPE`` |
| only the groups named | ``--only-listed`` | every group |
| devices left out | ``--ignore-device ID`` | none |
| how MIG instances are offered | ``--mig-strategy none|single|mixed`` | ``mixed`` |
| seconds between reconciles | ``--reconcile-interval S`` | 10 |
| CDI names in Allocate | ``--no-cdi`` | given when the daemon writes a CDI spec |

Resource names: each group ``VENDOR/TYPE/NAME`` of the daemon (``nvidia/gpu/NVIDIA H100 80GB
HBM3``) goes to the first ``--resource`` whose GROUP (``TYPE``, ``VENDOR/TYPE`` or
``VENDOR/TYPE/NAME``) matches it, else to ``hotplug-monitor.io/VENDOR-TYPE``
(``hotplug-monitor.io/nvidia-gpu``), so that it never clashes with NVIDIA's own plugin's
``nvidia.com/gpu`` unless the operator maps a group to that name. ``--resource GROUP=`` (empty)
leaves a group out. Pure: no I/O; every refusal is an ``OptionError`` saying which flag.

MIG instances (groups of type ``mig``, and ``mig.shared`` for their replicas) are named as
NVIDIA's own plugin's MIG strategies name them, a ``--resource`` that matches their group
winning over the strategy: ``none`` offers none of them (nor their GPUs, which the daemon does
not lease whole while they have instances); ``single`` offers them as the resource their GPU's
group (``VENDOR/gpu/GPU NAME``) maps to; ``mixed`` (the default: nothing is left out, and a pod
asks for the size it needs) offers each profile as ``hotplug-monitor.io/mig-PROFILE``
(``hotplug-monitor.io/mig-1g.10gb``; a ``+`` in a profile becomes ``.``: ``mig-1g.10gb.me``).
Whether ``single`` fits the node (one profile, no whole GPU beside) is the inventory's to say.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from monitor.wire.paths import SYSTEM_SOCKET
from monitor.wire.snapshot import PCI_ADDRESS, GroupPattern, is_ignored_device, is_mig_type

KUBELET_DIR = Path("/var/lib/kubelet/device-plugins")
POD_RESOURCES_SOCKET = Path("/var/lib/kubelet/pod-resources/kubelet.sock")
KUBELET_SOCKET_NAME = "kubelet.sock"
DOMAIN = "hotplug-monitor.io"
OWNER = "kubelet"  # the daemon lease owner of every Allocate
API_VERSION = "v1beta1"
MAX_SOCKET_PATH = 107  # sun_path, its NUL excluded
RECONCILE_RANGE = (0.1, 3600.0)
MIG_NONE, MIG_SINGLE, MIG_MIXED = "none", "single", "mixed"
MIG_STRATEGIES = (MIG_NONE, MIG_SINGLE, MIG_MIXED)

GPU_UUID = re.compile(r"(GPU|MIG)-[0-9A-Fa-f-]{8,64}")
# Kubernetes' extended resource names: a DNS subdomain prefix, a qualified name after it.
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
_PREFIX = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*")
_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")


class OptionError(ValueError):
    """A flag the plugin cannot use; the message says which and why."""


def check_resource_name(text: str) -> str:
    """``text`` if the kubelet takes it as an extended resource name, else ``OptionError``."""
    prefix, slash, name = text.partition("/")
    if not slash or len(prefix) > 253 or not _PREFIX.fullmatch(prefix) or "." not in prefix:
        raise OptionError(
            f"{text!r} is not a resource name DOMAIN/NAME with a domain of your own "
            f"(e.g. {DOMAIN}/nvidia-gpu)"
        )
    if not _NAME.fullmatch(name):
        raise OptionError(
            f"{text!r}: after the domain, up to 63 letters, digits, '-', '_' or '.', "
            "beginning and ending with a letter or digit"
        )
    if (
        prefix == "kubernetes.io"
        or prefix.endswith((".kubernetes.io", ".k8s.io"))
        or (prefix == "k8s.io")
    ):
        raise OptionError(f"{text!r}: the kubernetes.io and k8s.io domains are Kubernetes' own")
    return text


def mig_resource(profile: str, shared: bool = False) -> str | None:
    """``hotplug-monitor.io/mig-PROFILE`` (``.shared`` after it for replicas), or None if the
    profile makes no resource name."""
    name = f"mig-{profile.replace('+', '.')}{'.shared' if shared else ''}"
    try:
        return check_resource_name(f"{DOMAIN}/{name}")
    except OptionError:
        return None


def default_resource(vendor: str, type_: str) -> str | None:
    """``hotplug-monitor.io/VENDOR-TYPE`` in the characters a resource name may have, or None
    if nothing usable is left of them."""
    raw = f"{vendor}-{type_}".lower()
    name = re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9._-]+", "-", raw)).strip("-_.")[:63].strip("-_.")
    return f"{DOMAIN}/{name}" if name and _NAME.fullmatch(name) else None


@attrs.frozen
class Rule:
    pattern: GroupPattern
    resource: str | None  # None: the group is not offered

    @classmethod
    def parse(cls, text: str) -> Rule:
        group, equals, resource = text.rpartition("=")
        if not equals or not group:
            raise OptionError(
                f"--resource {text!r}: write GROUP=RESOURCE, e.g. nvidia/gpu=nvidia.com/gpu "
                "(or GROUP= to leave the group out)"
            )
        try:
            pattern = GroupPattern.parse(group)
        except ValueError as error:
            raise OptionError(f"--resource: {error}") from None
        if not resource:
            return cls(pattern, None)
        try:
            return cls(pattern, check_resource_name(resource))
        except OptionError as error:
            raise OptionError(f"--resource {text!r}: {error}") from None


@attrs.frozen
class Options:
    socket: Path = SYSTEM_SOCKET
    kubelet_dir: Path = KUBELET_DIR
    pod_resources_socket: Path = POD_RESOURCES_SOCKET
    rules: tuple[Rule, ...] = ()
    only_listed: bool = False
    ignored: frozenset[str] = frozenset()  # PCI addresses (lower case), GPU and MIG UUIDs
    reconcile_interval: float = 10.0
    cdi: bool = True
    mig_strategy: str = MIG_MIXED

    @property
    def kubelet_socket(self) -> Path:
        return self.kubelet_dir / KUBELET_SOCKET_NAME

    def resource_for(
        self, vendor: str, type_: str, name: str, mig_profile: str | None = None
    ) -> str | None:
        """The resource a group's devices are offered as, or None: not offered. A MIG group's
        devices (``mig_profile``: their profile) are named by the MIG strategy."""
        mig = is_mig_type(type_)
        if mig and (self.mig_strategy == MIG_NONE or mig_profile is None):
            return None
        for rule in self.rules:
            if rule.pattern.matches(vendor, type_, name):
                return rule.resource
        if not mig:
            return None if self.only_listed else default_resource(vendor, type_)
        assert mig_profile is not None
        shared = type_.endswith(".shared")
        if self.mig_strategy == MIG_SINGLE:  # as the GPU's own group would be
            gpu_name = name.removesuffix(f" MIG {mig_profile}")
            return self.resource_for(vendor, "gpu.shared" if shared else "gpu", gpu_name)
        return None if self.only_listed else mig_resource(mig_profile, shared)

    def ignores(self, device_id: str, device: Mapping[str, Any]) -> bool:
        """Whether ``--ignore-device`` names the device, its GPU or its GPU's PCI address."""
        return is_ignored_device(self.ignored, device_id, device)

    def endpoint(self, resource: str) -> str:
        """The file name of the plugin's socket for ``resource``, inside ``kubelet_dir``:
        ``hotplug-monitor-nvidia-gpu.sock`` for our domain's, with the domain otherwise."""
        domain, _, name = resource.partition("/")
        stem = name if domain == DOMAIN else f"{domain}_{name}"
        return f"hotplug-monitor-{re.sub(r'[^A-Za-z0-9._-]', '_', stem)}.sock"


def _absolute(flag: str, path: Path) -> Path:
    if not path.is_absolute():
        raise OptionError(f"{flag} must be an absolute path, not {str(path)!r}")
    return path


def build(
    *,
    socket: Path | None = None,
    kubelet_dir: Path | None = None,
    pod_resources_socket: Path | None = None,
    resources: Iterable[str] = (),
    only_listed: bool = False,
    ignore_devices: Iterable[str] = (),
    reconcile_interval: float = 10.0,
    cdi: bool = True,
    mig_strategy: str = MIG_MIXED,
) -> Options:
    """The options from the command line's words, each checked."""
    options = Options()
    if socket is not None:
        options = attrs.evolve(options, socket=_absolute("--socket", socket))
    if kubelet_dir is not None:
        options = attrs.evolve(options, kubelet_dir=_absolute("--kubelet-dir", kubelet_dir))
    if pod_resources_socket is not None:
        path = _absolute("--pod-resources-socket", pod_resources_socket)
        options = attrs.evolve(options, pod_resources_socket=path)
    rules = tuple(Rule.parse(text) for text in resources)
    if only_listed and not any(rule.resource for rule in rules):
        raise OptionError("--only-listed needs at least one --resource GROUP=RESOURCE")
    ignored = set()
    for device_id in ignore_devices:
        if PCI_ADDRESS.fullmatch(device_id.lower()):
            ignored.add(device_id.lower())
        elif GPU_UUID.fullmatch(device_id):
            ignored.add(device_id)
        else:
            raise OptionError(
                f"--ignore-device {device_id!r} is neither a PCI address (0000:3b:00.0) "
                "nor a GPU or MIG UUID (GPU-..., MIG-...)"
            )
    if mig_strategy not in MIG_STRATEGIES:
        raise OptionError(f"--mig-strategy {mig_strategy!r}: one of {', '.join(MIG_STRATEGIES)}")
    low, high = RECONCILE_RANGE
    if not (math.isfinite(reconcile_interval) and low <= reconcile_interval <= high):
        raise OptionError(f"--reconcile-interval must be {low:g} to {high:g} seconds")
    options = attrs.evolve(
        options,
        rules=rules,
        only_listed=only_listed,
        ignored=frozenset(ignored),
        reconcile_interval=reconcile_interval,
        cdi=cdi,
        mig_strategy=mig_strategy,
    )
    if len(str(options.kubelet_socket)) > MAX_SOCKET_PATH:
        raise OptionError(f"--kubelet-dir {str(options.kubelet_dir)!r} is too long for a socket")
    return options
