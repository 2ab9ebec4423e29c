"""Defaults shared by the commands."""

from __future__ import annotations

import os
from pathlib import Path


def default_state_dir() -> Path:
    """``$XDSD_STATE_DIR``, else ``$XDG_STATE_HOME/xdsd``, else ``~/.local/state/xdsd``: the same
    place for ``xdsd serve`` and ``xdsd bootstrap`` run by the same user on the control-plane host."""
    explicit = os.environ.get("XDSD_STATE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "xdsd"
