"""The NVML stand-in, driven by the real pynvml bindings in a child process.

pynvml dlopen()s libnvidia-ml.so.1 once per process, from LD_LIBRARY_PATH as it was at
process start, so each test runs a small script in a fresh interpreter with
``FakeNvml.env()``; this process never loads the library.  Scripts talk to the test over
stdin/stdout: ``step("name")`` pauses the script until the test has run its action for
that step, and the script's last stdout line is a JSON result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from monitor.sim.nvml import EVENT_DOUBLE_BIT_ECC, FakeGpu, FakeNvml, build_library

BUS_A = "0000:3b:00.0"
BUS_B = "0000:86:00.0"
UUID_A = "GPU-11111111-2222-3333-4444-555555555555"
UUID_B = "GPU-66666666-7777-8888-9999-000000000000"

# Prepended to every script: the step() handshake and the result printer.
PRELUDE = """
import json, sys, threading, time
import pynvml as n

def step(name):
    print("STEP " + name, flush=True)
    if sys.stdin.readline().strip() != "ok":
        sys.exit("test driver went away")

def done(result):
    print("RESULT " + json.dumps(result), flush=True)
"""


def two_gpus(**a_overrides: Any) -> list[FakeGpu]:
    """GPU A (index 0, with overrides) and GPU B (index 1, a smaller, different card)."""
    return [
        FakeGpu(bus_id=BUS_A, uuid=UUID_A, **a_overrides),
        FakeGpu(
            bus_id=BUS_B,
            uuid=UUID_B,
            name="NVIDIA H100 PCIe",
            memory_mib=81559,
            power_limit_mw=350000,
            max_sm_clock_mhz=1755,
            max_mem_clock_mhz=1593,
            minor=1,
            recovery_action=1,
        ),
    ]


@pytest.fixture
def fake(tmp_path: Path, nvml_lib: Path) -> FakeNvml:
    """A scenario with two H100s, the call log switched on."""
    return FakeNvml(tmp_path / "scenario", nvml_lib, two_gpus(), record_calls=True)


def run_script(
    fake: FakeNvml,
    body: str,
    steps: Mapping[str, Callable[[], None]] | None = None,
    timeout: float = 10.0,
) -> Any:
    """Run ``body`` in a child interpreter against ``fake``; return its JSON result.

    Each ``STEP name`` line runs ``steps[name]`` here before the script continues.  The child
    is killed after ``timeout`` seconds, so a stuck call fails the test instead of hanging it.
    """
    steps = steps or {}
    script = PRELUDE + textwrap.dedent(body)
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        env={**os.environ, **fake.env()},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    result: Any = None
    try:
        for line in proc.stdout:
            if line.startswith("STEP "):
                steps[line[5:].strip()]()
                proc.stdin.write("ok\n")
                proc.stdin.flush()
            elif line.startswith("RESULT "):
                result = json.loads(line[7:])
        proc.stdin.close()
        stderr = proc.stderr.read()
        returncode = proc.wait()
    finally:
        killer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert returncode == 0, f"script failed ({returncode}):\n{stderr}"
    assert result is not None, f"script printed no result:\n{stderr}"
    return result


def test_enumeration(fake: FakeNvml) -> None:
    """Count, identity, PCI ids in NVML's format, sizes, limits, clocks and versions."""
    fake.set_driver_version("560.35.03")
    result = run_script(
        fake,
        """
        n.nvmlInit()
        gpus = []
        for i in range(n.nvmlDeviceGetCount()):
            h = n.nvmlDeviceGetHandleByIndex(i)
            pci = n.nvmlDeviceGetPciInfo(h)
            fields = n.nvmlDeviceGetFieldValues(h, [n.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION])
            gpus.append({
                "index": n.nvmlDeviceGetIndex(h),
                "name": n.nvmlDeviceGetName(h),
                "uuid": n.nvmlDeviceGetUUID(h),
                "busId": pci.busId, "busIdLegacy": pci.busIdLegacy,
                "domain": pci.domain, "bus": pci.bus, "device": pci.device,
                "pciDeviceId": pci.pciDeviceId,
                "memory": n.nvmlDeviceGetMemoryInfo(h).total,
                "memory_v2": n.nvmlDeviceGetMemoryInfo(h, version=n.nvmlMemory_v2).total,
                "bar1": n.nvmlDeviceGetBAR1MemoryInfo(h).bar1Total,
                "power": n.nvmlDeviceGetPowerManagementLimit(h),
                "enforced": n.nvmlDeviceGetEnforcedPowerLimit(h),
                "sm": n.nvmlDeviceGetMaxClockInfo(h, n.NVML_CLOCK_SM),
                "mem": n.nvmlDeviceGetMaxClockInfo(h, n.NVML_CLOCK_MEM),
                "gen": n.nvmlDeviceGetMaxPcieLinkGeneration(h),
                "width": n.nvmlDeviceGetMaxPcieLinkWidth(h),
                "speed": n.nvmlDeviceGetPcieLinkMaxSpeed(h),
                "cc": list(n.nvmlDeviceGetCudaComputeCapability(h)),
                "minor": n.nvmlDeviceGetMinorNumber(h),
                "persistence": n.nvmlDeviceGetPersistenceMode(h),
                "display": n.nvmlDeviceGetDisplayMode(h),
                "mig": list(n.nvmlDeviceGetMigMode(h)),
                "events": n.nvmlDeviceGetSupportedEventTypes(h),
                "recovery": [fields[0].nvmlReturn, fields[0].value.uiVal],
            })
        by_bus = n.nvmlDeviceGetHandleByPciBusId(b"00000000:86:00.0")
        by_uuid = n.nvmlDeviceGetHandleByUUID(gpus[0]["uuid"].encode())
        done({
            "gpus": gpus,
            "driver": n.nvmlSystemGetDriverVersion(),
            "cuda": n.nvmlSystemGetCudaDriverVersion_v2(),
            "by_bus": n.nvmlDeviceGetIndex(by_bus),
            "by_uuid": n.nvmlDeviceGetIndex(by_uuid),
        })
        n.nvmlShutdown()
        """,
    )
    a, b = result["gpus"]
    assert result["driver"] == "560.35.03"
    assert result["cuda"] == 12040
    assert (result["by_bus"], result["by_uuid"]) == (1, 0)
    assert [a["index"], b["index"]] == [0, 1]
    assert (a["name"], b["name"]) == ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe")
    assert (a["uuid"], b["uuid"]) == (UUID_A, UUID_B)
    assert (a["busId"], a["busIdLegacy"]) == ("00000000:3B:00.0", "0000:3B:00.0")
    assert b["busId"] == "00000000:86:00.0"
    assert (a["domain"], a["bus"], a["device"], a["pciDeviceId"]) == (0, 0x3B, 0, 0x233010DE)
    assert a["memory"] == a["memory_v2"] == 81559 * 2**20
    assert a["bar1"] == 131072 * 2**20
    assert (a["power"], a["enforced"], b["power"]) == (700000, 700000, 350000)
    assert (a["sm"], a["mem"], b["sm"], b["mem"]) == (1980, 2619, 1755, 1593)
    assert (a["gen"], a["width"], a["speed"]) == (5, 16, 32000)
    assert a["cc"] == [9, 0]
    assert (a["minor"], b["minor"]) == (0, 1)
    assert (a["persistence"], a["display"], a["mig"]) == (1, 0, [0, 0])
    assert a["events"] == 0xFD0F
    assert (a["recovery"], b["recovery"]) == ([0, 0], [0, 1])
    calls = fake.calls()
    assert calls[0] == "nvmlInitWithFlags"
    assert "nvmlDeviceGetPciInfo_v3" in calls
    assert calls[-1] == "nvmlShutdown"


