"""Resource abuse against a running daemon: too many connections, unfinished lines, subscribers
that never read, and reservations dropped in a loop. Each test records what it tried and what
held, with the daemon's file descriptors and resident memory before and after."""

from __future__ import annotations

import contextlib
import fcntl
import json
import socket
import struct
import subprocess
import termios
import time
from collections.abc import Callable
from typing import Any

import pytest

from monitor.outputs.store import COMPACT_AT, LeaseStore
from monitor.wire.framing import MAX_LINE
from tests.conftest import Daemon, Subscription, connect, read_line
from tests.reliability import record
from tests.sysfs import reservable
from tests.waiting import wait_until

FINGERPRINT = b'{"jsonrpc":"2.0","id":1,"method":"fingerprint"}\n'


@pytest.fixture
def host(start_daemon: Callable[..., Daemon]) -> tuple[Daemon, list[str]]:
    devices, flags = reservable()
    return start_daemon(*flags), devices


def test_five_thousand_connections_at_once_are_served_or_refused_cleanly(
    host: tuple[Daemon, list[str]], many_fds: None, subscribe: Callable[[Daemon], Subscription]
) -> None:
    daemon, _ = host
    bystander = subscribe(daemon)
    fds, rss = daemon.fd_count(), daemon.rss_mib()
    sockets = [connect(daemon) for _ in range(5_000)]
    peak_rss = daemon.rss_mib()
    for sock in sockets:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(FINGERPRINT)
    served = refused = 0
    for sock in sockets:
        answer = json.loads(read_line(sock))
        if "result" in answer:
            served += 1
        else:
            assert answer["error"]["code"] == -32000, answer
            assert "Too many clients (limit 1024)" in answer["error"]["message"]
            assert read_line(sock) == b""  # and closed
            refused += 1
    assert served == 1024 - 1, served  # the cap, less the bystander's connection
    assert refused == 5_000 - served
    for sock in sockets:
        sock.close()
    after = daemon.settle_fds(fds)
    assert after <= fds, f"{after} fds after, {fds} before"
    assert daemon.fingerprint()["snapshot"] == bystander.mirror.snapshot
    record(
        "Resources",
        "Connections opened at once, over the cap of 1,024",
        "5,000 connections, one request each",
        f"{served:,} answered, {refused:,} refused with -32000 and closed; "
        f"fds {fds} before, {after} after; RSS {rss:.0f} → {peak_rss:.0f} MiB at peak",
    )


def unread(sock: socket.socket) -> int:
    """Bytes sent on ``sock`` that its peer has not read yet (SIOCOUTQ)."""
    queued: int = struct.unpack("i", fcntl.ioctl(sock, termios.TIOCOUTQ, b"\0" * 4))[0]
    return queued


def test_unfinished_lines_cost_bounded_memory(
    host: tuple[Daemon, list[str]], subscribe: Callable[[Daemon], Subscription]
) -> None:
    daemon, _ = host
    bystander = subscribe(daemon)
    rss = daemon.rss_mib()
    half = b'{"jsonrpc":"2.0","id":1,"method":"fingerprint","pad":"' + b"x" * (MAX_LINE - 100)
    sockets = []
    for _ in range(1_000):  # most of a 1 MiB line each, never finished
        sock = connect(daemon)
        sockets.append(sock)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused already
            sock.sendall(half)
    # once the daemon has read (or refused) every line: nothing left queued for it to read
    wait_until(
        lambda: all(unread(sock) == 0 for sock in sockets), what="the lines read", interval=0.05
    )
    peak_rss = daemon.rss_mib()
    # others are served while the unfinished lines wait
    assert daemon.fingerprint()["snapshot"] == bystander.mirror.snapshot
    answers = []
    for sock in sockets:
        sock.settimeout(0)
        with contextlib.suppress(BlockingIOError, ConnectionResetError):
            answers.append(json.loads(read_line(sock)))
        sock.close()
    refused = [a for a in answers if a.get("error", {}).get("code") == -32000]
    assert len(refused) == len(answers), answers[:3]
    assert peak_rss - rss < 100, f"RSS {rss:.0f} → {peak_rss:.0f} MiB"
    record(
        "Resources",
        "Connections that send most of a 1 MiB line and stop",
        f"1,000 connections, {len(half) * 1000 / (1 << 30):.2f} GiB unfinished in all",
        f"RSS {rss:.0f} → {peak_rss:.0f} MiB; {len(refused):,} "
        "told the daemon is busy and closed once unfinished input passed 64 MiB; "
        "other clients served meanwhile",
    )


