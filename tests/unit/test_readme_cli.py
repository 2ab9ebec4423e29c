"""README.md's CLI table names every flag each command takes (the README is the user's reference)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from xdsd.cli import build_parser

README = Path(__file__).resolve().parents[2] / "README.md"


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("command", sorted(_commands()))
def test_every_flag_is_in_the_cli_table(command: str) -> None:
    rows = [line for line in README.read_text().splitlines() if line.startswith(f"| `xdsd {command}")]
    assert rows, f"README's CLI table has no row for `xdsd {command}`"
    flags = {opt for a in _commands()[command]._actions for opt in a.option_strings
             if opt.startswith("--") and opt != "--help"}
    missing = sorted(f for f in flags if f not in rows[0])
    assert not missing, f"`xdsd {command}` flags missing from README's CLI table: {missing}"
