"""Which devices Nomad's tasks on this node still use, from the local agent's HTTP API answers.

Nomad never tells a device plugin that a task ended, so the plugin asks the agent: the node's
ID from ``GET /v1/agent/self`` (``stats.client.node_id``, Nomad's ``Client.Stats``), then the
node's allocations from ``GET /v1/node/<id>/allocations`` (a list of Nomad's api
``Allocation``: ``ID``, ``NodeID``, ``ClientStatus``, and ``AllocatedResources.Tasks[task]
.Devices[*].DeviceIDs``, the IDs this plugin fingerprinted).

Pure: parsed JSON in, device IDs out. Anything not in that documented shape is
``NotNomadShape``: the caller then ends no lease, since a wrong "not in use" ends a lease a task
still holds, while a missed one only waits for the next reconcile.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from monitor.wire.snapshot import DEVICE_ID

# Nomad's node IDs are UUIDs; the ID goes into a URL path, so nothing else is let through.
NODE_ID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
# Client statuses whose tasks may hold their devices: placed and not started yet, running, and
# "unknown" (a disconnected client's allocations, which may well still run).
IN_USE = frozenset({"pending", "running", "unknown"})
MAX_IN_USE = 1024  # device IDs one reconcile may name (the daemon's limit per request)


class NotNomadShape(ValueError):
    """An answer that is not what Nomad's API documents; the message says what is wrong."""


def node_id(agent_self: Any) -> str:
    """The node's ID from ``/v1/agent/self`` (an agent without its client has none)."""
    stats = _field(agent_self, "stats", dict, "the agent's answer")
    client = stats.get("client")
    if not isinstance(client, dict):
        raise NotNomadShape("the agent reports no client (stats.client): is it a server only?")
    found = client.get("node_id")
    if not isinstance(found, str) or not NODE_ID.fullmatch(found):
        raise NotNomadShape(f"stats.client.node_id is not a node ID: {str(found)[:80]!r}")
    return found


def devices_in_use(allocations: Any, node: str) -> set[str]:
    """The device IDs of ``node``'s allocations whose tasks may still hold them."""
    if not isinstance(allocations, list):
        raise NotNomadShape(f"the allocations are not a list but {type(allocations).__name__}")
    used: set[str] = set()
    for index, allocation in enumerate(allocations):
        where = f"allocation {index}"
        if not isinstance(allocation, dict):
            raise NotNomadShape(f"{where} is not an object")
        if _field(allocation, "NodeID", str, where) != node:
            raise NotNomadShape(f"{where} belongs to another node, not {node}")
        if _field(allocation, "ClientStatus", str, where) not in IN_USE:
            continue
        used |= _device_ids(allocation.get("AllocatedResources"), where)
        if len(used) > MAX_IN_USE:
            raise NotNomadShape(f"more than {MAX_IN_USE} device IDs in use")
    return used


def _device_ids(resources: Any, where: str) -> set[str]:
    if resources is None:  # an allocation made before Nomad 0.9 has none
        return set()
    tasks = _field(resources, "Tasks", (dict, type(None)), f"{where}'s AllocatedResources")
    found: set[str] = set()
    for name, task in (tasks or {}).items():
        if task is None:
            continue
        at = f"{where}, task {str(name)[:64]!r}"
        devices = _field(task, "Devices", (list, type(None)), at)
        for device in devices or ():
            ids = _field(device, "DeviceIDs", (list, type(None)), f"{at}'s device")
            for device_id in ids or ():
                if not isinstance(device_id, str):
                    raise NotNomadShape(f"{at} has a device ID that is not a string")
                if DEVICE_ID.fullmatch(device_id):  # any other is no device of ours
                    found.add(device_id)
    return found


def _field(container: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(container, Mapping):
        raise NotNomadShape(f"{where} is not an object")
    value = container.get(key)
    if not isinstance(value, kind):
        raise NotNomadShape(f"{where} has no {key} of the documented type")
    return value
