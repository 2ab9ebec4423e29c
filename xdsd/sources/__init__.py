"""Sources of desired state. A source emits complete revisions or rejects them; never half a state."""

from __future__ import annotations
