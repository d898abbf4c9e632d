"""Compare the daemon's fingerprint with nvidia-smi on a real GPU host (run by check.sh).

Not collected by pytest: it needs NVIDIA hardware. Exit 0 when every GPU nvidia-smi lists is in
the fingerprint with the same UUID, name, memory and bus ID (a GPU in MIG mode with MIG devices:
each MIG device ``nvidia-smi -L`` lists, with its profile and GPU, and not the GPU whole), the
kernel-log reader reads /dev/kmsg (a line this check writes there reaches it; it cannot provoke
an XID), and the daemon ran its event loop for 30 s without an error; prints the daemon's CPU
time over that idle period.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

IDLE_SECONDS = int(os.environ.get("CHECK_IDLE_SECONDS", "30"))


def nvidia_smi() -> list[dict[str, str]]:
    fields = "uuid,name,memory.total,pci.bus_id,driver_version"
    out = subprocess.run(
        ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = csv.reader(io.StringIO(out), skipinitialspace=True)
    return [dict(zip(fields.split(","), row, strict=True)) for row in rows if row]


def nvidia_smi_mig() -> dict[str, list[tuple[str, str]]]:
    """Each GPU's MIG devices as ``nvidia-smi -L`` lists them: GPU UUID -> [(MIG UUID, profile)]."""
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True).stdout
    found: dict[str, list[tuple[str, str]]] = {}
    gpu = None
    for line in out.splitlines():
        if (m := re.match(r"GPU \d+: .*\(UUID: (GPU-[^)]+)\)", line)) is not None:
            gpu = m.group(1)
            found[gpu] = []
        elif (m := re.match(r"\s+MIG (\S+)\s+Device\s+\d+: \(UUID: (MIG-[^)]+)\)", line)) and gpu:
            found[gpu].append((m.group(2), m.group(1)))
    return found


def check_mig(
    gpu: dict[str, str], devices: dict[str, dict[str, Any]], mig: list[tuple[str, str]]
) -> list[str]:
    """A GPU in MIG mode with MIG devices: each is a device of the daemon's, with its profile
    and its GPU, and the GPU itself is not shown whole."""
    failures = []
    address = kernel_bus_id(gpu["pci.bus_id"])
    if address in devices:
        failures.append(f"{address} has MIG devices but is shown whole")
    for uuid, profile in mig:
        device = devices.get(uuid)
        if device is None:
            failures.append(f"MIG device {uuid} ({profile}) of {address} missing")
            continue
        values = {k: a.get("value") for k, a in device["attributes"].items()}
        seen = (
            values.get("mig_profile"),
            values.get("parent_uuid"),
            values.get("parent_pci_bus_id"),
        )
        verdict = "ok" if seen == (profile, gpu["uuid"], address) else "MISMATCH"
        print(f"check: {address} MIG {uuid}: daemon {seen!r}, nvidia-smi {profile!r} {verdict}")
        if verdict != "ok":
            failures.append(f"MIG device {uuid}: {seen!r} != {(profile, gpu['uuid'], address)!r}")
    return failures


def kernel_bus_id(smi: str) -> str:
    domain, rest = smi.lower().split(":", 1)
    return f"{int(domain, 16):04x}:{rest}"


def call(sock: Path, method: str) -> Any:
    import socket

    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(str(sock))
        conn.sendall(json.dumps({"jsonrpc": "2.0", "id": 1, "method": method}).encode() + b"\n")
        return json.loads(conn.makefile("rb").readline())["result"]


