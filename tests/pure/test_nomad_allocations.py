"""What the Nomad plugin takes from the agent's answers (the documented shape of Nomad's api
``AgentSelf`` and ``Allocation``), and its reconcile settings: plain calls."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from monitor.adapters.nomad import config
from monitor.adapters.nomad.allocations import (
    MAX_IN_USE,
    NotNomadShape,
    devices_in_use,
    node_id,
)
from monitor.adapters.nomad.reconciler import still_used

NODE = "f0e1d2c3-b4a5-9687-7869-5a4b3c2d1e0f"


def allocation(status: str, *ids: str, node: str = NODE) -> dict[str, Any]:
    return {
        "ID": "a1",
        "NodeID": node,
        "ClientStatus": status,
        "AllocatedResources": {
            "Tasks": {
                "cuda": {
                    "Cpu": {"CpuShares": 100},
                    "Devices": [
                        {"Vendor": "nvidia", "Type": "gpu", "Name": "H100", "DeviceIDs": list(ids)}
                    ],
                },
                "sidecar": {"Devices": None},
            },
            "Shared": {"DiskMB": 150},
        },
    }


def test_the_node_id_is_the_clients() -> None:
    assert node_id({"config": {}, "stats": {"client": {"node_id": NODE}}}) == NODE
    for hostile in [
        [],
        {"stats": None},
        {"stats": {"nomad": {}}},  # a server without a client
        {"stats": {"client": {"node_id": "../../v1/acl/tokens"}}},
        {"stats": {"client": {"node_id": 7}}},
    ]:
        with pytest.raises(NotNomadShape):
            node_id(hostile)


def test_devices_of_allocations_that_may_still_run() -> None:
    answer = [
        allocation("running", "0000:3b:00.0"),
        allocation("pending", "0000:86:00.0", "0000:af:00.0"),
        allocation("unknown", "0000:d8:00.0"),  # a disconnected client's: may still run
        allocation("complete", "0000:01:00.0"),
        allocation("failed", "0000:02:00.0"),
        allocation("lost", "0000:03:00.0"),
        {"ID": "old", "NodeID": NODE, "ClientStatus": "running", "AllocatedResources": None},
        allocation("running", "GPU-not ours; rm -rf /"),  # no device ID of ours: ignored
    ]
    assert devices_in_use(answer, NODE) == {
        "0000:3b:00.0",
        "0000:86:00.0",
        "0000:af:00.0",
        "0000:d8:00.0",
    }
    assert devices_in_use([], NODE) == set()


def _broken(change: Any) -> list[dict[str, Any]]:
    answer = [allocation("running", "0000:3b:00.0")]
    change(answer[0])
    return answer


@pytest.mark.parametrize(
    "answer",
    [
        {"allocations": []},
        ["not an allocation"],
        [allocation("running", "0000:3b:00.0", node="00000000-0000-0000-0000-000000000000")],
        _broken(lambda a: a.pop("NodeID")),
        _broken(lambda a: a.update(ClientStatus=1)),
        _broken(lambda a: a.update(AllocatedResources=[])),
        _broken(lambda a: a["AllocatedResources"].update(Tasks=[])),
        _broken(lambda a: a["AllocatedResources"]["Tasks"]["cuda"].update(Devices={})),
        _broken(lambda a: a["AllocatedResources"]["Tasks"]["cuda"]["Devices"].append(3)),
        _broken(
            lambda a: a["AllocatedResources"]["Tasks"]["cuda"]["Devices"][0].update(
                DeviceIDs="0000:3b:00.0"
            )
        ),
        _broken(
            lambda a: a["AllocatedResources"]["Tasks"]["cuda"]["Devices"][0].update(
                DeviceIDs=[None]
            )
        ),
    ],
)
def test_an_answer_not_in_the_documented_shape_is_refused(answer: Any) -> None:
    with pytest.raises(NotNomadShape):
        devices_in_use(answer, NODE)


def test_more_devices_in_use_than_one_reconcile_names_is_refused() -> None:
    many = [allocation("running", *(f"d{i}" for i in range(MAX_IN_USE)))]
    assert len(devices_in_use(copy.deepcopy(many), NODE)) == MAX_IN_USE
    many.append(allocation("running", "one-more"))
    with pytest.raises(NotNomadShape, match="more than 1024"):
        devices_in_use(many, NODE)


def test_a_device_reserved_within_the_grace_period_is_kept() -> None:
    reserved_at = {"0000:3b:00.0": 100.0, "0000:86:00.0": 40.0}
    assert still_used({"0000:af:00.0"}, reserved_at, 120.0, 60.0) == [
        "0000:3b:00.0",
        "0000:af:00.0",
    ]
    assert reserved_at == {"0000:3b:00.0": 100.0}  # the older one is forgotten


def test_reconcile_settings() -> None:
    default = config.settle({})
    assert (default.nomad_address, default.nomad_token_file, default.reconcile_interval) == (
        "http://127.0.0.1:4646",
        None,
        30.0,
    )
    given = config.settle(
        {
            "nomad_address": "https://nomad.local:4646/",
            "nomad_token_file": "/etc/nomad.d/plugin.token",
            "reconcile_interval": 0,
        }
    )
    assert given.nomad_address == "https://nomad.local:4646"
    assert str(given.nomad_token_file) == "/etc/nomad.d/plugin.token"
    assert given.reconcile_interval == 0  # off
    flags = config.flags_from(None, None, None, "http://10.0.0.5:4646", None, 5.0)
    assert config.settle({"reconcile_interval": 60}, flags).reconcile_interval == 5.0
    assert config.settle({}, flags).nomad_address == "http://10.0.0.5:4646"
    for key, bad in [
        ("nomad_address", "unix:///var/run/nomad.sock"),
        ("nomad_address", "http://user:secret@127.0.0.1:4646"),
        ("nomad_address", "http://127.0.0.1:4646/v1/agent"),
        ("nomad_address", "127.0.0.1:4646"),
        ("nomad_token_file", "token"),
        ("reconcile_interval", -5),
        ("reconcile_interval", 1e9),
        ("reconcile_interval", float("nan")),
        ("reconcile_interval", "30s"),
    ]:
        with pytest.raises(config.ConfigRefused, match=key):
            config.settle({key: bad})
    assert "secret" not in str(config.describe(given))
