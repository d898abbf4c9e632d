"""Time-sliced sharing against a real daemon on this host's PCI devices: replicas listed and
leased by two holders, the whole device refused, a reload's new count, and replica leases
kept across a SIGKILL."""

from __future__ import annotations

import argparse
import re
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from monitor.core.replicas import SharePolicy, ShareRule
from monitor.daemon.config import ConfigError, add_setting_flags, flag_values, load_settings
from monitor.wire.errors import RpcError
from tests.conftest import Daemon, Subscription
from tests.sysfs import reservable
from tests.waiting import wait_until


def replicas(snapshot: dict[str, Any], device: str) -> dict[str, dict[str, Any]]:
    """The replicas of ``device`` shown, by ID, each with its group's type."""
    return {
        i: {**d, "type": g["type"]}
        for g in snapshot["groups"].values()
        for i, d in g["devices"].items()
        if i.startswith(f"{device}::")
    }


def edits(answer: dict[str, Any]) -> dict[str, Any]:
    return {k: answer[k] for k in ("envs", "mounts", "devices")}


def test_replicas_are_listed_leased_by_two_holders_and_recounted_on_reload(
    tmp_path: Path,
    start_daemon: Callable[..., Daemon],
    subscribe: Callable[[Daemon], Subscription],
) -> None:
    devices, flags = reservable()
    held, free = devices[0], devices[1]
    config = tmp_path / "config.toml"
    config.write_text("share_replicas = 2\nfail_requests_greater_than_one = true\n")
    daemon = start_daemon("--config", str(config), *flags)
    sub = subscribe(daemon)
    shown = replicas(sub.mirror.snapshot, held)
    assert sorted(shown) == [f"{held}::0", f"{held}::1"]
    assert {d["type"].endswith(".shared") for d in shown.values()} == {True}
    assert held not in sub.mirror.devices()  # not offered whole

    with daemon.client() as first, daemon.client() as second:
        one = first.call("reserve", {"device_ids": [f"{held}::0"]})
        two = second.call("reserve", {"device_ids": [f"{held}::1"]})
        assert edits(one) == edits(two)  # two holders, the same device's edits
        with pytest.raises(RpcError) as whole:
            first.call("reserve", {"device_ids": [held]})
        assert whole.value.code == -32001
        assert whole.value.data["replicas"] == {held: [f"{held}::0", f"{held}::1"]}
        with pytest.raises(RpcError) as doubled:
            first.call("reserve", {"device_ids": [f"{free}::0", f"{free}::1"]})
        assert doubled.value.code == -32602 and "no more compute" in doubled.value.message
        leases = first.call("leases")["leases"]
    assert sorted(d for e in leases for d in e["devices"]) == [f"{held}::0", f"{held}::1"]
    table = daemon.cli("devices").stdout
    for lease in (one, two):
        assert lease["reservation_id"] in table  # each replica's holder, on its row

    config.write_text("share_replicas = 3\n")
    daemon.process.send_signal(signal.SIGHUP)
    sub.until(lambda m: len(replicas(m.snapshot, free)) == 3)
    assert sorted(replicas(sub.mirror.snapshot, held)) == [f"{held}::0", f"{held}::1"]
    wait_until(lambda: f"{held} stays at 2 replicas until its reservations end" in daemon.log())

    with daemon.client() as client:  # the count waits for the last holder
        client.call("release", {"reservation_id": one["reservation_id"]})
        assert len(replicas(daemon.fingerprint()["snapshot"], held)) == 2
    daemon.kill()  # the other replica lease is on disk: it comes back with the device
    daemon = start_daemon("--config", str(config), *flags)
    restored = replicas(daemon.fingerprint()["snapshot"], held)
    assert sorted(restored) == [f"{held}::{k}" for k in range(3)]  # a start counts anew
    assert restored[f"{held}::1"]["reserved_by"] == two["reservation_id"]
    assert restored[f"{held}::1"]["healthy"] is True
    assert "reserved_by" not in restored[f"{held}::0"]


def test_the_config_reads_share_rules_and_refuses_what_is_not_one(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        "share_replicas = 2\nfail_requests_greater_than_one = true\n"
        '[[share]]\nmatch = "10de:2330"\nreplicas = 4\n'
        '[[share]]\nmatch = "amd/gpu"\nreplicas = 1\n'
    )
    settings = load_settings(config, {})
    assert settings.share_policy == SharePolicy(
        2, (ShareRule("10de:2330", 4), ShareRule("amd/gpu", 1)), fail_requests_greater_than_one=True
    )
    flags = argparse.ArgumentParser()
    add_setting_flags(flags)
    given = flag_values(
        flags.parse_args(["--share-replicas", "3", "--fail-requests-greater-than-one"])
    )
    assert load_settings(config, given).share_policy.replicas == 3
    for bad, says in [
        ("share_replicas = 0", "share_replicas must be from 1 (not shared) to 64"),
        ("share_replicas = 65", "share_replicas must be from 1 (not shared) to 64"),
        ('[[share]]\nmatch = "10de"', 'share item 0: must be a table of "match" and "replicas"'),
        ('[[share]]\nmatch = "a//b"\nreplicas = 2', "share item 0: match 'a//b' is neither"),
        ('[[share]]\nmatch = "10de"\nreplicas = 99', "share item 0: replicas must be from 1"),
        ("[[share]]\nmatch = 7\nreplicas = 2", "share item 0: match must be a string"),
        ("fail_requests_greater_than_one = 1", "must be true or false"),
    ]:
        config.write_text(bad + "\n")
        with pytest.raises(ConfigError, match=re.escape(says)):
            load_settings(config, {})
