"""What a health condition that NVML reports means for a GPU: the policy table, beside XIDs.

The NVML worker reads a few of each GPU's health facts every ``--health-interval`` and names the
conditions it finds (the names below); this module says what each means in the one health
vocabulary (``monitor.core.health``), as ``monitor.core.xids`` does for XIDs. The verdicts
follow what NVIDIA's memory error management docs and DCGM's health watches say of them:

- a row remapping that failed: the memory cannot be repaired in place, the GPU is to be
  replaced (DCGM fails it; field diagnostics) -- unhealthy;
- a row remapping or a page retirement waiting for the next reset, uncorrectable ECC errors
  since the driver loaded (the volatile count), an NVLink that was up and is down: the GPU
  needs a reset -- no new leases, current ones kept;
- PCIe replays below the rate DCGM warns at, and clocks held down by the hardware for heat or
  a power brake: reported (metrics and the journal), the GPU stays schedulable; replays at or
  above that rate point at the link, and drain the GPU until they stop.

Recovery is evidence: a condition ends when NVML no longer reports it (the remap or the
retirement was done at a reset, the counters were reset, the link came back up).

The operator decides last, as with ``xid_ignore``/``xid_fatal``: ``health_ignore`` keeps GPUs
schedulable on a condition (still shown and counted), ``health_fatal`` drains them on one until
NVML no longer reports it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType

import attrs

from monitor.core.health import HEALTHY, NEEDS_RESET, UNHEALTHY

REPORTED = "reported"  # a condition that is shown and logged, never drains the GPU

REPLACE = "replace the GPU"
RESET = "reset the GPU"

# DCGM's limit for PCIe replays (DCGM_LIMIT_MAX_PCIREPLAY_RATE): a rate below it is noise.
PCIE_REPLAY_RATE_LIMIT = 8  # replays a minute


@attrs.frozen
class Condition:
    name: str
    meaning: str  # what it says of the GPU, in the health description
    health: str  # HEALTHY (reported), NEEDS_RESET or UNHEALTHY
    todo: str | None  # the recovery an operator performs, when not healthy


ROWS = (
    Condition("row_remap_failed", "row remapping failed", UNHEALTHY, REPLACE),
    Condition("row_remap_pending", "pending row remapping", NEEDS_RESET, RESET),
    Condition("page_retirement_pending", "pending page retirement", NEEDS_RESET, RESET),
    Condition("volatile_ecc_uncorrected", "uncorrectable ECC errors", NEEDS_RESET, RESET),
    Condition("nvlink_down", "an NVLink is down", NEEDS_RESET, RESET),
    Condition(
        "pcie_replay_storm",
        f"PCIe replays at {PCIE_REPLAY_RATE_LIMIT} a minute or more",
        NEEDS_RESET,
        "check the PCIe link, then reset the GPU",
    ),
    Condition("pcie_replays", "PCIe replays", HEALTHY, None),
    Condition("thermal_slowdown", "hardware thermal slowdown", HEALTHY, None),
    Condition("power_brake", "hardware power brake slowdown", HEALTHY, None),
)
POLICY: Mapping[str, Condition] = MappingProxyType({row.name: row for row in ROWS})
NAMES = tuple(POLICY)


def known_condition(name: str) -> str:
    """``name`` if it is a condition of the table; ValueError naming them all otherwise."""
    if name not in POLICY:
        raise ValueError(f"unknown health condition {name!r} (known: {', '.join(NAMES)})")
    return name


@attrs.frozen
class HealthPolicy:
    ignore: frozenset[str] = frozenset()  # kept schedulable, whatever the table says
    fatal: frozenset[str] = frozenset()  # drained until NVML no longer reports it


@attrs.frozen
class ConditionVerdict:
    name: str
    health: str  # HEALTHY, NEEDS_RESET or UNHEALTHY
    desc: str  # names the condition and the action
    todo: str | None
    decided_by: str  # "policy", "health_ignore" or "health_fatal"

    @property
    def label(self) -> str:
        """The verdict as the fingerprint and the exporter name it."""
        return REPORTED if self.health == HEALTHY else self.health


def judge_condition(name: str, policy: HealthPolicy, detail: str = "") -> ConditionVerdict:
    """The verdict on a condition NVML reports (``detail``: what it found, e.g. which links).
    A name the table does not hold (a newer worker's) drains the GPU, as an unknown XID does."""
    row = POLICY.get(name) or Condition(name, name.replace("_", " "), NEEDS_RESET, RESET)
    meaning = f"{row.meaning} ({detail})" if detail else row.meaning
    health, todo, by = row.health, row.todo, "policy"
    if name in policy.ignore:
        health, todo, by = HEALTHY, None, "health_ignore"
    elif name in policy.fatal and health == HEALTHY:
        health, todo, by = NEEDS_RESET, RESET, "health_fatal"
    why = "" if by == "policy" else f" ({by})"
    if health == UNHEALTHY:
        desc = f"{meaning}: {todo}{why}"  # "row remapping failed: replace the GPU"
    elif health == NEEDS_RESET:
        desc = f"GPU needs a reset: {meaning}; recovery: {todo}{why}"
    else:
        desc = f"{meaning}: reported, the GPU stays schedulable{why}"
    return ConditionVerdict(name, health, desc, todo, by)


def judge_all(conditions: Mapping[str, str], policy: HealthPolicy) -> dict[str, ConditionVerdict]:
    """Each condition's verdict, by name."""
    return {name: judge_condition(name, policy, d) for name, d in sorted(conditions.items())}


def shown(verdicts: Iterable[ConditionVerdict]) -> str:
    """The ``health_conditions`` attribute: ``name=verdict`` pairs, comma-separated, sorted."""
    return ",".join(f"{v.name}={v.label}" for v in sorted(verdicts, key=lambda v: v.name))
