"""The commands people type: ``hotplug-monitor serve``, its clients, and the demo.

Every error is one line, ``hotplug-monitor: error: <message>``; the exit status is 2 for a
usage error (argparse's, and ``UsageError``), 1 for a refusal or failure, 130 for Ctrl-C."""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Sequence

from monitor.cli.parser import PROG, build_parser
from monitor.cli.terminal import say
from monitor.daemon.config import ConfigError
from monitor.wire.errors import DaemonUnavailable, RpcError
from monitor.wire.reservations import BadAnswer


def daemon_message(message: str) -> str:
    """A daemon's sentence ("Already reserved: X by R.") in the style of our own errors:
    lower case first (unless it begins with an acronym such as CDI), no closing full stop."""
    if len(message) > 1 and message[0].isupper() and not message[1].isupper():
        message = message[0].lower() + message[1:]
    return message.removesuffix(".")


def _stdout_gone() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush fails no more."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


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
    from monitor.cli.commands import COMMANDS, CliError, UsageError

    try:
        status = COMMANDS[args.command](args)
        sys.stdout.flush()  # here, where a full disk can still be said in one line
    except UsageError as exc:
        commands[args.command].error(str(exc))  # its usage, and exit status 2
    except (CliError, ConfigError, DaemonUnavailable, BadAnswer) as exc:
        say(f"{PROG}: error: {exc}", err=True)
        return 1
    except RpcError as exc:
        say(f"{PROG}: error: {daemon_message(exc.message)}", err=True)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `| head`: the reader has what it wanted
        _stdout_gone()
        return 0
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EFBIG):
            raise
        _stdout_gone()
        say(f"{PROG}: error: cannot write the output: {exc.strerror}", err=True)
        return 1
    return status or 0
