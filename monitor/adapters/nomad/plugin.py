"""``hotplug-monitor nomad-plugin``: the process Nomad's client starts from its ``plugin_dir``
(three times: to fingerprint the plugin, to validate its config, and to run it)."""

from __future__ import annotations

import logging
from functools import partial

import attrs
import grpc

from monitor.adapters.nomad import goplugin
from monitor.adapters.nomad.config import Overrides
from monitor.adapters.nomad.protos import base_pb2_grpc, device_pb2_grpc
from monitor.adapters.nomad.servicers import BasePlugin, DevicePlugin, PluginState

log = logging.getLogger("nomad-plugin")

# What a person who runs it by hand is told (Nomad always sets its cookie).
HANDSHAKE = attrs.evolve(
    goplugin.NOMAD,
    not_a_host_hint=(
        "hotplug-monitor nomad-plugin is a HashiCorp Nomad device plugin, started by the Nomad "
        "client, not by hand: put a script that runs it in the client's plugin_dir and name "
        "that script in a plugin block of the client's configuration (docs/nomad.md)."
    ),
)


def _said_at_start(state: PluginState, server: grpc.aio.Server) -> None:
    if state.flag_error is not None:
        log.error("the plugin's args are refused", extra={"reason": state.flag_error})


def registrars(state: PluginState) -> list[goplugin.Registrar]:
    return [
        partial(base_pb2_grpc.add_BasePluginServicer_to_server, BasePlugin(state)),
        partial(device_pb2_grpc.add_DevicePluginServicer_to_server, DevicePlugin(state)),
        partial(_said_at_start, state),
    ]


def run(flags: Overrides) -> int:
    """Serve Nomad until it shuts the plugin down; the process's exit status."""
    return goplugin.main(registrars(PluginState(flags)), handshake=HANDSHAKE)
