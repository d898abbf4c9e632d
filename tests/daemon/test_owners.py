"""Scheduler-owned leases against a real daemon: reserve as an owner, reconcile, an operator's
release of an owner's leftovers, durability across SIGKILL, and the config's owner map."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from monitor.core.access import Identity
from monitor.core.leases import Lease
from monitor.daemon.config import ConfigError, read_config
from monitor.daemon.identities import owner_identities
from monitor.outputs.store import LeaseStore
from monitor.wire.errors import RpcError
from monitor.wire.requests import reconcile, release, reserve
from tests.conftest import Daemon, Subscription
from tests.sysfs import reservable, reserved_by


def owner_of(sub: Subscription, device: str) -> str | None:
    value: str | None = sub.mirror.devices()[device][1].get("reserved_owner")
    return value


def test_an_owner_reserves_again_what_it_holds_and_no_one_else_may(
    start_daemon: Callable[..., Daemon], subscribe: Callable[[Daemon], Subscription]
) -> None:
    devices, flags = reservable()
    daemon = start_daemon(*flags)
    sub = subscribe(daemon)
    first = json.loads(daemon.cli("reserve", "--json", "--owner", "nomad", devices[0]).stdout)
    sub.until(lambda m: owner_of(sub, devices[0]) == "nomad")
    with daemon.client() as client:
        again = client.ask(reserve(devices[:2], owner="nomad"))  # a new task of Nomad's
        for refused in (reserve([devices[0]], owner="kubelet"), reserve([devices[0]])):
            with pytest.raises(RpcError) as other:
                client.ask(refused)
            assert other.value.code == -32003
            assert other.value.data["holders"][devices[0]]["owner"] == "nomad"
        leases = client.call("leases")["leases"]
    assert [(e["reservation_id"], e["owner"]) for e in leases] == [
        (again["reservation_id"], "nomad")
    ]
    assert first["reservation_id"] != again["reservation_id"]
    table = daemon.cli("leases").stdout.splitlines()
    assert table[1].split()[2] == "nomad" and "nomad's release" in table[1]
    bad_params: list[tuple[dict[str, object], str]] = [
        ({"owner": "Nomad!"}, "owner must be a scheduler's name"),
        ({"owner": "nomad", "holder_pid": 1}, "An owner's lease ends only by release"),
        ({"owner": "nomad", "bind": "connection"}, "An owner's lease ends only by release"),
    ]
    for bad, says in bad_params:
        with daemon.client() as client, pytest.raises(RpcError) as invalid:
            client.call("reserve", {"device_ids": [devices[1]], **bad})
        assert invalid.value.code == -32602 and says in invalid.value.message


def test_reconcile_ends_the_owners_other_leases_in_one_patch(
    start_daemon: Callable[..., Daemon], subscribe: Callable[[Daemon], Subscription]
) -> None:
    devices, flags = reservable()
    daemon = start_daemon(*flags)
    with daemon.client() as client:
        for device in devices[:2]:
            client.ask(reserve([device], owner="kubelet"))
        sub = subscribe(daemon)
        result = client.ask(reconcile("kubelet", [devices[0], "0000:99:00.0"]))
    assert result == {"released": [devices[1]], "not_reserved": []}
    sub.until(lambda m: reserved_by(m, devices[1]) is None)
    assert len(sub.notifications) == 1  # one fold, one patch
    assert owner_of(sub, devices[0]) == "kubelet"


def test_an_operator_clears_a_schedulers_leftovers_and_they_survive_sigkill_until_then(
    start_daemon: Callable[..., Daemon],
) -> None:
    devices, flags = reservable()
    daemon = start_daemon(*flags)
    with daemon.client() as client:
        for device in devices[:2]:
            client.ask(reserve([device], owner="nomad"))
    daemon.kill()
    again = start_daemon(*flags)
    leases = again.client().call("leases")["leases"]
    assert sorted((tuple(e["devices"]), e["owner"]) for e in leases) == [
        ((devices[0],), "nomad"),
        ((devices[1],), "nomad"),
    ]
    done = again.cli("release", "--owner", "nomad", "--all")
    assert done.returncode == 0 and done.stdout == f"released {devices[0]}, {devices[1]}\n"
    assert again.client().call("leases") == {"leases": []}
    assert (
        again.cli("release", "--owner", "nomad", "--all").stdout == "nomad held no reservations\n"
    )
    with again.client() as client, pytest.raises(RpcError) as refused:
        client.ask(release(owner="Bad Name"))
    assert refused.value.code == -32602


def test_the_config_maps_owner_names_and_refuses_what_is_not_an_identity(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[owners]\nbatch = ["uid:1001", "group:0"]\n"ml.jobs" = []\n')
    owners = read_config(config)["owners"]
    assert owner_identities(owners) == {
        "batch": (Identity(uid=1001), Identity(gid=0)),
        "ml.jobs": (),
    }
    for bad, says in (
        ('[owners]\nbatch = ["user:1"]\n', 'such as "uid:1001" or "group:batch"'),
        ('[owners]\nBatch = ["uid:1"]\n', "'Batch' is not an owner name"),
        ('[owners]\nbatch = ["uid:9999999999"]\n', "out of range"),
        ('owners = ["uid:1"]\n', "owners must be a table"),
    ):
        config.write_text(bad)
        with pytest.raises(ConfigError) as refused:
            read_config(config)
        assert says in str(refused.value), refused.value
    with pytest.raises(ConfigError) as missing:
        owner_identities((("batch", ("group:no-such-group-here",)),))
    assert str(missing.value) == "owners: batch: no group named 'no-such-group-here' on this host"


def test_owner_leases_their_user_may_no_longer_use_stay_and_are_named_once_at_start(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """A lease file from before owner names were bound: a member's kubelet lease."""
    devices, flags = reservable()
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    old = Lease("old-1", {devices[0]: "x/gpu/old"}, 60001, 4242, 1, 1.0, owner="kubelet")
    mine = Lease("old-2", {devices[1]: "x/gpu/old"}, 60001, 4242, 1, 1.0, owner="batch")
    LeaseStore(state).compact([old, mine])
    daemon = start_daemon(*flags)
    warnings = [line for line in daemon.log().splitlines() if "may no longer use" in line]
    assert len(warnings) == 1 and "old-1 (kubelet, uid 60001)" in warnings[0], warnings
    assert "old-2" not in warnings[0]  # batch's first user is uid 60001 itself
    held = [lease["reservation_id"] for lease in daemon.client().call("leases")["leases"]]
    assert sorted(held) == ["old-1", "old-2"]
    assert daemon.cli("release", "--owner", "kubelet", "--all").returncode == 0  # root may
