"""The commands people type: ``hotplug-monitor serve``, its clients, and the demo."""

from __future__ import annotations

from collections.abc import Sequence

from monitor.cli.parser import PROG, build_parser
from monitor.cli.terminal import say
from monitor.daemon.config import ConfigError
from monitor.wire.errors import DaemonUnavailable, RpcError
from monitor.wire.reservations import BadAnswer


def main(argv: Sequence[str] | None = None) -> int:
    parser, commands = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the command's own parser, so that its usage is the one shown
        commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "nomad-plugin":
        # Nomad starts it three times whenever its client starts: it imports only what it uses.
        from monitor.cli.nomad import nomad_plugin

        return nomad_plugin(args)
    if args.command == "exporter":
        from monitor.cli.exporter import exporter

        return exporter(args)
    if args.command == "kubelet-plugin":
        from monitor.cli.kubelet import kubelet_plugin

        return kubelet_plugin(args)
    from monitor.cli.commands import COMMANDS, CliError

    try:
        COMMANDS[args.command](args)
    except (CliError, ConfigError, DaemonUnavailable, BadAnswer) as exc:
        say(f"{PROG}: error: {exc}", err=True)
        return 1
    except RpcError as exc:
        say(f"{PROG}: {exc.message}", err=True)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    return 0