def test_live_changes_are_seen(fake: FakeNvml) -> None:
    """Rewriting gpus/driver_version is picked up by a process that is already running."""

    def upgrade() -> None:
        """Simulate a driver upgrade that also drops GPU B and lowers A's power limit."""
        fake.set_driver_version("570.86.15")
        fake.set_gpus(two_gpus(power_limit_mw=500000)[:1])

    result = run_script(
        fake,
        """
        n.nvmlInit()
        before = [n.nvmlSystemGetDriverVersion(), n.nvmlDeviceGetCount()]
        h = n.nvmlDeviceGetHandleByIndex(0)
        step("upgrade")
        done({
            "before": before,
            "after": [n.nvmlSystemGetDriverVersion(), n.nvmlDeviceGetCount()],
            "power": n.nvmlDeviceGetPowerManagementLimit(h),
        })
        """,
        steps={"upgrade": upgrade},
    )
    assert result == {"before": ["550.54.15", 2], "after": ["570.86.15", 1], "power": 500000}


def test_xid_event_and_timeout(fake: FakeNvml) -> None:
    """An appended XID reaches the set with the right device and number; quiet waits time out.

    Events appended before a device registered are not delivered, and events come out in
    the order they were appended.
    """

    def two_xids() -> None:
        """XID 79 on B (spelled as NVML spells bus ids), then XID 43 on A."""
        fake.xid("00000000:86:00.0", 79)
        fake.xid(BUS_A, 43)

    result = run_script(
        fake,
        """
        n.nvmlInit()
        a, b = n.nvmlDeviceGetHandleByIndex(0), n.nvmlDeviceGetHandleByIndex(1)
        s = n.nvmlEventSetCreate()
        step("early")
        n.nvmlDeviceRegisterEvents(a, n.nvmlEventTypeXidCriticalError, s)
        n.nvmlDeviceRegisterEvents(b, n.nvmlEventTypeXidCriticalError, s)
        t0 = time.monotonic()
        try:
            n.nvmlEventSetWait_v2(s, 200)
            quiet = "event"
        except n.NVMLError_Timeout:
            quiet = time.monotonic() - t0
        step("xid")
        e = n.nvmlEventSetWait_v2(s, 10000)
        got = {
            "uuid": n.nvmlDeviceGetUUID(e.device),
            "type": e.eventType, "data": e.eventData,
            "gi": e.gpuInstanceId, "ci": e.computeInstanceId,
        }
        e2 = n.nvmlEventSetWait(s, 1000)
        n.nvmlEventSetFree(s)
        done({"quiet": quiet, "got": got,
              "second": [n.nvmlDeviceGetUUID(e2.device), e2.eventType, e2.eventData]})
        """,
        steps={"early": lambda: fake.xid(BUS_A, 13), "xid": two_xids},
    )
    assert result["quiet"] >= 0.199  # timed out, not before its 200 ms (counted in whole ms)
    got = result["got"]
    assert (got["uuid"], got["type"], got["data"]) == (UUID_B, 0x8, 79)
    assert (got["gi"], got["ci"]) == (0xFFFFFFFF, 0xFFFFFFFF)
    assert result["second"] == [UUID_A, 0x8, 43]  # not the XID 13 sent before registering


