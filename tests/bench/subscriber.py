"""A subscriber in its own process: ``python -m tests.bench.subscriber SOCKET``.

It stamps each notification (CLOCK_MONOTONIC) the moment its line is read, before parsing it,
then applies it to its mirror and prints one line: ``t_ns generation kind devices digest``, kind
``I`` (the subscribe answer), ``P`` (a patch), ``S`` (a full snapshot) or ``E`` (a patch whose
base is not the mirror's generation: a wrong sequence).
"""

from __future__ import annotations

import copy
import json
import signal
import socket
import sys
import time
from typing import Any

import json_merge_patch

from tests.bench.common import digest


def count_devices(snapshot: dict[str, Any]) -> int:
    return sum(len(group["devices"]) for group in snapshot["groups"].values())


def main(path: str) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    reader = sock.makefile("rb", buffering=1 << 16)
    out = sys.stdout
    sock.sendall(b'{"jsonrpc":"2.0","id":1,"method":"subscribe"}\n')
    line = reader.readline()
    stamp = time.monotonic_ns()
    result = json.loads(line)["result"]
    generation: int = result["generation"]
    snapshot: dict[str, Any] = result["snapshot"]
    out.write(f"{stamp} {generation} I {count_devices(snapshot)} {digest(snapshot)}\n")
    out.flush()
    for line in reader:
        stamp = time.monotonic_ns()
        params = json.loads(line)["params"]
        if "snapshot" in params:
            kind, snapshot = "S", params["snapshot"]
        elif params["base"] == generation:
            kind = "P"
            snapshot = json_merge_patch.merge(copy.deepcopy(snapshot), params["patch"])
        else:
            kind = "E"  # reported; the mirror is left as it was
        generation = params["generation"]
        out.write(f"{stamp} {generation} {kind} {count_devices(snapshot)} {digest(snapshot)}\n")
        out.flush()


if __name__ == "__main__":
    main(sys.argv[1])
