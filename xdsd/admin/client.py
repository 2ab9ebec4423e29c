"""The admin API from the command line (``xdsd status``, ``config-dump``, ``diff``, ``apply``,
``history``, ``rollback``): requests with an operator token, answers as JSON, errors as text."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from xdsd.auth.tokens import TOKEN_HEADER

# Operator tokens that the commands mint for themselves from the state directory's key.
CLI_OPERATOR_TTL = 600.0


def operator_token(token: str | None, state_dir: Path) -> str | None:
    """``token``, else a short-lived operator token minted with the key in ``state_dir`` (on the
    control-plane host), else none (enough for the read-only pages on a loopback admin address)."""
    if token:
        return token
    from xdsd.auth.tokens import KEY_FILE, OPERATOR

    if not (state_dir / KEY_FILE).exists():
        return None
    from xdsd.auth.commands import mint

    return mint(state_dir, "", "", kind=OPERATOR, ttl=CLI_OPERATOR_TTL)[0]


class AdminClient:
    def __init__(self, address: tuple[str, int], token: str | None) -> None:
        host = f"[{address[0]}]" if ":" in address[0] else address[0]
        self.base = f"http://{host}:{address[1]}"
        self.token = token

    def request(self, method: str, path: str, body: bytes | None = None, timeout: float = 30.0) -> tuple[int, Any]:
        headers = {TOKEN_HEADER: self.token} if self.token else {}
        if body is not None:
            headers["content-type"] = "application/yaml"
        req = urllib.request.Request(self.base + path, data=body, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            try:
                return exc.code, json.loads(exc.read() or b"{}")
            except ValueError:
                return exc.code, {}
        except OSError as exc:
            raise SystemExit(f"xdsd: cannot reach the admin API at {self.base}: {exc}") from None
        except ValueError as exc:
            raise SystemExit(f"xdsd: the admin API at {self.base} did not answer JSON: {exc}") from None

    def get(self, path: str) -> tuple[int, Any]:
        return self.request("GET", path)


def error_text(status: int, body: object) -> str:
    if isinstance(body, dict):
        errors = body.get("errors") or body.get("error")
        if isinstance(errors, list):
            return "; ".join(str(e) for e in errors)
        if errors:
            return str(errors)
    return f"HTTP {status}"


def fail(command: str, status: int, body: object) -> int:
    from xdsd.status import safe

    print(f"xdsd {command}: {safe(error_text(status, body))}", file=sys.stderr)
    return 1
