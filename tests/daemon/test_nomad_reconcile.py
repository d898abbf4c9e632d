"""The Nomad plugin's reconcile against a real daemon and a stand-in for the Nomad agent's HTTP
API: no Nomad binary can be installed here, so a local HTTP server (127.0.0.1 only) answers
JSON in the documented shape of Nomad's api package, and hostile and huge answers."""

from __future__ import annotations

import asyncio
import http.server
import json
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from monitor.adapters.nomad.config import PluginConfig
from monitor.adapters.nomad.reconciler import MAX_ANSWER, AgentError, Reconciler, in_use
from monitor.wire.requests import reserve
from tests.conftest import Daemon
from tests.sysfs import reservable

NODE = "f0e1d2c3-b4a5-9687-7869-5a4b3c2d1e0f"
TOKEN = "5d1f3c2a-0000-4b4b-8c8c-secret-token"
Answer = tuple[int, dict[str, str], bytes]


class Agent(http.server.ThreadingHTTPServer):
    """Answers each path from ``routes`` (status, headers, body); records the requests."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes: dict[str, Answer] = {}
        self.seen: list[tuple[str, str | None]] = []  # path, X-Nomad-Token

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def json(self, path: str, value: Any, status: int = 200) -> None:
        self.routes[path] = (
            status,
            {"Content-Type": "application/json"},
            json.dumps(value).encode(),
        )


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Agent

    def do_GET(self) -> None:
        self.server.seen.append((self.path, self.headers.get("X-Nomad-Token")))
        status, headers, body = self.server.routes.get(self.path, (404, {}, b"no such path"))
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def agent() -> Iterator[Agent]:
    server = Agent()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def allocation(status: str, *ids: str, node: str = NODE) -> dict[str, Any]:
    devices = [{"Vendor": "pci", "Type": "gpu", "Name": "x", "DeviceIDs": list(ids)}]
    return {
        "ID": f"alloc-{status}",
        "NodeID": node,
        "ClientStatus": status,
        "AllocatedResources": {"Tasks": {"task": {"Devices": devices}}},
    }


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def nomad_leases(daemon: Daemon) -> list[list[str]]:
    leases = daemon.client().call("leases")["leases"]
    return sorted(sorted(e["devices"]) for e in leases if e["owner"] == "nomad")


@attrs.frozen
class Setup:
    daemon: Daemon
    devices: list[str]
    config: PluginConfig
    clock: Clock
    reconciler: Reconciler


@pytest.fixture
def setup(start_daemon: Callable[..., Daemon], agent: Agent, tmp_path: Path) -> Setup:
    devices, flags = reservable()
    daemon = start_daemon(*flags)
    token_file = tmp_path / "nomad.token"
    token_file.write_text(TOKEN + "\n")
    config = PluginConfig(
        socket=daemon.socket,
        nomad_address=agent.address,
        nomad_token_file=token_file,
        reconcile_interval=30.0,
    )
    clock = Clock()
    agent.json(
        "/v1/agent/self", {"config": {}, "member": {}, "stats": {"client": {"node_id": NODE}}}
    )
    return Setup(daemon, devices, config, clock, Reconciler(lambda: config, clock=clock))


def test_leases_of_allocations_that_ended_end_and_recent_ones_stay(
    setup: Setup, agent: Agent
) -> None:
    daemon, devices, reconciler, clock = setup.daemon, setup.devices, setup.reconciler, setup.clock
    a, b = devices[:2]
    with daemon.client() as client:
        client.ask(reserve([a], owner="nomad"))
        client.ask(reserve([b], owner="nomad"))
    allocations = f"/v1/node/{NODE}/allocations"
    agent.json(allocations, [allocation("running", a), allocation("complete", b)])
    assert asyncio.run(reconciler.reconcile_once()) == [b]
    assert nomad_leases(daemon) == [[a]]
    assert agent.seen == [("/v1/agent/self", TOKEN), (allocations, TOKEN)]

    with daemon.client() as client:  # a new task: Nomad reserves before its allocation is listed
        client.ask(reserve([b], owner="nomad"))
    reconciler.reserved([b])
    agent.json(allocations, [allocation("running", a)])
    clock.now += 59  # within two intervals of the reservation: kept
    assert asyncio.run(reconciler.reconcile_once()) == []
    assert nomad_leases(daemon) == [[a], [b]]
    clock.now += 2
    assert asyncio.run(reconciler.reconcile_once()) == [b]
    agent.json(allocations, [allocation("failed", a), allocation("lost", a)])
    assert asyncio.run(reconciler.reconcile_once()) == [a]
    assert nomad_leases(daemon) == []


def hostile_answers(agent: Agent) -> list[tuple[str, Callable[[], None]]]:
    allocations = f"/v1/node/{NODE}/allocations"
    huge = b"[" + b'"x",' * (MAX_ANSWER // 4) + b'"x"]'
    deep = b"[" * 100_000 + b"]" * 100_000
    return [
        ("HTTP 500", lambda: agent.json(allocations, {"error": "no leader"}, 500)),
        ("HTTP 403", lambda: agent.json(allocations, "Permission denied", 403)),
        ("a redirect", lambda: agent.routes.update(
            {allocations: (307, {"Location": "http://192.0.2.1/steal"}, b"")})),
        ("over 32 MiB", lambda: agent.routes.update({allocations: (200, {}, huge)})),
        ("not JSON", lambda: agent.routes.update({allocations: (200, {}, b"<html>")})),
        ("nested 100,000 deep", lambda: agent.routes.update({allocations: (200, {}, deep)})),
        ("not a list", lambda: agent.json(allocations, {"Allocations": []})),
        ("another node's", lambda: agent.json(
            allocations, [allocation("running", node="00000000-0000-0000-0000-000000000001")])),
        ("a server, no client", lambda: agent.json("/v1/agent/self", {"stats": {"nomad": {}}})),
        ("a node ID that is a path", lambda: agent.json(
            "/v1/agent/self", {"stats": {"client": {"node_id": "../acl/tokens"}}})),
    ]  # fmt: skip


WHY = {  # what each is refused for
    "HTTP 500": "answered HTTP 500",
    "HTTP 403": "answered HTTP 403",
    "a redirect": "answered HTTP 307",
    "over 32 MiB": "more than 32 MiB",
    "not JSON": "other than JSON",
    "nested 100,000 deep": "other than JSON",
    "not a list": "not a list",
    "another node's": "belongs to another node",
    "a server, no client": "reports no client",
    "a node ID that is a path": "is not a node ID",
}


def test_an_agent_that_cannot_be_trusted_ends_no_lease_and_is_said_once(
    setup: Setup, agent: Agent, caplog: pytest.LogCaptureFixture
) -> None:
    daemon, devices, reconciler = setup.daemon, setup.devices, setup.reconciler
    a = devices[0]
    with daemon.client() as client:
        client.ask(reserve([a], owner="nomad"))
    caplog.set_level(logging.INFO, logger="nomad-plugin")
    for what, answer in hostile_answers(agent):
        saved = dict(agent.routes)
        answer()
        with pytest.raises(AgentError, match=WHY[what]):
            in_use(agent.address, None)
        assert asyncio.run(reconciler.reconcile_once()) is None, what
        assert nomad_leases(daemon) == [[a]], what
        agent.routes = saved
    elsewhere = attrs.evolve(setup.config, nomad_address="http://127.0.0.1:1")  # nobody there
    unreachable = Reconciler(lambda: elsewhere)
    assert asyncio.run(unreachable.reconcile_once()) is None
    assert nomad_leases(daemon) == [[a]]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2  # one for the whole run of failures, per reconciler
    assert "HTTP 500" in warnings[0].reason  # type: ignore[attr-defined]
    assert "no lease is ended" in warnings[0].reason  # type: ignore[attr-defined]
    assert not any(
        TOKEN in json.dumps(vars(r), default=str) for r in caplog.records
    )  # the token is never logged
    assert ("/steal", TOKEN) not in agent.seen  # the redirect was not followed
    agent.json(f"/v1/node/{NODE}/allocations", [])  # answers again: the lease of no task ends
    assert asyncio.run(reconciler.reconcile_once()) == [a]
    assert any("again" in r.getMessage() for r in caplog.records)
