"""The request table, by plain calls: every method's params refused or turned into what the
core is asked, and answers and refusals in the protocol's terms."""

from __future__ import annotations

from typing import Any

import pytest

from monitor.core.answers import Grant, Reason, Refusal, Released
from monitor.core.events import (
    DeviceGone,
    DeviceSeen,
    NvmlGpuSeen,
    ReconcileRequested,
    ReleaseRequested,
    ReserveRequested,
)
from monitor.core.leases import MAX_DEVICES
from monitor.serving import requests
from monitor.serving.requests import Ask, Asked, Read, StreamStats
from monitor.wire import errors
from monitor.wire import requests as calls
from monitor.wire.reservations import cdi_name
from tests.pure.examples import (
    GPU,
    GROUP,
    H100,
    H100_B,
    HOLDER,
    MEMBER,
    decide,
    reserve,
    run,
)

ASKED = Asked(peer=MEMBER, connection=7, token=11, lease_id="abc-12", created=1.5)
ID = H100.address
MAX_IDS = [f"0000:00:00.{i}" for i in range(MAX_DEVICES)]

DEVICE_IDS = "device_ids must be a non-empty list of device ID strings (at most 1024)."
IN_USE = "device_ids must be a list of the device IDs in use (at most 1024)."
OWNER = "owner must be a scheduler's name: 1 to 64 of a-z, 0-9, '.', '_' and '-'."
INTERVAL = "interval must be a number of seconds from 1 to 3600."
HOLDER_PID = "holder_pid must be a positive process ID."
BIND = 'bind must be "connection" when given.'
RELEASE = (
    'release takes "device_ids" (a list) or "reservation_id", optionally with "owner"; '
    'or "owner" alone, for all its leases.'
)


def refused(method: str, params: dict[str, Any]) -> str:
    """The message of an invalid-params refusal (-32602)."""
    answer = requests.parse(method, params)
    assert isinstance(answer, Refusal), answer
    assert answer.reason is Reason.INVALID and answer.data is None
    assert requests.rpc_error(answer).code == errors.INVALID_PARAMS
    return answer.message


def asked(method: str, params: dict[str, Any], edge: Asked = ASKED) -> object:
    """The core request a valid call makes, with the edge's facts."""
    call = requests.parse(method, params)
    assert isinstance(call, Ask), call
    return call.request(edge)


def test_an_unknown_method_is_not_found() -> None:
    for method in ("frobnicate", "", "Fingerprint", "__class__"):
        answer = requests.parse(method, {})
        assert answer == Refusal(Reason.UNKNOWN_METHOD, f"Unknown method {method!r}.")
        assert requests.rpc_error(answer).code == errors.METHOD_NOT_FOUND


@pytest.mark.parametrize(
    ("method", "read"),
    [
        ("fingerprint", Read.SNAPSHOT),
        ("subscribe", Read.SUBSCRIBE),
        ("leases", Read.LEASES),
        ("status", Read.STATUS),
    ],
)
def test_methods_without_params_refuse_any_and_say_what_they_read(method: str, read: Read) -> None:
    assert requests.parse(method, {}) is read
    assert refused(method, {"x": 1}) == "Unknown params: x."
    assert refused(method, {"zeta": None, "alpha": []}) == "Unknown params: alpha, zeta."
    assert refused(method, {"device_ids": [ID]}) == "Unknown params: device_ids."


def test_stats_takes_an_interval_from_one_second_to_an_hour() -> None:
    assert requests.parse(*astuple(calls.stats(1))) == StreamStats(1.0)
    assert requests.parse("stats", {"interval": 3600}) == StreamStats(3600.0)
    assert requests.parse("stats", {"interval": 2.5}) == StreamStats(2.5)
    for bad in ({}, {"interval": None}, {"interval": "5"}, {"interval": True}):
        assert refused("stats", bad) == INTERVAL
    for out_of_bounds in (0, 0.999, 3600.5, -1, float("nan"), float("inf")):
        assert refused("stats", {"interval": out_of_bounds}) == INTERVAL
    assert refused("stats", {"interval": 5, "every": 5}) == "Unknown params: every."


def astuple(call: calls.Call) -> tuple[str, dict[str, Any]]:
    return call.method, call.params


