"""Protocol fuzzing: hypothesis against a running daemon on its real socket.

Every generated input goes to the daemon on a fresh connection (half of them subscribed first),
followed by a sentinel request. What must hold for each: every line that comes back is a well-formed
JSON-RPC message, errors carry our codes and never "internal error", a request that names an id
gets exactly one answer with that id and in order, notifications get none, and the sentinel is
answered. Across the run: the daemon lives, holds no more file descriptors than before, and a
bystander subscriber's mirror still equals the snapshot.

HOTPLUG_FUZZ_EXAMPLES sets the examples per test (CI: the default; more for a long run).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Daemon, Subscription
from tests.reliability import record
from tests.sysfs import reservable

EXAMPLES = int(os.environ.get("HOTPLUG_FUZZ_EXAMPLES", "2500"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
OUR_CODES = {-32700, -32600, -32601, -32602, -32001, -32002, -32003, -32004}
METHODS = ["fingerprint", "subscribe", "reserve", "release", "leases"]
PARAM_NAMES = ["device_ids", "holder_pid", "bind", "reservation_id"]
SENTINEL = b'{"jsonrpc":"2.0","id":"sentinel","method":"leases"}\n'
NO_REPLY = object()


class Fuzzed:
    """The daemon under fuzz, a subscriber that watches it, and counts of what was sent."""

    def __init__(self, daemon: Daemon, bystander: Subscription, devices: list[str]) -> None:
        self.daemon = daemon
        self.bystander = bystander
        self.devices = devices
        self.fds = daemon.fd_count()
        self.inputs = 0
        self.replies = 0

    def exchange(
        self, chunks: list[bytes], expected: list[Any] | None, subscribed: bool
    ) -> list[dict[str, Any]]:
        """Send ``chunks`` on a new connection, then the sentinel; every reply before it."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(self.daemon.socket))
            reader = sock.makefile("rb")
            if subscribed:
                sock.sendall(b'{"jsonrpc":"2.0","id":"sub","method":"subscribe"}\n')
                assert "snapshot" in json.loads(reader.readline())["result"]
            for chunk in chunks:
                sock.sendall(chunk)
            sock.sendall(b"\n" + SENTINEL)
            replies: list[dict[str, Any]] = []
            while True:
                line = reader.readline()
                assert line.endswith(b"\n"), f"connection closed early after {replies}"
                message = well_formed(json.loads(line))
                if "method" in message:
                    continue  # a notification of our subscription
                if message["id"] == "sentinel" and "result" in message:
                    break
                replies.append(message)
            reader.close()
        self.replies += len(replies)
        if expected is not None:
            assert [r["id"] for r in replies] == expected, (chunks, replies)
        return replies


def well_formed(message: Any) -> dict[str, Any]:
    assert isinstance(message, dict) and message.get("jsonrpc") == "2.0", message
    if "method" in message:
        assert message["method"] == "fingerprint" and "generation" in message["params"]
        return message
    assert ("result" in message) != ("error" in message), message
    if "error" in message:
        error = message["error"]
        assert error["code"] in OUR_CODES, message  # never -32603, "internal error"
        assert isinstance(error["message"], str) and error["message"], message
    return message


@pytest.fixture
def fuzzed(
    start_daemon: Callable[..., Daemon], subscribe: Callable[[Daemon], Subscription]
) -> Iterator[Fuzzed]:
    devices, flags = reservable()
    daemon = start_daemon(*flags)
    target = Fuzzed(daemon, subscribe(daemon), devices)
    yield target
    # the daemon lives, every connection it had for us is closed once the leases it granted
    # (whose holder processes it watches through a pidfd each) are released, and the bystander
    # is in step
    assert daemon.process.poll() is None, daemon.log()
    with daemon.client() as client:
        for lease in client.call("leases")["leases"]:
            client.call("release", {"reservation_id": lease["reservation_id"]})
        snapshot = client.call("fingerprint")
    after = daemon.settle_fds(target.fds)
    assert after <= target.fds, f"{after} fds, {target.fds} before"
    target.bystander.until(lambda m: m.generation == snapshot["generation"])
    assert target.bystander.mirror.snapshot == snapshot["snapshot"]
    assert "Traceback" not in daemon.log() and "internal error" not in daemon.log()


# --- strategies ---------------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=30,
)


def device_id_lists(devices: list[str]) -> st.SearchStrategy[Any]:
    ids = st.sampled_from([*devices, "0000:ee:00.0", "GPU-nope", "", "\x00", "\ud800"])
    return st.lists(ids | st.text(max_size=16), max_size=8)


@st.composite
def requests(draw: st.DrawFn, devices: list[str]) -> Any:
    """A JSON-RPC request that is right in most places and wrong in a few."""
    message: dict[str, Any] = {}
    if draw(st.integers(0, 9)):
        message["jsonrpc"] = draw(st.sampled_from(["2.0", "2.0", "2.0", "1.0", 2.0, None]))
    if draw(st.integers(0, 5)):
        message["id"] = draw(st.integers(-(2**63), 2**63) | st.text(max_size=20) | json_values)
    if draw(st.integers(0, 9)):
        message["method"] = draw(st.sampled_from(METHODS) | st.text(max_size=12) | json_values)
    if draw(st.booleans()):
        names = draw(st.lists(st.sampled_from(PARAM_NAMES) | st.text(max_size=8), max_size=3))
        params: dict[str, Any] = {}
        for name in names:
            if name == "device_ids":
                params[name] = draw(device_id_lists(devices) | json_values)
            elif name == "holder_pid":
                params[name] = draw(st.sampled_from([os.getpid(), 1, 0, -1, 2**40]) | json_values)
            elif name == "bind":
                params[name] = draw(st.sampled_from(["connection", "process"]) | json_values)
            else:
                params[name] = draw(json_values)
        message["params"] = draw(st.just(params) | json_values) if draw(st.booleans()) else params
    for junk in draw(st.lists(st.text(max_size=8), max_size=2)):
        message.setdefault(junk, draw(json_values))
    return draw(st.just(message) | st.lists(st.just(message), max_size=3) | json_values)


