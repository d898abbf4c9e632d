"""The parts of reservations that need no daemon."""

from __future__ import annotations

from monitor.reservations import RecentNodeCheck, ReservationTable


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


def test_reservation_ids_are_unique_and_partial_release_keeps_the_rest() -> None:
    table = ReservationTable()
    first = table.add(["0000:1b:00.0", "0000:3b:00.0"])
    second = table.add(["0000:5b:00.0"])
    assert first.id != second.id
    assert table.release_devices(["0000:3b:00.0"]) == ["0000:3b:00.0"]
    assert len(table) == 2
    assert table.release_by_id(first.id) == ["0000:1b:00.0"]
    assert len(table) == 1
