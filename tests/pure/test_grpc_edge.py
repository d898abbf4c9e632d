"""The gRPC edge the kubelet and Nomad plugins share, by plain calls: the daemon's refusals as
gRPC statuses (every wire error code), the except ladder around a call to the daemon, the
reservation's check, its container edits for both schedulers, and the daemon's reachability
said once per change."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc
import pytest

from monitor.adapters import grpc_edge
from monitor.adapters.kubelet.protos import deviceplugin_pb2 as kube
from monitor.adapters.kubelet.rpc import container_response
from monitor.adapters.nomad.protos import device_pb2 as nomad
from monitor.adapters.nomad.translate import container_reservation
from monitor.wire import asyncio_transport, errors
from monitor.wire.backoff import Backoff
from monitor.wire.errors import DaemonUnavailable, RpcError
from monitor.wire.mirror import Mirror
from monitor.wire.requests import Call
from monitor.wire.reservations import BadAnswer

T = TypeVar("T")
A, B = "0000:3b:00.0", "0000:86:00.0"
GPU_UUID = "GPU-0a0a0a0a-1111-2222-3333-444444444444"
MIG = "MIG-0a0a0a0a-1111-2222-3333-444444444444"
CARD = f"/dev/dri/by-path/pci-{A}-card"
RESERVATION: dict[str, Any] = {
    "reservation_id": "r-1",
    "device_ids": [A],
    "envs": {"NVIDIA_VISIBLE_DEVICES": "GPU-0a0a"},
    "mounts": [{"task_path": CARD, "host_path": CARD, "read_only": True}],
    "devices": [
        {"task_path": "/dev/nvidia0", "host_path": "/dev/nvidia0", "cgroup_perms": "rwm"},
        {"task_path": "/dev/nvidiactl", "host_path": "/dev/nvidiactl", "cgroup_perms": "rw"},
    ],
    "cdi_devices": [f"hotplug-monitor.io/gpu={A}"],
}  # fmt: skip

# -- refusals as statuses ---------------------------------------------------------------------

STATUS_OF_EVERY_CODE = {
    errors.PARSE_ERROR: grpc.StatusCode.INTERNAL,
    errors.INVALID_REQUEST: grpc.StatusCode.INTERNAL,
    errors.METHOD_NOT_FOUND: grpc.StatusCode.INTERNAL,
    errors.INVALID_PARAMS: grpc.StatusCode.INVALID_ARGUMENT,
    errors.INTERNAL_ERROR: grpc.StatusCode.INTERNAL,
    errors.SERVER_BUSY: grpc.StatusCode.UNAVAILABLE,
    errors.UNKNOWN_DEVICE: grpc.StatusCode.NOT_FOUND,
    errors.DEVICE_UNHEALTHY: grpc.StatusCode.FAILED_PRECONDITION,
    errors.DEVICE_RESERVED: grpc.StatusCode.FAILED_PRECONDITION,
    errors.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
}


def test_every_wire_error_code_has_its_grpc_status() -> None:
    wire_codes = {
        value
        for name, value in vars(errors).items()
        if name.isupper() and isinstance(value, int) and not isinstance(value, bool)
    }
    assert set(STATUS_OF_EVERY_CODE) == wire_codes  # a new code needs its row here
    for code, status in STATUS_OF_EVERY_CODE.items():
        assert grpc_edge.status_for(RpcError(code, "A sentence.")) == (status, "A sentence.")
    assert grpc_edge.status_for(RpcError(-32099, "new")) == (grpc.StatusCode.INTERNAL, "new")


@pytest.mark.parametrize(
    ("message", "said"),
    [
        ("x" * 1024, "x" * 1024),
        ("x" * 1025, "the daemon refused (code -32003)"),
        ("", "the daemon refused (code -32003)"),
        ("held\x1b[2J", "the daemon refused (code -32003)"),
        ("line\nbreak", "the daemon refused (code -32003)"),
    ],
)
def test_the_daemons_sentence_is_shown_only_when_fit_to_show(message: str, said: str) -> None:
    status = grpc_edge.status_for(RpcError(errors.DEVICE_RESERVED, message))
    assert status == (grpc.StatusCode.FAILED_PRECONDITION, said)


# -- the except ladder ------------------------------------------------------------------------


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code, self.details = code, details


class Context:
    """A servicer context whose abort raises, as gRPC's does."""

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        raise Aborted(code, details)