def test_subscribers_that_never_read_cost_bounded_memory(
    host: tuple[Daemon, list[str]],
    many_fds: None,
    subscribe: Callable[[Daemon], Subscription],
) -> None:
    daemon, devices = host
    reader = subscribe(daemon)
    rss = daemon.rss_mib()
    stalled = []
    for _ in range(1_000):
        sock = connect(daemon)
        sock.sendall(b'{"jsonrpc":"2.0","id":1,"method":"subscribe"}\n')
        assert b'"snapshot"' in read_line(sock)
        stalled.append(sock)  # never read again
    subscribed_rss = daemon.rss_mib()
    pairs = 2_000
    with daemon.client() as client:
        for _ in range(pairs):  # each reserve and release is a patch to every subscriber
            lease = client.call("reserve", {"device_ids": [devices[0]], "bind": "connection"})
            client.call("release", {"reservation_id": lease["reservation_id"]})
        final = client.call("fingerprint")
    churned_rss = daemon.rss_mib()
    reader.until(lambda m: m.generation == final["generation"])
    assert reader.mirror.snapshot == final["snapshot"]
    # a stalled subscriber that reads at last gets whole lines and ends in step
    sock = stalled[0]
    sock.settimeout(10)
    lines = sock.makefile("rb")
    messages: list[dict[str, Any]] = []
    while not messages or messages[-1].get("params", {}).get("generation") != final["generation"]:
        messages.append(json.loads(lines.readline()))
    assert any("snapshot" in m.get("params", {}) for m in messages[1:])  # a resync after a drop
    lines.close()
    for sock in stalled:
        sock.close()
    growth = churned_rss - subscribed_rss
    assert growth < 32, f"RSS {subscribed_rss:.0f} → {churned_rss:.0f} MiB"
    record(
        "Resources",
        "Subscribers that never read while the snapshot changes",
        f"1,000 stalled subscribers, {pairs * 2:,} patches",
        f"RSS {rss:.0f} MiB → {subscribed_rss:.0f} subscribed → {churned_rss:.0f} after the "
        "patches; a reading subscriber stayed in step; a stalled one, reading at last, got a "
        "full snapshot",
    )


def leases_on_disk(daemon: Daemon) -> tuple[list[str], int]:
    """The reservations the daemon's state directory holds, read back as at a restart, and the
    bytes it takes."""
    leases = [lease.id for lease in LeaseStore(daemon.state_dir).load(lambda pid, t: None)]
    size = sum(p.stat().st_size for p in daemon.state_dir.iterdir() if p.is_file())
    return leases, size


def test_reserving_and_going_away_in_a_loop_leaves_nothing_behind(
    host: tuple[Daemon, list[str]],
) -> None:
    daemon, devices = host
    _, empty_size = leases_on_disk(daemon)
    fds, rss = daemon.fd_count(), daemon.rss_mib()
    rounds = 1_000
    slowest = 0.0
    for _ in range(rounds):  # bound to the connection, then the connection drops
        with daemon.client() as client:
            client.call("reserve", {"device_ids": [devices[0]], "bind": "connection"})
        dropped = time.monotonic()
        with daemon.client() as client:  # the lease ends once the daemon sees the close
            while client.call("leases")["leases"]:
                assert time.monotonic() - dropped < 10, "the lease outlived its connection"
        slowest = max(slowest, time.monotonic() - dropped)
    holders = 100
    for _ in range(holders):  # held by a process that dies without a word
        child = subprocess.Popen(["sleep", "60"])
        with daemon.client() as client:
            client.call("reserve", {"device_ids": devices[:2], "holder_pid": child.pid})
        child.kill()
        child.wait()
    durable = 500
    with daemon.client() as client:
        for _ in range(durable):
            lease = client.call("reserve", {"device_ids": [devices[1]]})
            client.call("release", {"reservation_id": lease["reservation_id"]})
    wait_until(
        lambda: daemon.client().call("leases") == {"leases": []}, 5, "every lease to end", 0.05
    )
    assert daemon.client().call("leases") == {"leases": []}
    left, size = leases_on_disk(daemon)
    assert left == [] and size < COMPACT_AT + 64 * 1024, (left, size)  # the journal is bounded
    after_fds, after_rss = daemon.settle_fds(fds), daemon.rss_mib()
    assert after_fds <= fds
    assert after_rss - rss < 16, f"RSS {rss:.0f} → {after_rss:.0f} MiB"
    record(
        "Resources",
        "Reserve, then drop the connection or kill the holder; reserve and release",
        f"{rounds:,} connection-bound, {holders} killed holders, {durable} durable pairs",
        f"0 leases left (a dropped connection's ended within {slowest * 1000:.1f} ms); "
        f"none on disk after; state directory {empty_size:,} bytes before, {size:,} after; "
        f"fds {fds} → {after_fds}; RSS {rss:.0f} → {after_rss:.0f} MiB",
    )
