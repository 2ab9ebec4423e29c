"""README's external-processing example is complete: its processor module imports and behaves as
described, and its mesh validates with that module on the path."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from xdsd.model import load_mesh
from xdsd.processing import Continue, Headers, Message, Mutate, ReplaceBody, Respond
from xdsd.processing.loader import build, resolve

README = Path(__file__).resolve().parents[2] / "README.md"


def _section() -> str:
    text = README.read_text()
    return text.split("### External processing: Envoy filters written in Python", 1)[1].split("\n## ", 1)[0]


def test_the_readme_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    section = _section()
    code = re.search(r"```python\n(# my_filters\.py\n.*?)```", section, re.S)
    mesh = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert code and mesh
    (tmp_path / "my_filters.py").write_text(code.group(1))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        loaded = load_mesh(mesh.group(1))
        assert loaded.gateways["edge"].routes[2].processing is not None
        tenant = build("my_filters:tenant", {"header": "x-tenant"})
        assert isinstance(tenant(Message("request_headers", headers=Headers({}), args={"header": "x-tenant"})), Respond)
        req = Headers({"x-tenant": "t1"})
        assert tenant(Message("request_headers", headers=req, request=req, caller="spiffe://td/service/a",
                              args={"header": "x-tenant"})) == Mutate(set={"x-caller": "spiffe://td/service/a"},
                                                                      remove=["x-internal"])
        upper = build("my_filters:Upper", {"suffix": "!"})
        assert upper(Message("response_body", body=b"hi")) == ReplaceBody(b"HI!", content_type="text/plain")
        assert upper(Message("response_headers")) == Continue()
        with pytest.raises(ValueError, match="suffix: must be a string"):
            build("my_filters:Upper", {"suffix": 1})
    finally:
        resolve.cache_clear()
        sys.modules.pop("my_filters", None)
