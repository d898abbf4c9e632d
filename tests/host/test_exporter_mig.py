"""MIG instances through ``hotplug-monitor exporter`` as Prometheus scrapes it: Debian's real
Prometheus server against the exporter and a daemon on one simulated H100 in MIG mode with the
NVML stand-in's example layout (``monitor.sim.mig``: two 1g.10gb instances and one 3g.40gb).
Each instance is a device of its own, its profile on ``hotplug_monitor_device_info`` to join
on; ``promtool`` lints the scrape."""

from __future__ import annotations

import subprocess
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from monitor.sim.mig import EXAMPLE_GPU_UUID, EXAMPLE_UUIDS
from tests.conftest import Daemon
from tests.host.test_prometheus import free_port, query, scraped, tool
from tests.waiting import wait_until

pytestmark = pytest.mark.umockdev

A = "0000:3b:00.0"
ONE, TWO, THREE = EXAMPLE_UUIDS  # 1g.10gb, 1g.10gb, 3g.40gb


@pytest.fixture
def scraping(tmp_path: Path, mig_daemon: Daemon) -> Iterator[tuple[str, Callable[[str], Any]]]:
    """The exporter's metrics URL, and an instant query of Prometheus scraping it."""
    port, web = free_port(), free_port()
    with scraped(tmp_path, mig_daemon.socket, port, web, rules=[]):
        yield f"http://127.0.0.1:{port}/metrics", lambda promql: query(web, promql)


def test_prometheus_sees_each_instance_with_its_profile_to_join_on(
    scraping: tuple[str, Callable[[str], Any]],
) -> None:
    metrics, ask = scraping
    info = wait_until(
        lambda: (r := ask("hotplug_monitor_device_info")) and len(r) == 3 and r,
        30,
        lambda: "three MIG instances in Prometheus",
        0.25,
    )
    by_device = {s["metric"]["device"]: s["metric"] for s in info}
    assert set(by_device) == {ONE, TWO, THREE}
    assert [by_device[i]["mig_profile"] for i in (ONE, TWO, THREE)] == [
        "1g.10gb",
        "1g.10gb",
        "3g.40gb",
    ]
    assert all(
        m["parent_uuid"] == EXAMPLE_GPU_UUID and m["type"] == "mig" for m in info_labels(info)
    )
    # Healthy instances by profile, joined from the info metric as the exporter means it.
    joined = ask(
        "sum by (mig_profile) (hotplug_monitor_device_healthy"
        " * on (instance, job, device) group_left (mig_profile) hotplug_monitor_device_info)"
    )
    assert {s["metric"]["mig_profile"]: float(s["value"][1]) for s in joined} == {
        "1g.10gb": 2.0,
        "3g.40gb": 1.0,
    }
    with urllib.request.urlopen(metrics, timeout=5) as answer:
        scrape = answer.read()
    linted = subprocess.run(
        [tool("promtool"), "check", "metrics"], input=scrape, capture_output=True
    )
    assert linted.returncode == 0, linted.stdout + linted.stderr


def info_labels(info: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [s["metric"] for s in info]