def ask(work: Callable[[], Awaitable[T]], timeout: float = 10.0) -> tuple[T | Aborted, list[str]]:
    """``grpc_edge.ask`` on its own event loop: what it returned or the abort, and what the
    adapter's log hooks were told."""
    told: list[str] = []

    async def main() -> T:
        return await grpc_edge.ask(
            Context(),
            timeout,
            work,
            refused=lambda message: told.append(f"refused: {message}"),
            bad_answer=lambda error: told.append(f"bad answer: {error}"),
        )

    try:
        return asyncio.run(main()), told
    except Aborted as aborted:
        return aborted, told


def raising(error: BaseException) -> Callable[[], Awaitable[Any]]:
    async def work() -> Any:
        raise error

    return work


def test_an_answer_is_returned_and_nothing_aborted() -> None:
    async def work() -> str:
        return "granted"

    assert ask(work) == ("granted", [])


def test_a_refusal_aborts_with_its_status_and_is_told_to_the_log() -> None:
    aborted, told = ask(raising(RpcError(errors.DEVICE_RESERVED, "held by r-7")))
    assert isinstance(aborted, Aborted)
    assert (aborted.code, aborted.details) == (grpc.StatusCode.FAILED_PRECONDITION, "held by r-7")
    assert told == ["refused: held by r-7"]


def test_an_unreachable_daemon_aborts_unavailable_naming_it() -> None:
    gone = DaemonUnavailable("no daemon is running: /run/hotplug-monitor.sock does not exist")
    aborted, told = ask(raising(gone))
    assert isinstance(aborted, Aborted)
    assert aborted.code == grpc.StatusCode.UNAVAILABLE
    assert aborted.details == (
        "hotplug-monitor daemon not reachable: "
        "no daemon is running: /run/hotplug-monitor.sock does not exist"
    )
    assert told == []  # the plugin says reachability as it follows the daemon


def test_a_silent_daemon_aborts_with_deadline_exceeded() -> None:
    async def silent() -> None:
        await asyncio.Event().wait()

    aborted, told = ask(silent, timeout=0)
    assert isinstance(aborted, Aborted)
    assert (aborted.code, aborted.details) == (
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "the daemon did not answer within 0 s",
    )
    assert told == []


def test_an_answer_no_client_should_use_aborts_internal_and_is_told_to_the_log() -> None:
    bad = "refusing the daemon's reservation: a mount '/etc'"
    aborted, told = ask(raising(BadAnswer(bad)))
    assert isinstance(aborted, Aborted)
    assert (aborted.code, aborted.details) == (grpc.StatusCode.INTERNAL, bad)
    assert told == [f"bad answer: {bad}"]


def test_anything_else_is_not_the_ladders_to_catch() -> None:
    with pytest.raises(KeyError):
        ask(raising(KeyError("envs")))


def test_the_refusal_for_each_error_asking_the_daemon() -> None:
    assert grpc_edge.refusal(TimeoutError(), 2.5) == (
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "the daemon did not answer within 2.5 s",
    )
    assert grpc_edge.refusal(DaemonUnavailable("closed"), 1) == (
        grpc.StatusCode.UNAVAILABLE,
        f"{grpc_edge.UNREACHABLE}: closed",
    )
    assert grpc_edge.refusal(RpcError(errors.UNKNOWN_DEVICE, "no such"), 1) == (
        grpc.StatusCode.NOT_FOUND,
        "no such",
    )
    assert grpc_edge.refusal(BadAnswer("odd"), 1) == (grpc.StatusCode.INTERNAL, "odd")


# -- the reservation and its container edits --------------------------------------------------


class Client:
    """A connection whose daemon answers ``answer`` and keeps what it was asked."""

    def __init__(self, answer: object) -> None:
        self.answer = answer
        self.asked: list[Call] = []

    async def ask(self, call: Call) -> Any:
        self.asked.append(call)
        return self.answer


def reserve(answer: object, ids: list[str]) -> tuple[dict[str, Any], list[Call]]:
    client = Client(answer)
    result = asyncio.run(grpc_edge.reserve(client, ids, "kubelet"))
    return result, client.asked


def test_a_reservation_is_asked_for_the_owner_and_returned_checked() -> None:
    result, asked = reserve(copy.deepcopy(RESERVATION), [A])
    assert result == RESERVATION
    assert asked == [Call("reserve", {"device_ids": [A], "owner": "kubelet"})]


