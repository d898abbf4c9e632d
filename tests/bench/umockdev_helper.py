"""The umockdev helper of ``monitor.sim.testbed`` with one addition: each reply carries the
CLOCK_MONOTONIC time at which the helper started the command (for pci_error: two property sets,
then ``umockdev_testbed_uevent``), so latencies start at the emitter, not at our pipe to it.

Run as ``python -m tests.bench.umockdev_helper`` under ``LD_PRELOAD=libumockdev-preload.so.0``.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from monitor.sim.testbed import Helper


def main() -> None:
    helper = Helper()
    print(json.dumps({"root": helper.bed.root}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        op = command.pop("op")
        stamp = time.monotonic_ns()
        try:
            getattr(helper, op)(**command)
            reply: dict[str, Any] = {"ok": True, "t": stamp}
        except Exception as exc:  # reported to the driving process, which raises it
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