def test_a_reserve_becomes_the_cores_request_with_the_edges_facts() -> None:
    assert asked(*astuple(calls.reserve([ID, GPU.uuid]))) == ReserveRequested(
        token=11, peer=MEMBER, device_ids=(ID, GPU.uuid), lease_id="abc-12", created=1.5
    )
    everything = calls.reserve([ID], holder_pid=4000, bind="connection", owner="nomad")
    call = requests.parse(*astuple(everything))
    assert isinstance(call, Ask) and call.holder_pid == 4000  # the edge identifies it first
    with_holder = Asked(MEMBER, 7, 11, "abc-12", 1.5, holder=HOLDER)
    assert call.request(with_holder) == ReserveRequested(
        11, MEMBER, (ID,), "abc-12", 1.5, holder=HOLDER, connection=7, owner="nomad"
    )
    # null is "not given"
    unbound = asked("reserve", {"device_ids": [ID], "bind": None, "owner": None})
    assert isinstance(unbound, ReserveRequested)
    assert (unbound.connection, unbound.owner, unbound.holder) == (None, None, None)
    most = asked("reserve", {"device_ids": MAX_IDS})
    assert isinstance(most, ReserveRequested) and most.device_ids == tuple(MAX_IDS)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, DEVICE_IDS),
        ({"device_ids": None}, DEVICE_IDS),
        ({"device_ids": ID}, DEVICE_IDS),
        ({"device_ids": []}, DEVICE_IDS),
        ({"device_ids": [1]}, DEVICE_IDS),
        ({"device_ids": [ID, ""]}, DEVICE_IDS),
        ({"device_ids": {ID: 1}}, DEVICE_IDS),
        ({"device_ids": [*MAX_IDS, ID]}, DEVICE_IDS),
        ({"device_ids": [ID], "bind": "socket"}, BIND),
        ({"device_ids": [ID], "bind": True}, BIND),
        ({"device_ids": [ID], "bind": 0}, BIND),
        ({"device_ids": [ID], "owner": "Nomad!"}, OWNER),
        ({"device_ids": [ID], "owner": ""}, OWNER),
        ({"device_ids": [ID], "owner": "a" * 65}, OWNER),
        ({"device_ids": [ID], "owner": 7}, OWNER),
        ({"device_ids": [ID], "holder_pid": 0}, HOLDER_PID),
        ({"device_ids": [ID], "holder_pid": -4}, HOLDER_PID),
        ({"device_ids": [ID], "holder_pid": True}, HOLDER_PID),
        ({"device_ids": [ID], "holder_pid": "4000"}, HOLDER_PID),
        ({"device_ids": [ID], "holder_pid": 4000.0}, HOLDER_PID),
        ({"device_ids": [ID], "lease": "x", "ttl": 3}, "Unknown params: lease, ttl."),
        # checked in order: unknown params, device_ids, bind, owner, holder_pid
        ({"device_ids": [], "x": 1}, "Unknown params: x."),
        ({"device_ids": [], "bind": "no"}, DEVICE_IDS),
        ({"device_ids": [ID], "bind": "no", "owner": "NO"}, BIND),
        ({"device_ids": [ID], "owner": "NO", "holder_pid": 0}, OWNER),
    ],
)
def test_a_reserve_is_refused_for_each_bad_param(params: dict[str, Any], message: str) -> None:
    assert refused("reserve", params) == message


def test_an_owner_name_is_one_to_64_of_lowercase_digits_dot_dash_underscore() -> None:
    for name in ("nomad", "kubelet", "a", "a" * 64, "team-1.gpu_pool"):
        request = asked("reserve", {"device_ids": [ID], "owner": name})
        assert isinstance(request, ReserveRequested) and request.owner == name
    for name in ("Nomad", "a b", "nomad/1", "é"):
        assert refused("reserve", {"device_ids": [ID], "owner": name}) == OWNER


def test_a_release_by_reservation_by_devices_or_by_owner_alone() -> None:
    assert asked(*astuple(calls.release(reservation_id="abc-1"))) == ReleaseRequested(
        11, MEMBER, lease_id="abc-1"
    )
    assert asked(*astuple(calls.release([ID], owner="nomad"))) == ReleaseRequested(
        11, MEMBER, device_ids=(ID,), owner="nomad"
    )
    assert asked(*astuple(calls.release(reservation_id="r", owner="k8s"))) == ReleaseRequested(
        11, MEMBER, lease_id="r", owner="k8s"
    )
    assert asked(*astuple(calls.release(owner="nomad"))) == ReleaseRequested(
        11, MEMBER, owner="nomad"
    )


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, RELEASE),
        ({"owner": None}, RELEASE),
        ({"reservation_id": 5}, RELEASE),
        ({"reservation_id": None}, RELEASE),
        ({"reservation_id": "r", "device_ids": [ID]}, RELEASE),
        ({"reservation_id": "r", "device_ids": "bad"}, RELEASE),
        ({"device_ids": None}, DEVICE_IDS),
        ({"device_ids": []}, DEVICE_IDS),
        ({"device_ids": [ID, 2]}, DEVICE_IDS),
        ({"device_ids": [*MAX_IDS, ID]}, DEVICE_IDS),
        ({"owner": "Bad Name"}, OWNER),
        ({"owner": "Bad Name", "device_ids": []}, OWNER),
        ({"owner": 1, "reservation_id": "r"}, OWNER),
    ],
)
def test_a_release_is_refused_for_each_bad_param(params: dict[str, Any], message: str) -> None:
    assert refused("release", params) == message


