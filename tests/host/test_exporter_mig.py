"""MIG instances through ``hotplug-monitor exporter`` as Prometheus scrapes it: Debian's real
Prometheus server against the exporter and a daemon on one simulated H100 in MIG mode with the
NVML stand-in's example layout (``monitor.sim.mig``: two 1g.10gb instances and one 3g.40gb).
Each instance is a device of its own, its profile on ``hotplug_monitor_device_info`` to join
on; ``promtool`` lints the scrape."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from monitor.sim.mig import EXAMPLE_GPU_UUID, EXAMPLE_UUIDS
from tests.conftest import Daemon
from tests.host.test_prometheus import JOB, free_port, stop, tool, wait_http
from tests.waiting import wait_until

pytestmark = pytest.mark.umockdev

A = "0000:3b:00.0"
ONE, TWO, THREE = EXAMPLE_UUIDS  # 1g.10gb, 1g.10gb, 3g.40gb


@pytest.fixture
def scraped(tmp_path: Path, mig_daemon: Daemon) -> Iterator[tuple[str, Callable[[str], Any]]]:
    """The exporter's metrics URL, and an instant query of Prometheus scraping it."""
    prometheus = tool("prometheus")
    port, web = free_port(), free_port()
    exporter_log = tmp_path / "exporter.log"
    exporter = subprocess.Popen(
        [sys.executable, "-m", "monitor", "exporter", "--socket", str(mig_daemon.socket),
         "--listen", f"127.0.0.1:{port}"],
        stderr=exporter_log.open("wb"),
    )  # fmt: skip
    config = tmp_path / "prometheus.yml"
    config.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                "scrape_configs": [
                    {"job_name": JOB, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
                ],
            }
        )
    )
    prometheus_log = tmp_path / "prometheus.log"
    server = subprocess.Popen(
        [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{web}"],
        stdout=subprocess.DEVNULL, stderr=prometheus_log.open("wb"),
    )  # fmt: skip

    def query(promql: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{web}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=5) as answer:
            body = json.load(answer)
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    try:
        metrics = f"http://127.0.0.1:{port}/metrics"
        wait_http(metrics, exporter, exporter_log)
        wait_http(f"http://127.0.0.1:{web}/-/ready", server, prometheus_log)
        yield metrics, query
    finally:
        stop(server)
        assert stop(exporter) == 0, exporter_log.read_text()


def test_prometheus_sees_each_instance_with_its_profile_to_join_on(
    scraped: tuple[str, Callable[[str], Any]],
) -> None:
    metrics, query = scraped
    info = wait_until(
        lambda: (r := query("hotplug_monitor_device_info")) and len(r) == 3 and r,
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
    joined = query(
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
