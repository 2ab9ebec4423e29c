"""Live endpoints: instances that registered themselves, heart-beat, and expire."""

from __future__ import annotations
