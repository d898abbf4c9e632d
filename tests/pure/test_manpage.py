"""hotplug-monitor(8) says what --help says: every command, and each command's every option."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from monitor.cli.manpage import manpage, roff
from monitor.cli.parser import build_parser


def shown(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Every argument but --help (and the top parser's COMMAND, whose choices are sections)."""
    hidden = (argparse._HelpAction, argparse._SubParsersAction)
    return [action for action in parser._actions if not isinstance(action, hidden)]


def arguments(parser: argparse.ArgumentParser) -> list[str]:
    """What a user types for each argument: its flags, or a positional's name."""
    return [
        said
        for action in shown(parser)
        for said in action.option_strings or [str(action.metavar or action.dest)]
    ]


def sections(page: str) -> dict[str, str]:
    """Each command's section (``.SS name`` up to the next subsection or section)."""
    found = re.findall(r"^\.SS ([^\n]+)\n(.*?)(?=^\.S[SH] )", page, re.M | re.S)
    return {name.replace("\\&", "").replace("\\-", "-"): body for name, body in found}


def test_the_page_has_a_section_for_every_command_with_every_option() -> None:
    parser, commands = build_parser()
    page = manpage()
    by_command = sections(page)
    assert set(commands) <= set(by_command)
    for name, command in commands.items():
        said = arguments(command)
        assert said, name
        for argument in said:
            assert f"\\fB{roff(argument)}" in by_command[name], (name, argument)
            assert roff(argument) in by_command[name], (name, argument)
    for argument in arguments(parser):  # --version
        assert roff(argument) in page


def test_every_help_text_is_on_the_page() -> None:
    _, commands = build_parser()
    page = manpage()
    for name, command in commands.items():
        for action in shown(command):
            if action.help and "%(" not in action.help:
                assert roff(action.help) in sections(page)[name], (name, action.dest)


def test_every_option_says_what_it_does() -> None:
    _, commands = build_parser()
    silent = [
        (name, action.option_strings or action.dest)
        for name, command in commands.items()
        for action in shown(command)
        if not action.help
    ]
    assert not silent


def test_the_manuals_command_list_names_every_command() -> None:
    _, commands = build_parser()
    operating = (Path(__file__).parents[2] / "docs" / "operating.md").read_text()
    listed = re.findall(r"^- `hotplug-monitor ([a-z-]+)", operating, re.M)
    assert set(listed) == set(commands)


def test_no_line_of_text_is_read_as_a_request() -> None:
    assert roff(".hidden\n'quoted\\") == "\\&.hidden\n\\&'quoted\\e"
    assert roff("--socket") == "\\&\\-\\-socket"
