"""Who may talk to xdsd: signed node tokens for xDS clients."""

from __future__ import annotations
