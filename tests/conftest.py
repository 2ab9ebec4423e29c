"""Session-wide safety net for the real-process harness: whatever a test or fixture started through
``tests.support.procs.Proc`` (xdsd, Envoy, upstream apps) and did not stop is stopped at session end."""

from __future__ import annotations

import pytest


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    from tests.support.procs import stop_all

    stop_all()