def test_unregistered_types_are_filtered(fake: FakeNvml) -> None:
    """Only registered event types are delivered; a double-bit ECC event is one of them."""

    def xid_then_ecc() -> None:
        """An XID (not registered for), then a double-bit ECC error (registered for)."""
        fake.xid(BUS_A, 48)
        fake.event(BUS_A, EVENT_DOUBLE_BIT_ECC)

    result = run_script(
        fake,
        """
        n.nvmlInit()
        a = n.nvmlDeviceGetHandleByIndex(0)
        s = n.nvmlEventSetCreate()
        n.nvmlDeviceRegisterEvents(a, n.nvmlEventTypeDoubleBitEccError, s)
        step("events")
        e = n.nvmlEventSetWait_v2(s, 1000)
        try:
            n.nvmlEventSetWait_v2(s, 50)
            rest = "event"
        except n.NVMLError_Timeout:
            rest = "timeout"
        done({"first": [e.eventType, e.eventData], "rest": rest})
        """,
        steps={"events": xid_then_ecc},
    )
    assert result == {"first": [EVENT_DOUBLE_BIT_ECC, 0], "rest": "timeout"}


def test_lost_gpu(fake: FakeNvml) -> None:
    """A GPU marked lost fails every call with GPUIsLost; the other GPU keeps working."""
    result = run_script(
        fake,
        """
        n.nvmlInit()
        a, b = n.nvmlDeviceGetHandleByIndex(0), n.nvmlDeviceGetHandleByIndex(1)
        step("lose")
        errors = []
        for call in (
            lambda: n.nvmlDeviceGetName(a),
            lambda: n.nvmlDeviceGetPowerManagementLimit(a),
            lambda: n.nvmlDeviceGetPciInfo(a),
            lambda: n.nvmlDeviceGetHandleByIndex(0),
        ):
            try:
                call()
                errors.append(None)
            except n.NVMLError as e:
                errors.append(type(e).__name__)
        done({"errors": errors, "count": n.nvmlDeviceGetCount(),
              "b": [n.nvmlDeviceGetName(b), n.nvmlDeviceGetPowerManagementLimit(b)]})
        """,
        steps={"lose": lambda: fake.set_gpus(two_gpus(lost=True))},
    )
    assert result["errors"] == ["NVMLError_GpuIsLost"] * 4
    assert result["count"] == 2
    assert result["b"] == ["NVIDIA H100 PCIe", 350000]


