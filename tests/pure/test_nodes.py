"""The parts of reservations that need no daemon."""

from __future__ import annotations

from monitor.serving.nodes import RecentNodeCheck


def test_node_checks_are_remembered_for_a_second_then_asked_again() -> None:
    asked: list[str] = []
    present = {"/dev/nvidiactl"}
    now = [100.0]

    def check(path: str) -> bool:
        asked.append(path)
        return path in present

    exists = RecentNodeCheck(check=check, clock=lambda: now[0], seconds=1.0)
    assert exists("/dev/nvidiactl") and not exists("/dev/nvidia-uvm")
    present.add("/dev/nvidia-uvm")  # the driver makes it now
    now[0] += 0.5
    assert not exists("/dev/nvidia-uvm")  # still the answer from half a second ago
    now[0] += 0.5
    assert exists("/dev/nvidia-uvm")  # asked again after a second
    assert asked == ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm"]
