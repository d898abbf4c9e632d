"""``hotplug-monitor exporter``: the Prometheus exporter, a process of its own that imports the
exporter and nothing of the daemon."""

from __future__ import annotations

import argparse

from monitor.cli.parser import missing_extra
from monitor.wire.paths import client_socket


def exporter(args: argparse.Namespace) -> int:
    try:
        from monitor.adapters.exporter import run
    except ImportError as exc:  # the exporter extra is not installed
        return missing_extra("exporter", "exporter", exc)
    return run.main(args.socket or client_socket(), args.listen, args.head_timeout)
