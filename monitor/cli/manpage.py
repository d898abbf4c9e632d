"""``hotplug-monitor(8)``, written from the parser ``--help`` prints, so the two cannot differ.

``python -m monitor.cli.manpage > hotplug-monitor.8`` writes it; install.sh installs it into
/usr/local/share/man/man8. The commands, options and their help come from ``build_parser``; the
sections around them (exit status, files, where the manual is) are the product's own facts.
"""

from __future__ import annotations

import argparse
import sys

from monitor.cli.parser import PROG, build_parser, version
from monitor.wire.paths import SYSTEM_SOCKET

DOCS = "/usr/local/share/doc/hotplug-monitor"  # where install.sh puts the README and docs/
EXIT_STATUS = (
    ("0", "done (also when stdout was closed early, as by | head)"),
    (
        "1",
        "a refusal or failure: the daemon said no, no daemon answers, a setting it cannot "
        "use, stdout full",
    ),
    (
        "2",
        "a usage error, said with the command's usage: an unknown flag, a bad value, flags "
        "that do not go together",
    ),
    ("130", "Ctrl-C"),
)
FILES = (
    (str(SYSTEM_SOCKET), "the daemon's socket, as root (systemd's, under socket activation)"),
    ("/etc/hotplug-monitor/config.toml", "the config file, read if it exists"),
    ("/var/lib/hotplug-monitor", "the leases, kept across restarts (leases.json, leases.journal)"),
    ("/run/cdi/hotplug-monitor.json", "the CDI spec of the devices, for container engines"),
)


def roff(text: str) -> str:
    """Text as troff prints it: backslashes and hyphens escaped, and no line read as a request."""
    escaped = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(f"\\&{line}" for line in escaped.splitlines())


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.HelpFormatter(prog, width=10_000)  # one line each; troff fills them


def usage(parser: argparse.ArgumentParser) -> str:
    formatter = _formatter(parser.prog)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups, "")
    return formatter.format_help().strip()


def options(parser: argparse.ArgumentParser) -> list[str]:
    """A tagged paragraph per argument but --help: its invocation, then its help expanded."""
    formatter = _formatter(parser.prog)
    lines = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue  # -h everywhere; the commands have a section of their own
        lines += [".TP", f"\\fB{roff(formatter._format_action_invocation(action))}\\fR"]
        lines.append(roff(formatter._expand_help(action)) if action.help else "\\&")
    return lines


def manpage() -> str:
    parser, commands = build_parser()
    head = (parser.description or "").rstrip(".")
    lines = [
        f'.TH HOTPLUG\\-MONITOR 8 "" "{roff(f"{PROG} {version()}")}" "System Administration"',
        ".ad l",  # left-aligned: usage lines of long flags read badly stretched
        ".SH NAME",
        f"{roff(PROG)} \\- {roff(head[:1].lower() + head[1:])}",
        ".SH SYNOPSIS",
        f"\\fB{roff(PROG)}\\fR \\fICOMMAND\\fR [\\fIOPTION\\fR...]",
        ".br",
        f"\\fB{roff(PROG)}\\fR \\-\\-version",
        ".SH DESCRIPTION",
        roff(parser.description or ""),
        ".PP",
        roff(parser.epilog or ""),
        ".SS Options",
        *options(parser),
        ".SH COMMANDS",
    ]
    for name, command in commands.items():
        lines += [".SS " + roff(name), ".PP", roff(usage(command))]
        if command.description:
            lines += [".PP", roff(command.description)]
        lines += options(command)
    lines.append(".SH EXIT STATUS")
    for status, when in EXIT_STATUS:
        lines += [".TP", f"\\fB{status}\\fR", roff(when)]
    lines.append(".SH FILES")
    for path, what in FILES:
        lines += [".TP", f"\\fI{roff(path)}\\fR", roff(what)]
    lines += [
        ".SH SEE ALSO",
        roff(
            f"{DOCS}/README.md, and the manual it links, one page a topic, in {DOCS}/docs/ "
            "(docs/ in the source): operating, configuration, leases and the protocol, NVIDIA "
            "health, CDI, Prometheus, Nomad, Kubernetes, security, performance."
        ),
        ".PP",
        "\\fBsystemctl\\fR(1), \\fBjournalctl\\fR(1), \\fBsystemd.socket\\fR(5), "
        "\\fBpodman\\-run\\fR(1)",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    sys.stdout.write(manpage())
    return 0


if __name__ == "__main__":
    sys.exit(main())