def expected_reply(message: Any) -> Any:
    """The id the answer to ``message`` carries (JSON-RPC 2.0), or NO_REPLY for a notification."""
    if not isinstance(message, dict):
        return None  # not a request at all (batches included: we refuse them)
    request_id = message.get("id")
    if not isinstance(request_id, str | int | None) or isinstance(request_id, bool):
        return None
    if (
        message.get("jsonrpc") != "2.0"
        or not isinstance(message.get("method"), str)
        or not isinstance(message.get("params", {}), dict)
    ):
        return request_id
    return request_id if "id" in message else NO_REPLY


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


# --- the fuzz tests -------------------------------------------------------------------------


def test_fuzzed_requests_get_one_right_answer_each(fuzzed: Fuzzed) -> None:
    @FUZZ
    @given(
        messages=st.lists(requests(fuzzed.devices), min_size=2, max_size=4),
        cuts=st.lists(st.integers(0, 10_000), max_size=4),
        subscribed=st.booleans(),
    )
    def exchange(messages: list[Any], cuts: list[int], subscribed: bool) -> None:
        data = b"".join(json.dumps(m).encode() + b"\n" for m in messages)
        expected = [e for e in map(expected_reply, messages) if e is not NO_REPLY]
        fuzzed.inputs += len(messages)
        fuzzed.exchange(split(data, cuts), expected, subscribed)

    exchange()
    assert fuzzed.inputs >= 2 * EXAMPLES  # two at least in each example: 10,000 in CI
    record(
        "Protocol",
        "Generated requests: wrong types in every field, unknown methods and params, "
        "batches, real and bogus device IDs, split across writes, half on subscribed connections",
        f"{fuzzed.inputs:,} requests",
        f"{fuzzed.replies:,} answers, each with the request's id, in order, none internal errors; "
        "daemon up, no fd leaked, bystander in step",
    )


def test_fuzzed_bytes_get_well_formed_answers(fuzzed: Fuzzed) -> None:
    lines = st.one_of(
        st.binary(max_size=200),
        st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.builds(lambda n, c: c * n, st.integers(1, 200_000), st.sampled_from([b"[", b'{"a":'])),
        st.builds(
            lambda head, bad: head + bad + b'"}',
            st.just(b'{"jsonrpc":"2.0","id":1,"method":"'),
            st.binary(min_size=1, max_size=8),
        ),
    )

    @FUZZ
    @given(
        payload=st.lists(lines, min_size=2, max_size=4),
        subscribed=st.booleans(),
        truncate=st.booleans(),
    )
    def exchange(payload: list[bytes], subscribed: bool, truncate: bool) -> None:
        fuzzed.inputs += len(payload)
        if truncate:  # the connection ends in the middle of a line
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(str(fuzzed.daemon.socket))
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    sock.sendall(b"\n".join(payload))
            return
        fuzzed.exchange([b"\n".join(payload)], None, subscribed)

    exchange()
    assert fuzzed.inputs >= 2 * EXAMPLES
    record(
        "Protocol",
        "Random bytes, invalid UTF-8 and lone surrogates, arbitrary JSON, nesting 200,000 deep, "
        "lines cut off by a closed connection",
        f"{fuzzed.inputs:,} lines",
        f"{fuzzed.replies:,} answers, all well-formed JSON-RPC, none internal errors; "
        "daemon up, no fd leaked, bystander in step",
    )


def test_huge_arrays_and_oversized_lines(fuzzed: Fuzzed) -> None:
    answers = []
    for count in (1_025, 30_000, 65_000):  # the largest is just under 1 MiB
        ids = [fuzzed.devices[0]] * count
        body = {"jsonrpc": "2.0", "id": count, "method": "reserve", "params": {"device_ids": ids}}
        line = json.dumps(body).encode() + b"\n"
        assert len(line) <= 1 << 20
        answers += fuzzed.exchange([line], [count], subscribed=False)
    assert all(a["error"]["code"] == -32602 for a in answers), answers
    closed = 0
    for size in (1 << 20 | 1, 8 << 20):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(fuzzed.daemon.socket))
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(b"[" * size)
            reader = sock.makefile("rb")
            assert json.loads(reader.readline())["error"]["code"] == -32600
            closed += reader.readline() == b""
            reader.close()
    assert closed == 2
    fuzzed.inputs += 5
    record(
        "Protocol",
        "device_ids arrays of 1,025 (the cap is 1,024) to 65,000 entries; "
        "lines of 1 MiB + 1 and 8 MiB",
        "5 requests",
        "arrays refused with -32602; over-long lines refused with -32600, then closed",
    )
