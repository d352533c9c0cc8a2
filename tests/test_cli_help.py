"""The CLI's help says what every option means and what its default is."""

from __future__ import annotations

import argparse

import pytest

from hooked_vllm.cli import build_parser


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("name", sorted(_subcommands()))
def test_every_option_has_a_meaning_and_its_default(name):
    for action in _subcommands()[name]._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, f"{name} {action.option_strings[0]} has no help"
        shown = action.default not in (None, False) and not action.required
        if shown:
            assert "default" in action.help, f"{name} {action.option_strings[0]} does not name its default"
