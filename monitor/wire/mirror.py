"""A client's copy of the daemon's snapshot, kept current from notifications, without I/O."""

from __future__ import annotations

import copy
from typing import Any

import json_merge_patch


class Gap(Exception):
    """A patch that does not follow the generation the mirror holds: resubscribe."""


class Mirror:
    """The snapshot at ``generation``, from a ``fingerprint`` or ``subscribe`` result, moved on
    by each ``fingerprint`` notification: a patch applied to its base, or a full snapshot."""

    def __init__(self, result: dict[str, Any]) -> None:
        self.generation: int = result["generation"]
        self.snapshot: dict[str, Any] = result["snapshot"]

    def apply(self, params: dict[str, Any]) -> None:
        if "snapshot" in params:
            self.snapshot = params["snapshot"]
        else:
            if params["base"] != self.generation:
                raise Gap(f"patch base {params['base']} != generation {self.generation}")
            self.snapshot = json_merge_patch.merge(copy.deepcopy(self.snapshot), params["patch"])
        self.generation = params["generation"]

    def copy(self) -> Mirror:
        return Mirror({"generation": self.generation, "snapshot": copy.deepcopy(self.snapshot)})

    def devices(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """Every device by ID, with its group key."""
        return {
            device_id: (key, device)
            for key, group in self.snapshot["groups"].items()
            for device_id, device in group["devices"].items()
        }
