"""go-plugin's server side (monitor.adapters.nomad.goplugin) and the proto generator, by plain
calls: version negotiation, the handshake line, hclog's JSON lines, which generated files differ."""

from __future__ import annotations

import json
import logging
import re

from monitor.adapters.nomad import goplugin
from tests.nomad import generate


def test_generator_names_missing_stale_and_left_over_files() -> None:
    wanted = {"a_pb2.py": b"new", "b_pb2.py": b"same"}
    present = {"a_pb2.py": b"old", "b_pb2.py": b"same", "c_pb2.py": b"gone"}
    assert generate.differences(wanted, present) == ["a_pb2.py", "c_pb2.py"]
    assert generate.differences(wanted, {"b_pb2.py": b"same"}) == ["a_pb2.py"]


def test_version_negotiation_picks_highest_shared_else_our_lowest() -> None:
    assert goplugin.negotiate_version("1,2,3", (2,)) == 2
    assert goplugin.negotiate_version("2, 3", (2, 3)) == 3
    assert goplugin.negotiate_version("x,2", (2,)) == 2
    # No overlap: answer our own, so the host names the mismatch.
    assert goplugin.negotiate_version("5", (2, 3)) == 2
    assert goplugin.negotiate_version(None, (2,)) == 2


def test_handshake_line_fields() -> None:
    assert goplugin.handshake_line(2, "/s/plugin.sock", multiplex_asked=False) == (
        "1|2|unix|/s/plugin.sock|grpc"
    )
    assert goplugin.handshake_line(2, "/s/p", multiplex_asked=True) == "1|2|unix|/s/p|grpc||false"


def test_log_lines_have_hclog_fields_and_gos_timestamp_layout() -> None:
    record = logging.LogRecord("fixture", 30, __file__, 1, "disk %s", ("full",), None)
    record.device = "0000:3b:00.0"
    entry = json.loads(goplugin.HclogJsonFormatter().format(record))
    assert entry["@level"] == "warn"
    assert entry["@message"] == "disk full"
    assert entry["@module"] == "fixture"
    assert entry["device"] == "0000:3b:00.0"
    # go-plugin parses 2006-01-02T15:04:05.000000Z07:00; anything else is logged as plain text.
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", entry["@timestamp"])
    levels = {5: "trace", 10: "debug", 20: "info", 30: "warn", 40: "error", 50: "error"}
    for number, name in levels.items():
        assert goplugin._hclog_level(number) == name
