"""``hotplug-monitor doctor`` (issue 30): one line a check, ok/warn/fail with the fix; exit 0
when nothing failed, 1 when something did; ``--json``."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import Daemon, hotplug_monitor


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed once we return: nothing answers there


def doctor(tmp: Path, sock: Path, cdi: Path, *extra: str) -> Any:
    return hotplug_monitor(
        "doctor", "--socket", str(sock), "--cdi-dir", str(cdi), "--state-dir",
        str(tmp / "state"), "--kubelet-dir", str(tmp / "kubelet"), "--nomad-plugin-dir",
        str(tmp / "nomad"), "--exporter", f"http://127.0.0.1:{closed_port()}/metrics", *extra,
    )  # fmt: skip


def by_name(done: Any) -> dict[str, dict[str, str]]:
    return {check["name"]: check for check in json.loads(done.stdout)}


def test_a_healthy_setup_is_ok_and_exits_0(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    cdi = tmp_path / "cdi"
    daemon = start_daemon("--cdi-dir", str(cdi))
    (tmp_path / "kubelet").mkdir()
    (tmp_path / "kubelet" / "hotplug-monitor-nvidia-gpu.sock").touch()
    done = doctor(tmp_path, daemon.socket, cdi, "--json")
    assert done.returncode == 0, done
    checks = by_name(done)
    for name in ("daemon", "cdi", "state", "socket", "kubelet"):
        assert checks[name]["level"] == "ok", checks[name]
    assert "version " in checks["daemon"]["what"]
    assert checks["cdi"]["what"].startswith(f"{cdi / 'hotplug-monitor.json'}: kind ")
    assert checks["nomad"]["level"] == checks["exporter"]["level"] == "warn"
    assert all(check["fix"] for check in checks.values() if check["level"] != "ok")
    text = doctor(tmp_path, daemon.socket, cdi)
    assert text.returncode == 0
    lines = text.stdout.splitlines()
    assert len(lines) == len(checks) and lines[0].startswith("ok    daemon     answers on ")


def test_a_broken_setup_fails_and_says_the_fix(tmp_path: Path) -> None:
    cdi = tmp_path / "cdi"
    cdi.mkdir()
    (cdi / "hotplug-monitor.json").write_text('{"cdiVersion": "0.6.0", "devices": [')
    done = doctor(tmp_path, tmp_path / "none.sock", cdi, "--json")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done
    checks = by_name(done)
    assert checks["daemon"]["level"] == "fail"
    assert "no daemon is running" in checks["daemon"]["what"]
    assert "systemctl start hotplug-monitor" in checks["daemon"]["fix"]
    assert checks["cdi"]["level"] == "fail" and "is not valid JSON" in checks["cdi"]["what"]
    text = doctor(tmp_path, tmp_path / "none.sock", cdi)
    assert text.returncode == 1
    assert text.stdout.startswith("fail  daemon     no daemon is running: ")
