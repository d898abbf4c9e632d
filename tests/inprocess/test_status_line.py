"""systemd's STATUS= line counts as a person says it: 1 subscriber, 2 subscribers."""

from __future__ import annotations

from monitor.daemon import app
from monitor.engine.hub import Hub


def test_one_of_a_thing_is_singular_and_any_other_count_plural() -> None:
    assert [app.counted(n, "reservation") for n in (0, 1, 2)] == [
        "0 reservations",
        "1 reservation",
        "2 reservations",
    ]
    hub = Hub()
    hub.subscribe()
    assert app.status_line(hub) == "0 devices, 0 unhealthy, 1 subscriber, 0 reservations"