def cpu_seconds(pid: int) -> float:
    """CPU time of the daemon and its children (the NVML worker)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return own + sum(cpu_seconds(int(child)) for child in children)


def kernel_log_read(sock: Path) -> list[str]:
    """A line written to /dev/kmsg (facility user: never taken for the driver's) is read."""
    before = call(sock, "status")["kmsg_records"]
    with open("/dev/kmsg", "w") as kmsg:
        kmsg.write("<14>hotplug-monitor gpu check: a line for the kernel-log reader\n")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if call(sock, "status")["kmsg_records"] > before:
            print("check: kernel log: the daemon read the line written to /dev/kmsg ok")
            return []
        time.sleep(0.1)
    return ["the daemon did not read a line written to /dev/kmsg within 5 s"]


def main(work: Path) -> int:
    sock = work / "monitor.sock"
    log = (work / "daemon.log").open("w+")
    daemon = subprocess.Popen(
        [work / "venv/bin/hotplug-monitor", "serve", "--socket", sock, "--state-dir", work,
         "--no-cdi", "--kmsg", "/dev/kmsg", "--log-target", "stderr"],
        stderr=log,
    )  # fmt: skip
    failures: list[str] = []
    try:
        deadline = time.monotonic() + 30
        gpus = nvidia_smi()
        devices: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline:
            try:
                snapshot = call(sock, "fingerprint")["snapshot"]
            except (OSError, KeyError, ValueError):
                time.sleep(0.2)
                continue
            devices = {
                device_id: {**device, "group": group["name"]}
                for group in snapshot["groups"].values()
                for device_id, device in group["devices"].items()
            }
            if all("uuid" in d["attributes"] for d in devices.values()) and len(devices) >= len(
                gpus
            ):
                break
            time.sleep(0.2)
        print(f"check: the daemon serves {len(devices)} devices; nvidia-smi lists {len(gpus)} GPUs")
        mig = nvidia_smi_mig()
        for gpu in gpus:
            address = kernel_bus_id(gpu["pci.bus_id"])
            if mig.get(gpu["uuid"]):  # MIG mode with MIG devices: shown as them alone
                failures += check_mig(gpu, devices, mig[gpu["uuid"]])
                continue
            device = devices.get(address)
            if device is None:
                failures.append(f"{address} ({gpu['name']}) missing from the fingerprint")
                continue
            seen = {
                "uuid": device["attributes"].get("uuid", {}).get("value"),
                "name": device["group"],
                "memory.total": device["attributes"].get("memory", {}).get("value"),
                "driver_version": device["attributes"].get("driver_version", {}).get("value"),
                "healthy": device["healthy"],
            }
            expected = {
                "uuid": gpu["uuid"],
                "name": gpu["name"],
                "memory.total": int(gpu["memory.total"]),
                "driver_version": gpu["driver_version"],
                "healthy": True,
            }
            for key, value in expected.items():
                verdict = "ok" if seen[key] == value else "MISMATCH"
                print(
                    f"check: {address} {key}: daemon {seen[key]!r}, nvidia-smi {value!r} {verdict}"
                )
                if seen[key] != value:
                    failures.append(f"{address} {key}: {seen[key]!r} != {value!r}")
        failures += kernel_log_read(sock)
        start = cpu_seconds(daemon.pid)
        time.sleep(IDLE_SECONDS)
        idle = cpu_seconds(daemon.pid) - start
        if daemon.poll() is not None:
            failures.append(f"the daemon exited with status {daemon.returncode}")
        call(sock, "fingerprint")  # the loop still answers
        print(f"check: daemon and NVML worker CPU time over {IDLE_SECONDS} s idle: {idle:.2f} s")
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(10)
        except subprocess.TimeoutExpired:
            daemon.kill()
            failures.append("the daemon did not stop within 10 s of SIGTERM")
        log.seek(0)
        text = log.read()
        print("check: daemon log:\n" + text)
        bad = [line for line in text.splitlines() if line.startswith(("<0>", "<1>", "<2>", "<3>"))]
        if "reading NVIDIA XIDs from the kernel log /dev/kmsg" not in text:
            failures.append("the kernel-log reader did not start")
        if "Traceback" in text or bad:
            failures.append(f"errors in the daemon's log: {bad or 'a traceback'}")
    for failure in failures:
        print(f"check: FAIL {failure}")
    print("check: PASS" if not failures else "check: FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
