"""``hotplug-monitor exporter``: the Prometheus exporter, a process of its own that imports the
exporter and nothing of the daemon."""

from __future__ import annotations

import argparse
import sys

from monitor.cli.parser import PROG
from monitor.wire.paths import client_socket


def exporter(args: argparse.Namespace) -> int:
    try:
        from monitor.adapters.exporter import run
    except ImportError as exc:  # the exporter extra is not installed
        print(
            f"{PROG}: error: exporter needs the exporter extra: "
            f"pip install 'hotplug-monitor[exporter]' ({exc})",
            file=sys.stderr,
        )
        return 1
    return run.main(args.socket or client_socket(), args.listen)
