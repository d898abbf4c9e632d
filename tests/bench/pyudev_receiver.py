"""pyudev receiving udev events in its own process: the floor for scenario 2.

Run under umockdev's preload with ``UMOCKDEV_DIR``; prints ``ready``, then for each PCI uevent
``t_ns action ERROR_EVENT``, stamped (CLOCK_MONOTONIC) as soon as pyudev hands the device over.
"""

from __future__ import annotations

import signal
import sys
import time

import pyudev


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="udev")
    monitor.filter_by("pci")
    monitor.start()
    print("ready", flush=True)
    while True:
        device = monitor.poll()
        stamp = time.monotonic_ns()
        if device is not None:
            print(f"{stamp} {device.action} {device.get('ERROR_EVENT', '-')}", flush=True)


if __name__ == "__main__":
    main()
