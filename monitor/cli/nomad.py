"""``hotplug-monitor nomad-plugin``, apart from the other commands: Nomad starts it three times
whenever its client starts, so it imports the plugin and nothing of the rest."""

from __future__ import annotations

import argparse

from monitor.cli.parser import missing_extra


def nomad_plugin(args: argparse.Namespace) -> int:
    try:
        from monitor.adapters.nomad import config, plugin
    except ImportError as exc:  # the nomad extra is not installed
        return missing_extra("nomad-plugin", "nomad", exc)
    return plugin.run(
        config.flags_from(
            args.socket,
            args.ignore_device,
            args.offer,
            args.nomad_address,
            args.nomad_token_file,
            args.reconcile_interval,
        )
    )
