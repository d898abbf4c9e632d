"""One user's burst of lease changes, by plain calls: limited per uid, summarised in the
journal, never at the cost of root's lines or the health alerts (issue 24, item 5)."""

from __future__ import annotations

import logging

from monitor.core.leases import Lease, LeaseChange
from monitor.core.transitions import HealthTransition
from monitor.outputs.leaselog import LeaseLog
from monitor.serving.limits import LeaseRate


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def lease_log() -> tuple[LeaseLog, Lines, list[float]]:
    log = logging.getLogger("test.lease_log")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.handlers = [lines := Lines()]
    now = [100.0]
    return LeaseLog(log, own_uid=999, clock=lambda: now[0]), lines, now


def change(n: int, uid: int, kind: str = "granted") -> LeaseChange:
    lease = Lease(f"lease-{n}", {"0000:3b:00.0": "nvidia/gpu/H100"}, uid, uid, 1, 1.0)
    return LeaseChange(kind, lease, lease.device_ids, f"{kind} by uid {uid}", uid)


def test_a_members_burst_is_one_line_then_one_summary_a_second() -> None:
    leases, lines, now = lease_log()
    for n in range(50):
        leases.report(change(n, 1000, "granted" if n % 2 == 0 else "released"))
    assert lines.lines == ["reservation lease-0 granted by uid 1000: 0000:3b:00.0"]
    assert leases.flush() == 101.0  # not yet due
    now[0] = 101.0
    assert leases.flush() == 102.0  # one summary, and the next window is open
    assert lines.lines[1:] == [
        "uid 1000 made 49 more lease changes (24 granted, 25 released, 49 reservations) in 1 s; "
        "the lease journal records each"
    ]
    now[0] = 102.0
    assert leases.flush() is None  # a quiet second ends the burst
    leases.report(change(60, 1000))
    assert lines.lines[-1] == "reservation lease-60 granted by uid 1000: 0000:3b:00.0"


def test_root_and_the_daemons_user_get_every_line_and_health_is_never_summarised() -> None:
    leases, lines, _ = lease_log()
    leases.report(change(0, 1000))
    for n in range(1, 6):
        leases.report(change(n, 0))
        leases.report(change(n + 10, 999))
        leases.report(change(n + 20, 1000))  # summarised
        leases.report(HealthTransition("unhealthy", "0000:3b:00.0", "nvidia", "H100", "XID 79"))
    assert sum("by uid 0" in line for line in lines.lines) == 5
    assert sum("by uid 999" in line for line in lines.lines) == 5
    assert sum("by uid 1000" in line for line in lines.lines) == 1
    assert sum("is unhealthy: XID 79" in line for line in lines.lines) == 5


def test_a_uid_may_burst_then_is_told_to_slow_down_until_its_rate_refills() -> None:
    rate = LeaseRate(rate=2.0, burst=3)
    assert [rate.refusal(1000, 0.0) for _ in range(3)] == [None, None, None]
    refused = rate.refusal(1000, 0.0)
    assert refused == (
        "Too many reservation changes from uid 1000 (at most 2 a second, 3 at once); slow down."
    )
    assert rate.refusal(1001, 0.0) is None  # another uid has its own
    assert rate.refusal(1000, 0.5) is None  # half a second: one more
    assert rate.refusal(1000, 0.5) is not None