def test_hang_blocks_only_the_named_gpu(fake: FakeNvml) -> None:
    """A hung call on GPU A stays blocked while B's calls and an event wait proceed."""
    fake.hang("nvmlDeviceGetPowerManagementLimit", BUS_A)
    result = run_script(
        fake,
        """
        n.nvmlInit()
        a, b = n.nvmlDeviceGetHandleByIndex(0), n.nvmlDeviceGetHandleByIndex(1)
        s = n.nvmlEventSetCreate()
        n.nvmlDeviceRegisterEvents(b, n.nvmlEventTypeXidCriticalError, s)
        out = {}
        def hung():
            out["a"] = n.nvmlDeviceGetPowerManagementLimit(a)
        t = threading.Thread(target=hung, daemon=True)
        t.start()
        time.sleep(0.5)
        blocked = t.is_alive()
        b_power = n.nvmlDeviceGetPowerManagementLimit(b)
        a_name = n.nvmlDeviceGetName(a)
        step("xid")
        e = n.nvmlEventSetWait_v2(s, 10000)
        still_blocked = t.is_alive()
        step("unhang")
        t.join(10)
        done({"blocked": blocked, "still_blocked": still_blocked,
              "b_power": b_power, "a_name": a_name, "xid": e.eventData,
              "released": not t.is_alive(), "a": out.get("a")})
        """,
        steps={"xid": lambda: fake.xid(BUS_B, 31), "unhang": fake.unhang},
    )
    assert result["blocked"] and result["still_blocked"]  # B answered while A was blocked
    assert (result["b_power"], result["a_name"], result["xid"]) == (
        350000,
        "NVIDIA H100 80GB HBM3",
        31,
    )
    assert result["released"] and result["a"] == 700000


def test_init_error(fake: FakeNvml) -> None:
    """init_error makes nvmlInit raise the matching pynvml exception class."""
    fake.fail_init(9)  # NVML_ERROR_DRIVER_NOT_LOADED
    result = run_script(
        fake,
        """
        try:
            n.nvmlInit()
            outcome = "ok"
        except n.NVMLError as e:
            outcome = type(e).__name__
        try:
            n.nvmlDeviceGetCount()
            after = "ok"
        except n.NVMLError as e:
            after = type(e).__name__
        done([outcome, after])
        """,
    )
    assert result == ["NVMLError_DriverNotLoaded", "NVMLError_Uninitialized"]


