"""Leases against a real daemon on this host's real PCI devices: exclusivity, holders,
connection-bound leases, permissions by peer credentials, and persistence across SIGKILL."""

from __future__ import annotations

import json
import os
import random
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from monitor.outputs.store import FORMAT_VERSION
from monitor.wire.blocking import Client
from monitor.wire.errors import DaemonUnavailable, RpcError
from monitor.wire.mirror import Mirror
from tests.conftest import GROUP, Daemon, Subscription, call_as
from tests.reliability import record
from tests.sysfs import reservable, reserved_by, snapshot_view, sysfs_truth


@pytest.fixture
def host(start_daemon: Callable[..., Daemon]) -> tuple[Daemon, list[str]]:
    devices, flags = reservable()
    return start_daemon(*flags), devices


def test_concurrent_reserves_of_one_device_have_exactly_one_winner(
    host: tuple[Daemon, list[str]],
) -> None:
    daemon, devices = host
    clients = [daemon.client() for _ in range(40)]
    start = threading.Barrier(len(clients))
    outcomes: list[dict[str, Any] | RpcError] = []

    def ask(client: Client) -> None:
        start.wait()
        try:
            outcomes.append(client.call("reserve", {"device_ids": [devices[0]]}))
        except RpcError as failure:
            outcomes.append(failure)

    threads = [threading.Thread(target=ask, args=(c,)) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [o for o in outcomes if isinstance(o, dict)]
    losers = [o for o in outcomes if isinstance(o, RpcError)]
    assert len(winners) == 1 and len(losers) == len(clients) - 1
    winner = winners[0]["reservation_id"]
    for loser in losers:
        assert loser.code == -32003
        assert loser.data["device_ids"] == [devices[0]]
        assert loser.data["holders"][devices[0]]["reservation_id"] == winner
        assert loser.data["holders"][devices[0]]["pid"] == os.getpid()
    # all or nothing: a request naming a held device and a free one gets neither
    with daemon.client() as client, pytest.raises(RpcError) as refused:
        client.call("reserve", {"device_ids": [devices[1], devices[0]]})
    assert refused.value.code == -32003
    assert daemon.client().call("reserve", {"device_ids": [devices[1]]})["device_ids"] == [
        devices[1]
    ]
    for client in clients:
        client.close()


def test_leases_come_and_go_as_patches(
    host: tuple[Daemon, list[str]], subscribe: Callable[[Daemon], Subscription]
) -> None:
    daemon, devices = host
    sub = subscribe(daemon)
    with daemon.client() as client:
        lease = client.call("reserve", {"device_ids": devices[:2]})
        sub.until(lambda m: reserved_by(m, devices[1]) == lease["reservation_id"])
        assert reserved_by(sub.mirror, devices[0]) == lease["reservation_id"]
        patch = sub.notifications[-1]["patch"]
        assert "reserved_by" in json.dumps(patch) and len(json.dumps(patch)) < 1000
        client.call("release", {"reservation_id": lease["reservation_id"]})
    sub.until(lambda m: reserved_by(m, devices[0]) is None and reserved_by(m, devices[1]) is None)
    assert sub.mirror.snapshot == daemon.fingerprint()["snapshot"]


def test_a_lease_ends_with_its_holder_process(
    host: tuple[Daemon, list[str]], subscribe: Callable[[Daemon], Subscription]
) -> None:
    daemon, devices = host
    holder = subprocess.Popen(["sleep", "60"])
    sub = subscribe(daemon)
    try:
        with daemon.client() as client:
            lease = client.call("reserve", {"device_ids": [devices[0]], "holder_pid": holder.pid})
            with pytest.raises(RpcError) as no_such:
                client.call("reserve", {"device_ids": [devices[1]], "holder_pid": 2**22 + 1})
            assert no_such.value.code == -32602
        sub.until(lambda m: reserved_by(m, devices[0]) == lease["reservation_id"])
        listed = daemon.client().call("leases")["leases"]
        assert [entry["holder_pid"] for entry in listed] == [holder.pid]
    finally:
        holder.kill()
        holder.wait()
    # How soon is the benchmark's business (tests/bench, scenario 9); here, that it ends.
    sub.until(lambda m: reserved_by(m, devices[0]) is None, timeout=10)
    assert daemon.client().call("leases") == {"leases": []}


def test_a_connection_bound_lease_ends_with_its_connection(
    host: tuple[Daemon, list[str]], subscribe: Callable[[Daemon], Subscription]
) -> None:
    daemon, devices = host
    sub = subscribe(daemon)
    client = daemon.client()
    lease = client.call("reserve", {"device_ids": [devices[0]], "bind": "connection"})
    sub.until(lambda m: reserved_by(m, devices[0]) == lease["reservation_id"])
    assert daemon.client().call("leases")["leases"][0]["bind"] == "connection"
    client.close()
    sub.until(lambda m: reserved_by(m, devices[0]) is None, timeout=2)


class Churn(threading.Thread):
    """Releases a lease or reserves free devices, again and again, until the daemon dies."""

    def __init__(self, client: Client, devices: list[str], leases: dict[str, list[str]]) -> None:
        super().__init__()
        self.client = client
        self.devices = devices
        self.answered = leases  # lease -> devices, as the daemon answered
        self.releasing: str | None = None  # sent, not answered: it may have happened or not
        self.granted = 0
        self.failure: BaseException | None = None
        self.rng = random.Random(len(leases))

    def run(self) -> None:
        try:
            while True:
                if self.answered and self.rng.random() < 0.5:
                    self.releasing = self.rng.choice(sorted(self.answered))
                    self.client.call("release", {"reservation_id": self.releasing})
                    del self.answered[self.releasing]
                    self.releasing = None
                held = {d for devices in self.answered.values() for d in devices}
                free = [d for d in self.devices if d not in held]
                if free:
                    want = self.rng.sample(free, self.rng.randint(1, len(free)))
                    result = self.client.call("reserve", {"device_ids": want})
                    self.answered[result["reservation_id"]] = result["device_ids"]
                    self.granted += 1
        except (OSError, DaemonUnavailable):
            return  # killed
        except BaseException as exc:
            self.failure = exc


def test_leases_survive_sigkill_at_random_moments(
    start_daemon: Callable[..., Daemon],
) -> None:
    devices, flags = reservable()
    rng = random.Random(7)
    truth = sysfs_truth(*flags[1::2])
    leases: dict[str, list[str]] = {}
    granted = restarts = 0
    for _ in range(50):
        daemon = start_daemon(*flags)
        restored = {e["reservation_id"]: e for e in daemon.client().call("leases")["leases"]}
        held = [d for entry in restored.values() for d in entry["devices"]]
        assert len(held) == len(set(held)), restored  # no device in two leases
        # every lease answered before the kill is back, with its devices
        assert set(leases) <= set(restored), (leases, restored, daemon.log())
        assert all(sorted(restored[i]["devices"]) == sorted(leases[i]) for i in leases)
        # and the snapshot is right: the host's devices, each marked with the lease holding it
        snapshot = Mirror(daemon.fingerprint())
        assert snapshot_view(snapshot.snapshot) == truth
        holder = {d: i for i, entry in restored.items() for d in entry["devices"]}
        assert all(reserved_by(snapshot, d) == holder.get(d) for d in truth)
        client = daemon.client(timeout=5)
        churn = Churn(client, devices, {i: list(e["devices"]) for i, e in restored.items()})
        churn.start()
        time.sleep(rng.uniform(0.0, 0.1))
        daemon.kill()
        churn.join()
        client.close()
        assert churn.failure is None, churn.failure
        granted += churn.granted
        leases = {i: d for i, d in churn.answered.items() if i != churn.releasing}
        restarts += 1
    assert granted >= 50, f"only {granted} leases granted in 50 rounds: too few to mean much"
    record(
        "Faults",
        "SIGKILL at a random moment of reserve/release churn, then a restart",
        f"{restarts} kills, {granted:,} leases granted in all",
        "every answered lease back after each restart, none duplicated, no device in two "
        "leases; snapshot equal to sysfs with reserved_by matching the leases",
    )


def test_a_restart_says_how_many_reservations_it_restored_in_words(
    host: tuple[Daemon, list[str]], start_daemon: Callable[..., Daemon]
) -> None:
    daemon, devices = host
    daemon.client().call("reserve", {"device_ids": [devices[0]]})
    daemon.stop()
    again = start_daemon(*reservable()[1])
    assert f"restored 1 reservation from {daemon.state_dir}" in again.log(), again.log()
    assert "1 reservations" not in again.log()


def test_a_corrupt_lease_file_is_moved_aside_and_the_daemon_starts(
    host: tuple[Daemon, list[str]], start_daemon: Callable[..., Daemon]
) -> None:
    daemon, devices = host
    daemon.client().call("reserve", {"device_ids": [devices[0]]})
    daemon.stop()
    lease_file = daemon.state_dir / "leases.json"
    lease_file.write_text('{"version": 1, "leases": [{"reservation_id": 3')
    _, flags = reservable()
    again = start_daemon(*flags)
    assert again.client().call("leases") == {"leases": []}
    aside = list(daemon.state_dir.glob("leases.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text().startswith('{"version": 1')
    assert "<2>CRITICAL monitor.outputs.store: lease file" in again.log()
    # the journal's changes followed the lost snapshot: set aside too, not applied to nothing
    assert len(list(daemon.state_dir.glob("leases.journal.corrupt-*"))) == 1
    snapshot = json.loads(lease_file.read_text())
    assert (snapshot["version"], snapshot["leases"]) == (FORMAT_VERSION, [])


def test_an_unwritable_state_directory_refuses_leases_and_nothing_else(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    devices, flags = reservable()
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    daemon = start_daemon(*flags, "--state-dir", str(blocker / "state"))
    assert daemon.fingerprint()["snapshot"]["groups"]  # it serves
    with daemon.client() as client:
        with pytest.raises(RpcError) as refused:
            client.call("reserve", {"device_ids": [devices[0]]})
        assert refused.value.code == -32603
        assert refused.value.message.startswith(
            "The daemon could not record the change on disk, so it did not make it: cannot write"
        )
        assert client.call("leases") == {"leases": []}
        bound = client.call("reserve", {"device_ids": [devices[0]], "bind": "connection"})
        assert bound["device_ids"] == [devices[0]]  # not written, so still granted
    assert "reserve and release will be refused until it can be written" in daemon.log()


# --- who may ask: clients forked into other users ---------------------------------------------


def test_only_the_group_may_reserve_and_only_the_owner_may_release(
    start_daemon: Callable[..., Daemon], shared_socket: Path
) -> None:
    devices, flags = reservable()
    daemon = start_daemon(*flags, "--group", str(GROUP), socket=shared_socket)
    mode = shared_socket.stat()
    assert (mode.st_mode & 0o777, mode.st_uid, mode.st_gid) == (0o660, 0, GROUP)
    alice, bob, eve = 60001, 60002, 60003
    # Eve is not in the group: the socket's mode keeps her out altogether...
    shut_out = call_as(eve, [eve], shared_socket, "fingerprint", {})
    assert "PermissionError" in shut_out["child_error"]
    # ...and where an operator opens it to everyone, she may read but not reserve.
    shared_socket.chmod(0o666)
    assert "result" in call_as(eve, [eve], shared_socket, "fingerprint", {})
    refused = call_as(eve, [eve], shared_socket, "reserve", {"device_ids": [devices[0]]})
    assert refused["error"]["code"] == -32004 and refused["error"]["data"] == {"uid": eve}
    # Members (by a supplementary group) may reserve; only the owner or root may release.
    granted = call_as(alice, [alice, GROUP], shared_socket, "reserve", {"device_ids": devices[:1]})
    lease = granted["result"]["reservation_id"]
    listed = daemon.client().call("leases")["leases"][0]
    assert (listed["uid"], listed["gid"]) == (alice, alice)
    for params in ({"reservation_id": lease}, {"device_ids": devices[:1]}):
        denied = call_as(bob, [GROUP], shared_socket, "release", params)
        assert denied["error"]["code"] == -32004, denied
        assert denied["error"]["data"] == {"reservation_ids": [lease]}
    owner = call_as(alice, [alice, GROUP], shared_socket, "release", {"reservation_id": lease})
    assert owner["result"] == {"released": devices[:1], "not_reserved": []}
    again = call_as(bob, [GROUP], shared_socket, "reserve", {"device_ids": devices[:1]})
    with daemon.client() as root:
        released = root.call("release", {"device_ids": devices[:1]})
        assert released == {"released": devices[:1], "not_reserved": []}
    assert again["result"]["device_ids"] == devices[:1]
