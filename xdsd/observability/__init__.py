"""Metrics, traces and status, attached through the server's observer seam."""

from __future__ import annotations
