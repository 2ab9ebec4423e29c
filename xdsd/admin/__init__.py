"""The admin HTTP port: metrics, health, readiness and debug pages."""

from __future__ import annotations