def test_a_reservation_for_other_devices_than_asked_by_address_is_released_then_refused() -> None:
    client = Client({**copy.deepcopy(RESERVATION), "device_ids": [B]})
    with pytest.raises(BadAnswer, match=r"it is for \['.*'\], not \['.*'\]; released it"):
        asyncio.run(grpc_edge.reserve(client, [A], "kubelet"))
    lease = RESERVATION["reservation_id"]
    assert client.asked[1:] == [
        Call("release", {"reservation_id": lease, "owner": "kubelet"})
    ]  # no device stays held for a container that never gets it
    # Asked by a GPU UUID, the daemon names what it reserved: its own ID for the GPU.
    result, _ = reserve(copy.deepcopy(RESERVATION), [GPU_UUID])
    assert result["device_ids"] == [A]
    # A MIG UUID is a MIG instance's own ID: a grant of anything else (its whole GPU) is not
    # what was asked for, and is released.
    client = Client({**copy.deepcopy(RESERVATION), "device_ids": [A]})
    with pytest.raises(BadAnswer, match=rf"it is for \['{A}'\], not \['{MIG}'\]; released"):
        asyncio.run(grpc_edge.reserve(client, [MIG], "kubelet"))
    result, _ = reserve({**copy.deepcopy(RESERVATION), "device_ids": [MIG]}, [MIG])
    assert result["device_ids"] == [MIG]
    result, _ = reserve({**copy.deepcopy(RESERVATION), "device_ids": [f"{MIG}::1"]}, [f"{MIG}::1"])
    assert result["device_ids"] == [f"{MIG}::1"]


def test_a_reservation_of_a_shape_the_daemon_never_plans_is_refused() -> None:
    mounts_etc = {
        **copy.deepcopy(RESERVATION),
        "mounts": [{"task_path": "/etc", "host_path": "/etc", "read_only": True}],
    }
    client = Client(mounts_etc)
    with pytest.raises(BadAnswer, match=r"a mount.*released it"):
        asyncio.run(grpc_edge.reserve(client, [A], "kubelet"))
    assert [call.method for call in client.asked] == ["reserve", "release"]


def test_a_grant_that_cannot_be_released_says_so() -> None:
    class Gone(Client):
        async def ask(self, call: Call) -> Any:
            if call.method == "release":
                raise DaemonUnavailable("the daemon closed the connection")
            return await super().ask(call)

    client = Gone({**copy.deepcopy(RESERVATION), "device_ids": [B]})
    with pytest.raises(BadAnswer, match=r"releasing .* failed: the daemon closed"):
        asyncio.run(grpc_edge.reserve(client, [A], "kubelet"))


def test_the_container_edits_for_the_kubelet_and_for_nomad_say_the_same() -> None:
    kubelet = container_response(copy.deepcopy(RESERVATION), cdi=False)
    task = container_reservation(copy.deepcopy(RESERVATION))
    envs = {"NVIDIA_VISIBLE_DEVICES": "GPU-0a0a"}
    devices = [
        ("/dev/nvidia0", "/dev/nvidia0", "rwm"),
        ("/dev/nvidiactl", "/dev/nvidiactl", "rw"),
    ]
    assert dict(kubelet.envs) == dict(task.envs) == envs
    assert [(d.container_path, d.host_path, d.permissions) for d in kubelet.devices] == devices
    assert [(d.task_path, d.host_path, d.permissions) for d in task.devices] == devices
    assert [(m.container_path, m.host_path, m.read_only) for m in kubelet.mounts] == [
        (CARD, CARD, True)
    ]
    assert [(m.task_path, m.host_path, m.read_only) for m in task.mounts] == [(CARD, CARD, True)]
    assert not kubelet.cdi_devices  # CDI names only when the plugin hands them (--no-cdi aside)


