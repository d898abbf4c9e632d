"""``hotplug-monitor kubelet-plugin``, apart from the other commands: it imports the plugin (and
gRPC) only when asked for, and says in one line when the kubelet extra is missing."""

from __future__ import annotations

import argparse

from monitor.cli.parser import PROG, missing_extra
from monitor.cli.terminal import say


def kubelet_plugin(args: argparse.Namespace) -> int:
    try:
        from monitor.adapters.kubelet import options, plugin
    except ImportError as exc:  # the kubelet extra is not installed
        return missing_extra("kubelet-plugin", "kubelet", exc)
    try:
        settings = options.build(
            socket=args.socket,
            kubelet_dir=args.kubelet_dir,
            pod_resources_socket=args.pod_resources_socket,
            resources=args.resource or (),
            only_listed=args.only_listed,
            ignore_devices=args.ignore_device or (),
            reconcile_interval=args.reconcile_interval,
            cdi=not args.no_cdi,
            mig_strategy=args.mig_strategy,
        )
    except options.OptionError as exc:
        say(f"{PROG}: error: {exc}", err=True)
        return 2
    return plugin.run(settings)
