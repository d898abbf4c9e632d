"""A reserve for CDI (``"cdi": true``): devices the CDI spec does not name are refused before
any lease is granted, so that none flickers through watch, the journal or the exporter."""

from __future__ import annotations

from monitor.core.answers import Grant, Reason, Refusal
from monitor.core.events import DeviceSeen, DrmNodeSeen, NvmlGpuSeen
from monitor.core.plan import NVIDIA_CONTROL_NODES, vendor_nodes
from monitor.serving import requests
from monitor.serving.requests import Ask, Asked
from monitor.wire import requests as calls
from tests.pure.examples import CARD, GPU, H100, H100_B, MEMBER, decide, reserve, run


def test_cdi_is_a_boolean_param_and_the_edges_node_check_reaches_the_core() -> None:
    asked_for = calls.reserve([H100.address], cdi=True)
    assert asked_for.params == {"device_ids": [H100.address], "cdi": True}
    call = requests.parse(asked_for.method, asked_for.params)
    assert isinstance(call, Ask) and call.cdi
    nodes = frozenset({"/dev/nvidiactl"})
    request = call.request(Asked(MEMBER, 7, 11, "abc-12", 1.5, cdi_nodes=nodes))
    assert request.cdi_nodes == nodes  # type: ignore[union-attr]
    plain = requests.parse("reserve", {"device_ids": [H100.address], "cdi": False})
    assert isinstance(plain, Ask) and not plain.cdi
    bad: object
    for bad in ("yes", 1, [], {}):
        refused = requests.parse("reserve", {"device_ids": [H100.address], "cdi": bad})
        assert refused == Refusal(Reason.INVALID, "cdi must be true or false when given.")
    assert "cdi" not in calls.reserve([H100.address]).params


def test_the_nodes_the_edge_checks_are_every_vendor_node_a_plan_may_list() -> None:
    assert vendor_nodes([0, 5]) == [
        "/dev/nvidia0",
        "/dev/nvidia5",
        *NVIDIA_CONTROL_NODES,
        "/dev/kfd",
    ]


def test_a_device_with_nothing_to_inject_is_refused_before_any_lease() -> None:
    state, _ = run(DeviceSeen(H100), DeviceSeen(H100_B), DrmNodeSeen(CARD))
    # H100_B has no DRM node, and no NVIDIA node is on disk: no CDI entry names it
    request = reserve(H100.address, H100_B.address, cdi_nodes=frozenset())
    reduction = decide(state, request)
    refused = reduction.answers[request.token]
    assert refused == Refusal(
        Reason.INVALID,
        f"{H100_B.address} has nothing a container engine could be given (no device nodes), "
        "so no CDI device names it.",
        {"device_ids": [H100_B.address]},
    )
    assert reduction.state.leases == {} and reduction.lease_changes == ()
    assert reduction.patch is None
    assert reduction.state == state  # nothing changed: nothing for consumers to see
    # the device nodes on disk name it after all
    present = frozenset({"/dev/nvidiactl"})
    granted = decide(state, reserve(H100.address, H100_B.address, cdi_nodes=present))
    assert isinstance(next(iter(granted.answers.values())), Grant)
    # its own /dev/nvidiaN, known once NVML names the GPU, counts too
    named, _ = run(NvmlGpuSeen(GPU), state=state)
    alone = reserve(H100.address, cdi_nodes=frozenset({"/dev/nvidia5"}))
    assert isinstance(decide(named, alone).answers[alone.token], Grant)
    # without "cdi", the same devices are leased, as before
    plain = reserve(H100.address, H100_B.address)
    assert isinstance(decide(state, plain).answers[plain.token], Grant)
