"""The protocol without I/O: the server's line framing and request parsing; the client's
framing, mirror and backoff."""

from __future__ import annotations

import pytest

from monitor.wire.backoff import Backoff
from monitor.wire.errors import RpcError
from monitor.wire.framing import (
    ClientProtocol,
    LineBuffer,
    LineTooLong,
    Notification,
    ProtocolError,
    Response,
    parse_request,
)
from monitor.wire.mirror import Gap, Mirror
from monitor.wire.requests import release, reserve


def test_requests_get_ids_and_messages_come_whole_however_the_bytes_are_cut() -> None:
    protocol = ClientProtocol()
    first, data = protocol.request("fingerprint")
    call = reserve(["0000:3b:00.0"])
    second, _ = protocol.request(call.method, call.params)
    assert (first, second) == (1, 2)
    assert data == b'{"jsonrpc":"2.0","id":1,"method":"fingerprint","params":{}}\n'
    stream = (
        b'{"jsonrpc":"2.0","method":"fingerprint","params":{"generation":2}}\n'
        b'{"jsonrpc":"2.0","id":1,"result":{"generation":2}}\n'
        b'{"jsonrpc":"2.0","id":2,"error":{"code":-32003,"message":"Already reserved.",'
        b'"data":{"device_ids":["0000:3b:00.0"]}}}\n'
    )
    messages = [m for i in range(0, len(stream), 7) for m in protocol.receive(stream[i : i + 7])]
    assert messages[0] == Notification("fingerprint", {"generation": 2})
    assert messages[1] == Response(1, {"generation": 2})
    with pytest.raises(RpcError) as refused:
        messages[2].value()  # type: ignore[union-attr]
    assert (refused.value.code, refused.value.data) == (-32003, {"device_ids": ["0000:3b:00.0"]})
    for garbage in (b"nope\n", b"[1]\n", b'{"jsonrpc":"2.0","id":3}\n'):
        with pytest.raises(ProtocolError):
            protocol.receive(garbage)


def test_request_builders_name_each_param_once() -> None:
    call = reserve(["a"], holder_pid=7, owner="kubelet")
    assert (call.method, call.params) == (
        "reserve", {"device_ids": ["a"], "holder_pid": 7, "owner": "kubelet"}
    )  # fmt: skip
    assert release(reservation_id="r").params == {"reservation_id": "r"}
    assert release(owner="nomad").params == {"owner": "nomad"}


def test_the_mirror_applies_patches_in_order_and_detects_a_gap() -> None:
    mirror = Mirror({"generation": 1, "snapshot": {"groups": {"g": {"devices": {"a": {}}}}}})
    mirror.apply({"base": 1, "generation": 2, "patch": {"groups": {"g": {"devices": {"b": {}}}}}})
    assert set(mirror.devices()) == {"a", "b"}
    copy = mirror.copy()
    with pytest.raises(Gap):
        mirror.apply({"base": 1, "generation": 3, "patch": {"groups": {"g": None}}})
    mirror.apply({"generation": 9, "snapshot": {"groups": {}}})  # a full snapshot after a drop
    assert mirror.generation == 9 and mirror.devices() == {} and set(copy.devices()) == {"a", "b"}


def test_backoff_doubles_up_to_its_most_and_starts_over_after_a_success() -> None:
    backoff = Backoff(first=0.1, most=0.5)
    assert [backoff.delay() for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    backoff.reset()
    assert backoff.delay() == 0.1


# --- the server's side ------------------------------------------------------------------


def test_line_buffer_splits_and_limits() -> None:
    buffer = LineBuffer(limit=8)
    assert buffer.feed(b"ab") == []
    assert buffer.feed(b"c\nde\nf") == [b"abc", b"de"]
    assert buffer.feed(b"\n") == [b"f"]
    with pytest.raises(LineTooLong):
        buffer.feed(b"123456789")
    with pytest.raises(LineTooLong):  # a long line between two short ones, in one read
        LineBuffer(limit=8).feed(b"1234567\n123456789\n12\n")


def test_parse_request_keeps_the_id_of_an_invalid_request() -> None:
    with pytest.raises(RpcError) as caught:
        parse_request(b'{"id": "abc", "method": "fingerprint"}')
    assert caught.value.request_id == "abc" and caught.value.code == -32600
    request = parse_request(b'{"jsonrpc": "2.0", "id": 3, "method": "fingerprint"}')
    assert (request.id, request.method, request.params) == (3, "fingerprint", {})
