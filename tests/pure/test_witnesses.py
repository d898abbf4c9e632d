"""One XID, two witnesses (NVML and the kernel log), by plain calls: which device a kernel log
line names, and which reports count."""

from __future__ import annotations

import attrs

from monitor.core.events import DeviceGone, DeviceSeen, NvmlGpuSeen, XidReported
from monitor.core.state import State
from monitor.core.transitions import HealthTransition, journal_entries
from monitor.core.witnesses import MAX_SIGHTINGS, TWIN_WINDOW, gpu_at
from tests.pure.examples import GPU, H100, H100_B, decide, device_json, run

AUDIO = attrs.evolve(H100, address="0000:3b:00.1", pci_class=0x040300, driver="snd_hda_intel")
SLOT = "0000:3b:00"  # how the driver's log lines name H100


def seen() -> State:
    state, _ = run(DeviceSeen(H100), DeviceSeen(AUDIO), DeviceSeen(H100_B), NvmlGpuSeen(GPU))
    return state


def nvml(xid: int, at: float | None, address: str = H100.address) -> XidReported:
    return XidReported(address, xid, "nvml", at)


def kmsg(xid: int, at: float, address: str = SLOT, inferred: bool = False) -> XidReported:
    return XidReported(address, xid, "kmsg", at, inferred)


def xids(state: State, address: str = H100.address) -> tuple[int, int] | None:
    return state.xids.get(address)


def test_a_kernel_log_slot_names_the_function_bound_to_nvidia() -> None:
    devices = {H100.address: H100, AUDIO.address: AUDIO}
    assert gpu_at(devices, SLOT) == H100.address
    assert gpu_at(devices, H100.address) == H100.address
    assert gpu_at(devices, "0000:3c:00") is None
    # two functions bound to nvidia: function 0 is the GPU's
    second = attrs.evolve(H100, address="0000:3b:00.2")
    assert gpu_at({**devices, second.address: second}, SLOT) == H100.address
    # two, neither function 0: which one is meant cannot be told
    third = attrs.evolve(H100, address="0000:3b:00.3")
    assert gpu_at({second.address: second, third.address: third}, SLOT) is None


def test_a_kernel_log_xid_counts_against_the_gpu_and_shows_its_source() -> None:
    state, [patch] = run(kmsg(79, 1.0), state=seen())
    assert patch is not None
    assert xids(state) == (79, 1)
    device = device_json(state, H100.address)
    assert device["attributes"]["last_xid_source"] == {"value": "kmsg"}
    assert device["healthy"] is False and "XID 79" in device["health_desc"]
    assert xids(state, AUDIO.address) is None


def test_an_xid_both_sources_report_within_the_window_counts_once() -> None:
    state, [_, twin] = run(nvml(48, 100.0), kmsg(48, 100.2), state=seen())
    assert twin is None  # nothing shown changed
    assert xids(state) == (48, 1)
    assert device_json(state, H100.address)["attributes"]["last_xid_source"] == {"value": "nvml"}
    # the kernel log first, NVML after: the same
    state, _ = run(kmsg(48, 200.0), nvml(48, 203.0), state=state)
    assert xids(state) == (48, 2)


def test_reports_further_apart_than_the_window_count_twice() -> None:
    state, _ = run(nvml(48, 100.0), kmsg(48, 100.0 + TWIN_WINDOW + 0.5), state=seen())
    assert xids(state) == (48, 2)


def test_a_burst_counts_each_xid_once_whatever_order_the_witnesses_tell_it() -> None:
    state, _ = run(
        nvml(13, 1.0), nvml(13, 1.1), kmsg(13, 1.15), kmsg(13, 1.2), nvml(13, 1.3), state=seen()
    )
    assert xids(state) == (13, 3)


def test_one_source_repeating_an_xid_is_two_xids() -> None:
    state, _ = run(kmsg(13, 1.0), kmsg(13, 1.5), state=seen())
    assert xids(state) == (13, 2)


def test_a_report_pairs_with_one_twin_of_each_other_witness_at_most() -> None:
    """NVML's XID and its kernel log line count once; the log's next line is a new XID."""
    state, _ = run(nvml(13, 1.0), kmsg(13, 1.1), kmsg(13, 1.2), state=seen())
    assert xids(state) == (13, 2)


def test_other_gpus_and_other_xids_are_not_twins() -> None:
    state, _ = run(nvml(48, 1.0), kmsg(48, 1.1, "0000:5e:00"), kmsg(94, 1.2), state=seen())
    assert xids(state) == (94, 2)
    assert xids(state, H100_B.address) == (48, 1)


def test_the_fallen_off_line_and_the_xid_79_lines_count_once() -> None:
    """The driver prints "Xid 79" and "GPU has fallen off the bus"; NVML may report it too."""
    state, _ = run(
        kmsg(79, 5.0), kmsg(79, 5.0, "0000:3b:00.0", inferred=True), nvml(79, 6.0), state=seen()
    )
    assert xids(state) == (79, 1)
    state, _ = run(kmsg(79, 50.0, inferred=True), state=state)  # alone, later: a new one
    assert xids(state) == (79, 2)


def test_a_report_without_a_time_is_counted_and_pairs_with_nothing() -> None:
    state, _ = run(nvml(48, None), kmsg(48, 0.0), state=seen())
    assert xids(state) == (48, 2)


def test_reports_for_devices_not_bound_to_nvidia_are_not_remembered() -> None:
    state, _ = run(kmsg(79, 1.0, AUDIO.address), kmsg(79, 1.0, "0000:99:00"), state=seen())
    assert state.xid_sightings == () and state.xids == {}
    state, _ = run(DeviceGone(H100.address), kmsg(79, 2.0), state=state)
    assert state.xid_sightings == () and state.xids == {}


def test_the_sightings_stay_bounded_and_old_ones_are_forgotten() -> None:
    state = seen()
    for n in range(MAX_SIGHTINGS + 20):
        state, _ = run(kmsg(1000 + n, 1.0 + n * 0.001), state=state)
    assert len(state.xid_sightings) == MAX_SIGHTINGS
    state, _ = run(kmsg(7, 100.0), state=state)
    assert [s.xid for s in state.xid_sightings] == [7]


def test_the_health_alert_names_the_source_that_saw_the_xid() -> None:
    before = seen()
    reduction = decide(before, kmsg(79, 1.0))
    [alert] = [e for e in journal_entries(before, reduction) if isinstance(e, HealthTransition)]
    assert (alert.kind, alert.xid, alert.xid_source) == ("lost", 79, "kmsg")
