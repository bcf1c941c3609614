"""The command line explains itself: help on every flag with its default, a version, and fast start-up."""

from __future__ import annotations

import argparse

import pytest

from cnnkit import __version__
from cnnkit.cli import build_parser, main


def every_action():
    parser = build_parser()
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    yield "cnnkit", parser, [action for action in parser._actions if action is not commands]
    for name, subparser in commands.choices.items():
        yield name, subparser, subparser._actions


def test_every_flag_has_help_that_shows_its_default():
    for command, _parser, actions in every_action():
        for action in actions:
            if isinstance(action, argparse._HelpAction | argparse._VersionAction):
                continue
            where = f"cnnkit {command} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{where} has no help text"
            if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings:
                assert "default" in action.help, f"{where} does not show its default ({action.default!r})"


def test_version(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.strip() == f"cnnkit {__version__}"