def test_register_error(tmp_path: Path, nvml_lib: Path) -> None:
    """register_error fails nvmlDeviceRegisterEvents for that GPU only."""
    fake = FakeNvml(tmp_path / "scenario", nvml_lib, two_gpus(register_error=3))
    result = run_script(
        fake,
        """
        n.nvmlInit()
        s = n.nvmlEventSetCreate()
        out = []
        for i in range(2):
            try:
                n.nvmlDeviceRegisterEvents(
                    n.nvmlDeviceGetHandleByIndex(i), n.nvmlEventTypeXidCriticalError, s)
                out.append("ok")
            except n.NVMLError as e:
                out.append(type(e).__name__)
        done(out)
        """,
    )
    assert result == ["NVMLError_NotSupported", "ok"]


def test_crash(fake: FakeNvml) -> None:
    """crash makes the named call abort the process, like a driver segfault would."""
    fake.crash("nvmlDeviceGetName")
    with pytest.raises(AssertionError, match=r"script failed \(-6\)"):
        run_script(
            fake,
            """
            n.nvmlInit()
            n.nvmlDeviceGetName(n.nvmlDeviceGetHandleByIndex(0))
            done("survived")
            """,
        )


def test_build_is_cached(nvml_lib: Path) -> None:
    """A second build with an up-to-date library does not recompile."""
    lib = nvml_lib / "libnvidia-ml.so.1"
    before = lib.stat().st_mtime_ns
    assert build_library(nvml_lib) == nvml_lib
    assert lib.stat().st_mtime_ns == before


def test_enumeration_is_fixed_at_init(fake: FakeNvml) -> None:
    """A GPU added after nvmlInit is found only after every init is shut down and NVML is
    initialised again; a nested init does not enumerate; one that left and came back is gone
    from that enumeration. The GPUs enumerated keep their live attributes."""
    third = FakeGpu(bus_id="0000:bb:00.0", uuid="GPU-bbbbbbbb-2222-3333-4444-555555555555")

    def find(name: str) -> str:
        return f"""
        try:
            found["{name}"] = n.nvmlDeviceGetUUID(n.nvmlDeviceGetHandleByPciBusId("0000:bb:00.0"))
        except n.NVMLError as e:
            found["{name}"] = type(e).__name__
        counts["{name}"] = n.nvmlDeviceGetCount()
        """

    body = f"""
        found, counts = {{}}, {{}}
        n.nvmlInit()
        a = n.nvmlDeviceGetHandleByIndex(0)
        step("add")
        {find("added")}
        power = n.nvmlDeviceGetPowerManagementLimit(a)
        n.nvmlInit()
        {find("nested")}
        n.nvmlShutdown()
        n.nvmlShutdown()
        n.nvmlInit()
        {find("fresh")}
        step("unplug")
        {find("unplugged")}
        step("replug")
        {find("replugged")}
        done({{"found": found, "counts": counts, "power": power}})
        """
    body = "\n".join(
        line.removeprefix("    ") if line.startswith("        ") else line
        for line in textwrap.dedent(body).splitlines()
    )
    result = run_script(
        fake,
        body,
        steps={
            "add": lambda: fake.set_gpus([*two_gpus(power_limit_mw=400000), third]),
            "unplug": lambda: fake.set_gpus(two_gpus()),
            "replug": lambda: fake.set_gpus([*two_gpus(), third]),
        },
    )
    assert result["found"] == {
        "added": "NVMLError_NotFound",
        "nested": "NVMLError_NotFound",
        "fresh": third.uuid,
        "unplugged": "NVMLError_NotFound",
        "replugged": "NVMLError_NotFound",
    }
    assert result["counts"] == {"added": 2, "nested": 2, "fresh": 3, "unplugged": 2, "replugged": 2}
    assert result["power"] == 400000  # an enumerated GPU's attributes stay live