def test_the_container_edits_are_built_of_the_messages_given() -> None:
    kubelet = grpc_edge.container_edits(
        RESERVATION, kube.ContainerAllocateResponse, kube.Mount, kube.DeviceSpec, "container_path"
    )
    task = grpc_edge.container_edits(
        RESERVATION, nomad.ContainerReservation, nomad.Mount, nomad.DeviceSpec, "task_path"
    )
    assert isinstance(kubelet, kube.ContainerAllocateResponse)
    assert isinstance(task, nomad.ContainerReservation)
    assert [d.container_path for d in kubelet.devices] == [d.task_path for d in task.devices]
    assert kubelet.mounts[0].container_path == task.mounts[0].task_path == CARD
    empty = {**RESERVATION, "envs": {}, "mounts": [], "devices": []}
    edits = grpc_edge.container_edits(
        empty, nomad.ContainerReservation, nomad.Mount, nomad.DeviceSpec, "task_path"
    )
    assert edits == nomad.ContainerReservation()


# -- following the daemon ---------------------------------------------------------------------


def reachability() -> tuple[grpc_edge.Reachability, list[str]]:
    said: list[str] = []
    link = grpc_edge.Reachability(
        lost=lambda: said.append("lost"),
        back=lambda: said.append("back"),
        left_out=lambda reason: said.append(f"left out {reason}"),
    )
    return link, said


def test_reachability_is_said_once_per_change() -> None:
    link, said = reachability()
    assert link.reachable is None
    link.answered(())
    assert link.reachable is True and said == []  # the first answer is no news
    link.unreachable()
    link.unreachable()
    assert link.reachable is False and said == ["lost"]
    link.answered(())
    link.answered(())
    assert link.reachable is True and said == ["lost", "back"]
    link.forget()
    assert link.reachable is None
    link.unreachable()
    assert said == ["lost", "back", "lost"]


def test_a_daemon_unreachable_from_the_start_is_said_lost() -> None:
    link, said = reachability()
    link.unreachable()
    assert said == ["lost"]


def test_what_a_snapshot_left_out_is_said_when_it_changes_the_first_twenty() -> None:
    link, said = reachability()
    link.answered(("group x",))
    link.answered(("group x",))
    assert said == ["left out group x"]
    many = tuple(f"device {i}" for i in range(30))
    link.answered(many)
    assert said[1:] == [f"left out device {i}" for i in range(grpc_edge.MAX_SKIPPED_SAID)]
    link.answered(())
    assert len(said) == 1 + grpc_edge.MAX_SKIPPED_SAID


class Stop(BaseException):
    """Ends the follow loop in a test (it never ends by itself)."""


def test_an_answer_that_cannot_be_read_counts_as_the_daemon_gone_and_is_followed_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tries: list[Path] = []

    async def follow(path: Path, emit: Any, backoff: Backoff | None = None) -> NoReturn:
        tries.append(path)
        if len(tries) == 1:
            raise ValueError("not JSON")
        raise Stop

    monkeypatch.setattr(asyncio_transport, "follow", follow)
    emitted: list[Mirror | None] = []
    unreadable: list[str] = []

    async def emit(mirror: Mirror | None) -> None:
        emitted.append(mirror)

    async def main() -> None:
        await grpc_edge.follow(
            Path("/run/x.sock"),
            emit,
            unreadable=lambda error: unreadable.append(repr(error)),
            backoff=Backoff(first=0.0),
        )

    with pytest.raises(Stop):
        asyncio.run(main())
    assert tries == [Path("/run/x.sock")] * 2
    assert emitted == [None]
    assert unreadable == ["ValueError('not JSON')"]


def test_a_mig_instances_reservation_with_its_capability_nodes_is_taken() -> None:
    caps = ["/dev/nvidia-caps/nvidia-cap93", "/dev/nvidia-caps/nvidia-cap94"]
    answer = {
        **copy.deepcopy(RESERVATION),
        "device_ids": [MIG],
        "envs": {"NVIDIA_VISIBLE_DEVICES": MIG},
        "devices": [
            *RESERVATION["devices"],
            *({"task_path": c, "host_path": c, "cgroup_perms": "r"} for c in caps),
        ],
    }
    result, _ = reserve(answer, [MIG])
    assert [d["host_path"] for d in result["devices"]][-2:] == caps
    for odd in ("/dev/nvidia-caps/../sda", "/dev/nvidia-caps/nvidia-capx", "/dev/nvidia-caps"):
        bad = copy.deepcopy(answer)
        bad["devices"][-1] = {"task_path": odd, "host_path": odd, "cgroup_perms": "r"}
        with pytest.raises(BadAnswer, match="released it"):
            asyncio.run(grpc_edge.reserve(Client(bad), [MIG], "kubelet"))
