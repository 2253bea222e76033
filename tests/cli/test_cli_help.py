"""Every flag of every command has help text that states its default (a new flag without one fails here)."""

from __future__ import annotations

import argparse

from adala.cli import build_parser

SKIP = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)
SWITCHES = (argparse._StoreTrueAction, argparse._StoreFalseAction)  # off unless given: nothing to state


def _commands(parser: argparse.ArgumentParser, prefix: str = "adala"):
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, f"{prefix} {name}")


def test_every_flag_has_help_with_its_default():
    missing, no_default = [], []
    commands = list(_commands(build_parser()))
    assert len(commands) > 10  # the walk reached the sub-commands
    for prog, parser in commands:
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, SKIP):
                continue
            name = f"{prog} {'/'.join(action.option_strings) or action.dest}"
            if not (action.help or "").strip():
                missing.append(name)
                continue
            if action.option_strings and not action.required and not isinstance(action, SWITCHES):
                text = formatter._get_help_string(action)
                if "default" not in text.lower():
                    no_default.append(name)
    assert not missing, f"flags without help: {missing}"
    assert not no_default, f"flags whose help does not state the default: {no_default}"


def test_help_output_shows_defaults(capsys):
    from adala.cli import main

    assert main(["align-attention", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "optimiser steps (default: 300)" in out and "(default: 0.001)" in out
