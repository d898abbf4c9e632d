"""The daemon with one of its performance fixes turned back off, for before/after rows measured
in the same run: ``python -m tests.bench.tuned serve ...`` with ``HOTPLUG_BENCH_TUNE`` naming
what to change (comma-separated).

- ``gc-default``: Python's default garbage collector settings, as the daemon had them before it
  raised the thresholds and froze its start-up objects (monitor/daemon/app.py ``_tune_gc``).
- ``nodes-uncached``: a stat of every vendor device node on every reservation, as before the
  daemon kept each answer for a second (monitor/core/plan.py ``RecentNodeCheck``).
- ``gclog`` changes nothing: it logs each long or full collection pause to stderr.
"""

from __future__ import annotations

import gc
import os
import runpy
import sys
import time
from typing import Any


def log_gc_pauses() -> None:
    """Changes nothing: writes each full collection, and any collection over 5 ms, to stderr."""
    started = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        pause_ms = (time.perf_counter() - started[0]) * 1000
        if info["generation"] == 2 or pause_ms > 5:
            sys.stderr.write(f"gc pause gen{info['generation']} {pause_ms:.1f} ms\n")

    gc.callbacks.append(callback)


def default_gc() -> None:
    from monitor.daemon import app

    app._tune_gc = lambda: None
    gc.freeze = lambda: None  # the module app calls freeze() on


def uncached_nodes() -> None:
    from monitor.serving import server

    original_init = server.Server.__init__

    def init(self: server.Server, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.node_exists = os.path.exists  # type: ignore[assignment]

    server.Server.__init__ = init  # type: ignore[method-assign]


def main() -> None:
    tunes = {t for t in os.environ.get("HOTPLUG_BENCH_TUNE", "").split(",") if t}
    if "gc-default" in tunes:
        default_gc()
    if "nodes-uncached" in tunes:
        uncached_nodes()
    if "gclog" in tunes:
        log_gc_pauses()
    sys.argv = ["hotplug-monitor", *sys.argv[1:]]
    runpy.run_module("monitor", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
