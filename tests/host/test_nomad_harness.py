"""go-plugin's real client (Debian's golang-github-hashicorp-go-plugin-dev, in tests/nomad/host)
against a plugin served by monitor.adapters.nomad.goplugin with the fixture servicers
(tests/nomad/fixture_plugin.py): Nomad's three launches, health, Shutdown without the 2 s
kill, stdout and stderr as the client reads them, and the device RPCs.

Some checks start the plugin directly (no Go host) to see its raw stdout, exit status and
environment handling; they use Python gRPC stubs generated from the same protos.

Measured times are written to build/nomad-harness.json (and printed with ``-s``). The Go host
is built once into build/nomad-host (or $NOMAD_HOST_CACHE) and reused while its sources, the
protos and the toolchain stay the same.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import msgpack
import pytest
from google.protobuf import empty_pb2
from grpc_health.v1 import health_pb2

from monitor.adapters.nomad import goplugin
from monitor.adapters.nomad.protos import goplugin_pb2, goplugin_pb2_grpc
from tests.nomad import fixture_plugin, generate, host

REPO = Path(__file__).resolve().parents[2]
FIXTURE = [sys.executable, "-m", "tests.nomad.fixture_plugin"]
CONFIG = {"socket": "/run/hotplug-monitor/test.sock"}
HANDSHAKE = re.compile(r"^1\|2\|unix\|(/[^|]+)\|grpc$")
# What go-plugin's client logs when a plugin has not exited 2 s after Shutdown, and kills it.
GRACELESS = "plugin failed to exit gracefully"

measured: dict[str, Any] = {}


def _keep(name: str, value: Any) -> None:
    measured[name] = value
    out = REPO / "build" / "nomad-harness.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(measured, indent=1) + "\n")
    print(f"{name}: {value}")


# -- the committed generated code ---------------------------------------------------------


def test_generated_code_matches_protos() -> None:
    with_tools = generate.main(["--check"])
    assert with_tools == 0, "run: python -m tests.nomad.generate"


# -- the plugin started directly ------------------------------------------------------------


def _plugin_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLUGIN_")}
    env[goplugin.NOMAD.cookie_key] = goplugin.NOMAD.cookie_value
    env[goplugin.ENV_PROTOCOL_VERSIONS] = "2"
    env.update(extra)
    return env


class DirectPlugin:
    """The fixture plugin as a child of the test, with its raw stdout and stderr."""

    def __init__(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            FIXTURE,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        self.line = self.process.stdout.readline().rstrip("\n")

    def finish(self, timeout: float = 10) -> tuple[int, str, str]:
        """Exit status, the rest of stdout, and stderr."""
        rest, err = self.process.communicate(timeout=timeout)
        return self.process.returncode, rest, err

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


def _health(channel: grpc.Channel) -> int:
    """grpc.health.v1 Check for go-plugin's service name (typeshed's HealthStub has no
    methods, so the call is spelled out)."""
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    answer: health_pb2.HealthCheckResponse = check(
        health_pb2.HealthCheckRequest(service=goplugin.HEALTH_SERVICE), timeout=5
    )
    return answer.status


@pytest.fixture
def direct() -> Iterator[DirectPlugin]:
    plugin = DirectPlugin(_plugin_env())
    yield plugin
    plugin.kill()


def test_without_cookie_it_says_what_it_is_in_one_line() -> None:
    env = _plugin_env()
    del env[goplugin.NOMAD.cookie_key]
    done = subprocess.run(FIXTURE, cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "Nomad" in lines[0] and "plugin_dir" in lines[0]


def test_handshake_then_health_stdio_and_shutdown(direct: DirectPlugin) -> None:
    match = HANDSHAKE.match(direct.line)
    assert match, direct.line
    socket_path = match.group(1)
    with grpc.insecure_channel(f"unix:{socket_path}") as channel:
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
        stdio_stub = goplugin_pb2_grpc.GRPCStdioStub(channel)
        # Served, and open with nothing to send (UNIMPLEMENTED would come at once).
        with pytest.raises(grpc.RpcError) as waited:
            list(stdio_stub.StreamStdio(empty_pb2.Empty(), timeout=0.5))
        assert waited.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        stdio = stdio_stub.StreamStdio(empty_pb2.Empty(), timeout=30)
        began = time.monotonic()
        goplugin_pb2_grpc.GRPCControllerStub(channel).Shutdown(goplugin_pb2.Empty(), timeout=5)
        # Shutdown ends the stream, empty, well before its deadline: cleanly, or cut with
        # the server, which go-plugin's stdio client also takes as the end (EOF, Unavailable,
        # Canceled).
        try:
            assert list(stdio) == []
        except grpc.RpcError as cut:
            assert cut.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    status, rest, err = direct.finish()
    exit_ms = (time.monotonic() - began) * 1000
    assert status == 0
    # Only the handshake ever reaches stdout; the fixture's print went to stderr.
    assert rest == ""
    assert "stray output from the fixture plugin" in err
    assert not os.path.exists(socket_path)
    _keep("direct_shutdown_to_exit_ms", round(exit_ms, 1))


def test_sigint_is_left_to_the_host(direct: DirectPlugin) -> None:
    match = HANDSHAKE.match(direct.line)
    assert match, direct.line
    direct.process.send_signal(signal.SIGINT)
    time.sleep(0.3)
    assert direct.process.poll() is None
    with grpc.insecure_channel(f"unix:{match.group(1)}") as channel:
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
    direct.process.send_signal(signal.SIGTERM)
    assert direct.finish()[0] == 0


def test_socket_dir_group_and_multiplex_request_are_honoured(tmp_path: Path) -> None:
    plugin = DirectPlugin(
        _plugin_env(
            PLUGIN_UNIX_SOCKET_DIR=str(tmp_path),
            PLUGIN_UNIX_SOCKET_GROUP=str(os.getgid()),
            PLUGIN_MULTIPLEX_GRPC="true",
        )
    )
    try:
        fields = plugin.line.split("|")
        # Seven fields: no certificate, and no broker multiplexing to offer.
        assert fields[:3] == ["1", "2", "unix"] and fields[4:] == ["grpc", "", "false"]
        socket_path = Path(fields[3])
        assert socket_path.parent == tmp_path
        assert socket_path.is_socket()
        # The host's group may connect.
        assert socket_path.stat().st_gid == os.getgid()
        assert socket_path.stat().st_mode & 0o777 == 0o660
    finally:
        plugin.process.send_signal(signal.SIGTERM)
        status, _, _ = plugin.finish()
    assert status == 0
    assert list(tmp_path.iterdir()) == []


def test_the_socket_is_the_hosts_alone_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)  # an agent, or a person, that leaves the umask at 000
    try:
        plugin = DirectPlugin(_plugin_env(PLUGIN_UNIX_SOCKET_DIR=str(tmp_path)))
    finally:
        os.umask(old)
    try:
        socket_path = Path(plugin.line.split("|")[3])
        assert socket_path.parent == tmp_path
        made = socket_path.lstat()
        assert stat.S_ISSOCK(made.st_mode)
        assert (stat.S_IMODE(made.st_mode), made.st_uid) == (0o600, os.geteuid())
        assert list(tmp_path.iterdir()) == [socket_path]  # no private directory left
    finally:
        plugin.process.send_signal(signal.SIGTERM)
        status, _, _ = plugin.finish()
    assert status == 0
    assert list(tmp_path.iterdir()) == []


def test_no_shared_version_is_left_for_the_host_to_report() -> None:
    plugin = DirectPlugin(_plugin_env(PLUGIN_PROTOCOL_VERSIONS="5,6"))
    try:
        assert plugin.line.startswith("1|2|unix|")
    finally:
        plugin.process.send_signal(signal.SIGTERM)
        _, _, err = plugin.finish()
    assert "no protocol version in common with the host" in err


def test_a_host_asking_for_mtls_is_refused_clearly() -> None:
    plugin = DirectPlugin(_plugin_env(PLUGIN_CLIENT_CERT="-----BEGIN CERTIFICATE-----"))
    status, rest, err = plugin.finish()
    assert status == 1
    assert plugin.line == "" and rest == ""
    assert "mTLS" in err


# -- through go-plugin's client ---------------------------------------------------------------


@pytest.fixture(scope="session")
def host_binary() -> Path:
    built = host.for_tests()
    _keep("host_build_s", {"seconds": round(built.seconds, 2), "cached": built.cached})
    return built.binary


@pytest.fixture
def go_host(host_binary: Path) -> Iterator[host.GoPluginHost]:
    with host.GoPluginHost(host_binary, env=_plugin_env()) as running:
        yield running


@pytest.fixture
def launched(go_host: host.GoPluginHost) -> Iterator[dict[str, Any]]:
    result = go_host.request("launch", cmd=FIXTURE, config=CONFIG, dir=str(REPO))
    assert "error" not in result, result
    yield result
    if go_host.request("ping").get("ok"):
        go_host.request("kill")


def _entries(go_host: host.GoPluginHost) -> list[dict[str, Any]]:
    return [e for e in go_host.request("logs")["host_log"] if isinstance(e, dict)]


def test_the_three_launches_of_nomads_loader(
    go_host: host.GoPluginHost, launched: dict[str, Any]
) -> None:
    stages = launched["stages"]
    assert [s["stage"] for s in stages] == ["fingerprint", "validate", "run"]
    fingerprint, validate, run = stages
    assert run["pid"] > 0 and "kill_ms" not in run  # the long-lived one is still up
    info = fingerprint["plugin_info"]
    assert info == {
        "type": "DEVICE",
        "plugin_api_versions": ["v0.1.0"],
        "plugin_version": fixture_plugin.VERSION,
        "name": fixture_plugin.NAME,
    }
    schema = fingerprint["config_schema"]["spec"]["object"]["attributes"]
    assert set(schema) == {"socket", "ignored_device_ids"}
    assert all(s["negotiated_version"] == 2 for s in stages)
    # The short-lived launches ended through Shutdown, not go-plugin's kill after 2 s.
    for stage in (fingerprint, validate):
        assert stage["exited"] is True
    # The config reached the plugin as go-cty would encode it: a map with every attribute,
    # defaults filled in.
    sent = msgpack.unpackb(base64.b64decode(launched["msgpack_config_b64"]))
    assert sent == {"socket": CONFIG["socket"], "ignored_device_ids": []}
    # Nomad's loader calls SetConfig twice to validate (no agent config), once to run (with).
    entries = _entries(go_host)
    phases = [e["phase"] for e in entries if e.get("@message") == "SetConfig"]
    assert phases == ["validate", "validate", "run"]
    assert not any(e.get("@message") == GRACELESS for e in entries)
    _keep(
        "launch_ms",
        {
            s["stage"]: {
                k: s[k] for k in ("handshake_ms", "ping_ms", "kill_ms", "set_config_ms") if k in s
            }
            for s in stages
        },
    )


def test_health_and_kill_without_the_two_second_fallback(
    go_host: host.GoPluginHost, launched: dict[str, Any]
) -> None:
    assert go_host.request("ping")["ok"] is True
    assert "message" in go_host.request("fingerprint_next", timeout_ms=5000)
    killed = go_host.request("kill")
    assert killed["exited"] is True
    messages = [e.get("@message") for e in _entries(go_host)]
    assert "plugin exited" in messages
    assert GRACELESS not in messages
    assert not any("error closing client" in str(m) for m in messages)
    _keep("kill_with_open_stream_ms", killed["kill_ms"])


def test_stdout_and_stderr_as_the_client_reads_them(
    go_host: host.GoPluginHost, launched: dict[str, Any]
) -> None:
    entries = _entries(go_host)
    # JSON lines come out at their own level, with their fields, under the plugin's module.
    starting = [e for e in entries if e.get("@message") == "fixture plugin starting"]
    assert len(starting) == 3 and all(e["@level"] == "warn" for e in starting)
    assert all(e["devices"] == 2 for e in starting)
    # The fixture's print went to stderr (a plain line, logged at debug), never to stdout:
    # stdout output would have broken the handshake or shown as "unrecognized".
    stray = [e for e in entries if e.get("@message") == "stray output from the fixture plugin"]
    assert len(stray) == 3 and all(e["@level"] == "debug" for e in stray)
    assert not any("Unrecognized remote plugin message" in str(e) for e in entries)
    # Nothing the plugin logs as JSON falls back to plain text (that would mean a bad line).
    plain = [e for e in entries if str(e.get("@message", "")).startswith('{"@level"')]
    assert plain == []


def test_fingerprint_stream_sends_a_message_per_change(
    go_host: host.GoPluginHost, launched: dict[str, Any]
) -> None:
    first = go_host.request("fingerprint_next", timeout_ms=5000)
    groups = first["message"]["device_group"]
    assert [(g["vendor"], g["device_type"], g["device_name"]) for g in groups] == [
        ("nvidia", "gpu", fixture_plugin.MODEL)
    ]
    devices = {d["ID"]: d for d in groups[0]["devices"]}
    assert set(devices) == set(fixture_plugin.DEVICE_IDS)
    assert all(d["healthy"] for d in devices.values())
    assert groups[0]["attributes"]["memory"] == {"int_val": "81920", "unit": "MiB"}
    assert devices["0000:3b:00.0"]["hw_locality"] == {"pci_bus_id": "0000:3b:00.0"}
    # Nothing more until something changes.
    quiet = go_host.request("fingerprint_next", timeout_ms=300)
    assert quiet["code"] == "Timeout"
    sent = time.time_ns()
    os.kill(launched["stages"][-1]["pid"], signal.SIGUSR1)
    second = go_host.request("fingerprint_next", timeout_ms=5000)
    latency_ms = (second["received_unix_ns"] - sent) / 1e6
    changed = {d["ID"]: d for d in second["message"]["device_group"][0]["devices"]}
    assert "healthy" not in changed["0000:86:00.0"]  # false is left out of the JSON
    assert "SIGUSR1" in changed["0000:86:00.0"]["health_description"]
    assert changed["0000:3b:00.0"]["healthy"] is True
    _keep("fingerprint_change_latency_ms", round(latency_ms, 2))


def test_reserve_returns_the_reservation_or_the_plugins_error(
    go_host: host.GoPluginHost, launched: dict[str, Any]
) -> None:
    reserved = go_host.request("reserve", ids=["0000:3b:00.0", "0000:86:00.0"])
    res = reserved["message"]["container_res"]
    assert res["envs"] == {"FIXTURE_VISIBLE_DEVICES": "0000:3b:00.0,0000:86:00.0"}
    assert [d["host_path"] for d in res["devices"]] == ["/dev/fixture0", "/dev/fixture1"]
    assert res["devices"][0]["permissions"] == "rw"
    assert res["mounts"] == [
        {"task_path": "/usr/lib/fixture", "host_path": "/usr/lib/fixture", "read_only": True}
    ]
    unknown = go_host.request("reserve", ids=["0000:00:00.0"])
    assert unknown["code"] == "InvalidArgument"
    assert unknown["error"] == "unknown device 0000:00:00.0"
    _keep("reserve_ms", reserved["ms"])


def test_stats_stream_at_the_collection_interval(
    go_host: host.GoPluginHost, launched: dict[str, Any]
) -> None:
    first = go_host.request("stats_next", interval_ms=200, timeout_ms=5000)
    second = go_host.request("stats_next", interval_ms=200, timeout_ms=5000)
    gap_ms = (second["received_unix_ns"] - first["received_unix_ns"]) / 1e6
    group = second["message"]["groups"][0]
    assert [group["vendor"], group["type"], group["name"]] == [
        "nvidia",
        "gpu",
        fixture_plugin.MODEL,
    ]
    stats = group["instance_stats"]["0000:86:00.0"]
    # Wrapper types arrive as plain values; a fraction keeps its denominator.
    assert stats["summary"]["float_numerator_val"] == 2048
    assert stats["summary"]["float_denominator_val"] == fixture_plugin.MEMORY_MIB
    assert stats["summary"]["unit"] == "MiB"
    assert stats["stats"]["attributes"]["Power usage"]["unit"] == "W"
    assert "timestamp" in stats
    # One sample per interval: the fixture counts them in its power figure.
    power = [
        int(m["message"]["groups"][0]["instance_stats"]["0000:86:00.0"]["stats"]["attributes"][
            "Power usage"]["int_numerator_val"])
        for m in (first, second)
    ]  # fmt: skip
    assert power[1] == power[0] + 1
    _keep("stats_gap_at_200ms_interval_ms", round(gap_ms, 1))


def test_set_config_refusals_reach_the_host(
    go_host: host.GoPluginHost, launched: dict[str, Any]
) -> None:
    # Refused by the schema before the plugin sees it, as Nomad would.
    wrong_type = go_host.request("set_config", config={"socket": ["not", "a", "string"]})
    assert wrong_type["code"] == "ConfigRefusedByNomad", wrong_type
    unknown = go_host.request("set_config", config={"sockets": "/x"})
    assert "Unsupported argument" in unknown["error"]
    # Refused by the plugin, with its sentence.
    relative = go_host.request("set_config", config={"socket": "relative.sock"})
    assert relative["code"] == "InvalidArgument"
    assert relative["error"] == "socket must be an absolute path, not 'relative.sock'"
    garbage = go_host.request("set_config", raw_msgpack_b64="wQ==")  # 0xc1: never valid
    assert garbage["code"] == "InvalidArgument"
    assert "MessagePack" in garbage["error"]
    assert go_host.request("set_config", config=CONFIG)["ok"] is True


def test_a_config_the_plugin_refuses_fails_the_validation_launch(
    go_host: host.GoPluginHost,
) -> None:
    result = go_host.request("launch", cmd=FIXTURE, config={"socket": "relative"}, dir=str(REPO))
    assert result["stage"] == "validate"
    assert result["code"] == "InvalidArgument"
    assert [s["stage"] for s in result["stages"]] == ["fingerprint", "validate"]
    assert not any(e.get("@message") == GRACELESS for e in _entries(go_host))
    # Nothing is left running: the next command has no plugin to talk to.
    assert "launch first" in go_host.request("ping")["error"]
