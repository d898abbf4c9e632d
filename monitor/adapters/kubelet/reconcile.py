"""Reconcile: which devices the kubelet still has given to containers, from its PodResources
answer, so that the daemon can end the leases of containers that are gone.

Pure: the List answer (either API version: the fields used are the same) in, device IDs out.
A device allocated a moment ago may not be in the kubelet's answer yet (the kubelet records an
allocation after our Allocate returns): those are kept for a grace period.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from monitor.wire.snapshot import DEVICE_ID

MAX_IDS = 65536


def in_use(answer: Any, resources: Iterable[str]) -> set[str]:
    """The device IDs of ``resources`` that some container of some pod holds."""
    ours = set(resources)
    used: set[str] = set()
    for pod in answer.pod_resources:
        for container in pod.containers:
            for devices in container.devices:
                if devices.resource_name not in ours:
                    continue
                for device_id in devices.device_ids:
                    if DEVICE_ID.fullmatch(device_id) and len(used) < MAX_IDS:
                        used.add(device_id)
    return used


def still_used(
    in_kubelet: set[str], allocated_at: Mapping[str, float], now: float, grace: float
) -> list[str]:
    """What to tell the daemon the kubelet uses: its answer, and whatever was allocated less
    than ``grace`` seconds ago."""
    recent = {d for d, at in allocated_at.items() if now - at < grace}
    return sorted(in_kubelet | recent)
