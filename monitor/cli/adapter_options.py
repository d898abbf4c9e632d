"""The command lines of the adapters: the Nomad plugin, the exporter and the kubelet plugin."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TypeAlias

from monitor.wire.paths import SYSTEM_SOCKET

Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

CLIENT_SOCKET_HELP = (
    f"the daemon's socket (default: your own daemon's if it runs, else {SYSTEM_SOCKET})"
)


def nomad_plugin(commands: Commands) -> argparse.ArgumentParser:
    plugin: argparse.ArgumentParser = commands.add_parser(
        "nomad-plugin",
        help="serve the daemon's devices to Nomad as an external device plugin",
        description="A HashiCorp Nomad device plugin: the Nomad client starts it from its "
        "plugin_dir (never by hand) and speaks to it over go-plugin's gRPC. It reports the "
        "daemon's devices and their health at every change, reserves devices for tasks "
        "(leases of owner 'nomad'), and passes on the daemon's device statistics. The same "
        "settings may come in the plugin block's config (socket, ignored_device_ids, groups, "
        "nomad_address, nomad_token_file, reconcile_interval); "
        "these flags, given in its args, win.",
    )
    plugin.add_argument(
        "--socket",
        type=Path,
        metavar="PATH",
        help=f"the daemon's socket (config: socket; default: {SYSTEM_SOCKET})",
    )
    plugin.add_argument(
        "--ignore-device",
        action="append",
        metavar="ID",
        help="leave a device out: PCI address, GPU UUID (its MIG instances too) or MIG UUID; "
        "repeatable (config: ignored_device_ids; default: none)",
    )
    plugin.add_argument(
        "--offer",
        action="append",
        metavar="GROUP",
        help="offer only these groups: TYPE, VENDOR/TYPE or VENDOR/TYPE/NAME as in a job's "
        "device block; repeatable (config: groups; default: every group)",
    )
    plugin.add_argument(
        "--nomad-address",
        metavar="URL",
        help="the local Nomad agent's HTTP API, asked which allocations still run so that the "
        "leases of ended tasks end (config: nomad_address; default: http://127.0.0.1:4646)",
    )
    plugin.add_argument(
        "--nomad-token-file",
        type=Path,
        metavar="PATH",
        help="a file holding the ACL token for it, if ACLs are on (needs node:read; "
        "config: nomad_token_file; default: none)",
    )
    plugin.add_argument(
        "--reconcile-interval",
        type=float,
        metavar="SECONDS",
        help="how often to reconcile; 0 turns it off (config: reconcile_interval; default: 30)",
    )
    return plugin


def exporter(commands: Commands) -> argparse.ArgumentParser:
    exporter: argparse.ArgumentParser = commands.add_parser(
        "exporter",
        help="serve the daemon's devices, health and telemetry to Prometheus (/metrics)",
        description="A Prometheus exporter: a process of its own (run it as an unprivileged "
        "user in the daemon's group, never as root) that subscribes to the daemon and serves "
        "the Prometheus text format at /metrics: each device's identity, health, reservation, "
        "XIDs and telemetry, and the daemon's own counters. A scrape answers from what the "
        "exporter already holds: while the daemon is away it answers hotplug_monitor_up 0 and "
        "the last known devices, marked stale. Needs the exporter extra.",
    )
    exporter.add_argument("--socket", type=Path, metavar="PATH", help=CLIENT_SOCKET_HELP)
    exporter.add_argument(
        "--listen",
        default="localhost:10082",
        metavar="HOST:PORT",
        help="where to serve HTTP: HOST:PORT, [IPV6]:PORT, or :PORT for every address "
        "(default: localhost:10082)",
    )
    exporter.add_argument(
        "--head-timeout",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="a request's head must arrive within this many seconds of its first byte, else "
        "the connection is closed (default: 2; at most 10)",
    )
    return exporter


def kubelet_plugin(commands: Commands) -> argparse.ArgumentParser:
    plugin: argparse.ArgumentParser = commands.add_parser(
        "kubelet-plugin",
        help="serve the daemon's devices to the kubelet as a Kubernetes device plugin",
        description="A Kubernetes device plugin (API v1beta1), run beside the kubelet (as "
        "hotplug-monitor-kubelet-plugin.service). Each daemon group becomes a resource "
        "(default hotplug-monitor.io/VENDOR-TYPE, e.g. hotplug-monitor.io/nvidia-gpu), served "
        "on a socket in the kubelet's plugin directory and registered with its kubelet.sock. "
        "ListAndWatch reports every change (hotplug, health both ways, devices held outside "
        "Kubernetes as Unhealthy) with each device's NUMA node; Allocate reserves the devices "
        "(leases of owner 'kubelet'), which end once the kubelet's PodResources no longer "
        "lists them. A kubelet restart makes it register again; it never exits for one.",
    )
    plugin.add_argument(
        "--socket",
        type=Path,
        metavar="PATH",
        help=f"the daemon's socket (default: {SYSTEM_SOCKET})",
    )
    plugin.add_argument(
        "--kubelet-dir",
        type=Path,
        metavar="DIR",
        help="the kubelet's device plugin directory, with its kubelet.sock "
        "(default: /var/lib/kubelet/device-plugins)",
    )
    plugin.add_argument(
        "--pod-resources-socket",
        type=Path,
        metavar="PATH",
        help="the kubelet's PodResources socket, to end the leases of containers that are gone "
        "(default: /var/lib/kubelet/pod-resources/kubelet.sock)",
    )
    plugin.add_argument(
        "--resource",
        action="append",
        metavar="GROUP=NAME",
        help="offer a group (TYPE, VENDOR/TYPE or VENDOR/TYPE/NAME) as this resource, e.g. "
        "nvidia/gpu=nvidia.com/gpu; GROUP= leaves it out; the first that matches wins; "
        "repeatable (default: hotplug-monitor.io/VENDOR-TYPE for every group)",
    )
    plugin.add_argument(
        "--only-listed",
        action="store_true",
        help="offer only the groups a --resource names (default: every group)",
    )
    plugin.add_argument(
        "--ignore-device",
        action="append",
        metavar="ID",
        help="leave a device out: PCI address, GPU UUID (its MIG instances too) or MIG UUID; "
        "repeatable (default: none)",
    )
    plugin.add_argument(
        "--mig-strategy",
        default="mixed",
        metavar="none|single|mixed",
        help="how MIG instances are offered, as NVIDIA's plugin's strategies: none (not at all; "
        "a GPU with instances is then not offered either, as the daemon does not lease it "
        "whole), single (as the resource of their GPU's group, e.g. "
        "hotplug-monitor.io/nvidia-gpu, when every instance has one profile and no whole GPU "
        "is beside them), mixed (one resource a profile, hotplug-monitor.io/mig-PROFILE, e.g. "
        "hotplug-monitor.io/mig-1g.10gb); a --resource naming their group (e.g. "
        "nvidia/mig=...) wins (default: mixed, which leaves no instance out and lets a pod ask "
        "for the size it needs)",
    )
    plugin.add_argument(
        "--reconcile-interval",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds between two looks at the kubelet's PodResources (default: 10)",
    )
    plugin.add_argument(
        "--no-cdi",
        action="store_true",
        help="leave CDI device names out of Allocate's answer (default: given when the daemon "
        "writes a CDI spec; kubelets without the DevicePluginCDIDevices gate ignore them)",
    )
    return plugin
