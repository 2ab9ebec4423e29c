"""Generated code for xdsd's own gRPC APIs (protos/xdsd/v1; regenerate with protos/generate.sh)."""

from __future__ import annotations

# The generated descriptors depend on these well-known types being in the pool first.
from google.protobuf import duration_pb2, timestamp_pb2  # noqa: F401
