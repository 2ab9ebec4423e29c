"""Protocol servers: they speak xDS and nothing else."""

from __future__ import annotations