def test_a_release_with_params_it_does_not_take_is_refused_naming_them() -> None:
    assert refused("release", {"nope": 1}) == "Unknown params: nope."
    assert refused("release", {"device_ids": [ID], "b": 1, "a": 2}) == "Unknown params: a, b."
    # before any other check, as for every method
    assert refused("release", {"owner": "Bad Name", "nope": 1}) == "Unknown params: nope."


def test_a_reconcile_names_the_owner_and_the_devices_still_in_use() -> None:
    assert asked(*astuple(calls.reconcile("kubelet", [ID]))) == ReconcileRequested(
        11, MEMBER, "kubelet", (ID,)
    )
    # none in use: every lease of the owner ends; an ID naming nothing is simply not in use
    assert asked("reconcile", {"owner": "nomad", "device_ids": []}) == ReconcileRequested(
        11, MEMBER, "nomad", ()
    )
    assert asked("reconcile", {"owner": "nomad", "device_ids": [""]}) == ReconcileRequested(
        11, MEMBER, "nomad", ("",)
    )


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"owner": "nomad"}, IN_USE),
        ({"owner": "nomad", "device_ids": None}, IN_USE),
        ({"owner": "nomad", "device_ids": ID}, IN_USE),
        ({"owner": "nomad", "device_ids": [ID, 3]}, IN_USE),
        ({"owner": "nomad", "device_ids": [*MAX_IDS, ID]}, IN_USE),
        ({"device_ids": [ID]}, OWNER),
        ({"owner": None, "device_ids": [ID]}, OWNER),
        ({"owner": "Nomad", "device_ids": [ID]}, OWNER),
        ({"owner": "nomad", "device_ids": [], "all": True}, "Unknown params: all."),
        ({}, IN_USE),  # device_ids first, then owner
    ],
)
def test_a_reconcile_is_refused_for_each_bad_param(params: dict[str, Any], message: str) -> None:
    assert refused("reconcile", params) == message


def test_every_refusal_has_its_json_rpc_code_and_keeps_its_data() -> None:
    codes = {reason: requests.rpc_error(Refusal(reason, "why")).code for reason in Reason}
    assert codes == {
        Reason.UNKNOWN_METHOD: -32601,
        Reason.UNKNOWN_DEVICE: -32001,
        Reason.UNHEALTHY: -32002,
        Reason.RESERVED: -32003,
        Reason.FORBIDDEN: -32004,
        Reason.INVALID: -32602,
        Reason.NOT_RECORDED: -32603,
    }
    error = requests.rpc_error(Refusal(Reason.UNKNOWN_DEVICE, "No such device.", {"a": [1]}))
    assert (error.message, error.data) == ("No such device.", {"a": [1]})
    holder = requests.rpc_error(requests.holder_refused(42, "No process 42 is running."))
    assert holder.code == -32602 and holder.data == {"holder_pid": 42}
    assert holder.message == "No process 42 is running."


def test_a_grant_answers_with_its_edits_and_names_only_devices_with_an_entry() -> None:
    state, _ = run(DeviceSeen(H100), DeviceSeen(H100_B), NvmlGpuSeen(GPU))
    request = reserve(H100.address, H100_B.address)
    grant = decide(state, request).answers[request.token]
    assert isinstance(grant, Grant)

    def exists(path: str) -> bool:  # H100's own node only: H100_B has nothing to inject
        return path == "/dev/nvidia5"

    result = requests.reserved(grant, exists)
    assert result["reservation_id"] == "lease-1"
    assert result["device_ids"] == [H100.address, H100_B.address]
    assert result["devices"] == [
        {"task_path": "/dev/nvidia5", "host_path": "/dev/nvidia5", "cgroup_perms": "rwm"}
    ]
    assert result["envs"] == {"NVIDIA_VISIBLE_DEVICES": f"{GPU.uuid},{H100_B.address}"}
    assert requests.cdi_devices(grant, exists) == [cdi_name(H100.address)]
    assert requests.cdi_devices(grant, lambda path: False) == []
    released = requests.released(Released((ID,), ("0000:5e:00.0",)))
    assert released == {"released": [ID], "not_reserved": ["0000:5e:00.0"]}


def test_leases_show_the_devices_no_longer_on_the_host_as_orphaned() -> None:
    state, _ = run(
        DeviceSeen(H100),
        DeviceSeen(H100_B),
        reserve(H100.address, H100_B.address, connection=3),
        DeviceGone(H100_B.address),
    )
    [entry] = requests.leases(state)["leases"]
    assert entry["reservation_id"] == "lease-1" and entry["bind"] == "connection"
    assert entry["devices"] == {H100.address: GROUP, H100_B.address: GROUP}
    assert entry["orphaned"] == [H100_B.address]
    back, _ = run(DeviceSeen(H100_B), state=state)
    assert requests.leases(back)["leases"][0]["orphaned"] == []
