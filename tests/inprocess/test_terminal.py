"""Everything the commands print passes one filter: a daemon (or whatever answers on its socket)
that sends escape sequences in names, health or errors cannot clear the screen, retitle the
window or hide a line; the person sees them escaped."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from monitor.cli import main
from monitor.core.text import for_terminal

ESCAPES = "\x1b[2J\x1b]0;pwned\x07\x9b"
NAME = f"H100{ESCAPES}"
ADDRESS = "0000:3b:00.0"
DEVICE = {
    "id": ADDRESS,
    "healthy": False,
    "health_desc": f"wedged{ESCAPES}",
    "hw_locality": {"pci_bus_id": ADDRESS},
    "attributes": {"driver": {"value": f"nvidia{ESCAPES}"}},
}
GROUP = {"vendor": "nvidia", "type": "gpu", "name": NAME, "attributes": {}}
ANSWERS: dict[str, Any] = {
    "fingerprint": {
        "generation": 1,
        "snapshot": {"groups": {f"nvidia/gpu/{NAME}": {**GROUP, "devices": {ADDRESS: DEVICE}}}},
    },
    "leases": {
        "leases": [
            {
                "reservation_id": "r-1",
                "devices": {ADDRESS: f"nvidia/gpu/{NAME}"},
                "uid": 0,
                "gid": 0,
                "pid": 1,
                "created": 1.0,
                "holder_pid": None,
                "owner": None,
                "bind": None,
                "orphaned": [],
            }
        ]
    },
}


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Path]:
    """A socket that answers ``ANSWERS`` by method, and refuses anything else with a message
    full of escapes, until the client hangs up."""
    path = tmp_path / "monitor.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # closed: the test is over
                return
            with conn, conn.makefile("rb") as lines:
                for line in lines:
                    request = json.loads(line)
                    if request["method"] in ANSWERS:
                        reply = {"result": ANSWERS[request["method"]]}
                    else:
                        error = {"code": -32003, "message": f"Held by {ESCAPES}", "data": None}
                        reply = {"error": error}
                    reply |= {"jsonrpc": "2.0", "id": request["id"]}
                    conn.sendall(json.dumps(reply).encode() + b"\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path
    server.close()


def test_the_filter_escapes_every_control_character_and_keeps_lines() -> None:
    assert for_terminal(f"a{ESCAPES}\nb\tc") == "a\\x1b[2J\\x1b]0;pwned\\x07\\x9b\nb\\tc"


@pytest.mark.parametrize(
    "command", [["devices"], ["leases"], ["reserve", ADDRESS], ["release", ADDRESS]]
)
def test_no_command_prints_a_control_character(
    daemon: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    status = main([*command, "--socket", str(daemon)])
    out, err = capsys.readouterr()
    printed = out + err
    assert status == (0 if command[0] in ("devices", "leases") else 1), printed
    assert not any(ch in printed for ch in ESCAPES if not ch.isprintable()), printed
    if command[0] != "leases":  # its table names no group
        assert "\\x1b[2J\\x1b]0;pwned\\x07\\x9b" in printed  # shown, escaped
