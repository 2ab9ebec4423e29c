"""`xdsd validate FILE`: one summary line and exit 0 when valid; `FILE: path: message` lines on stderr
and exit 1 when not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_model import VALID  # one example mesh for both modules
from xdsd.cli import main

INVALID = VALID.replace("127.0.0.3, port: 8080", "127.0.0.3, port: 0")


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(VALID)
    bad.write_text(INVALID)
    return good, bad


def test_valid_file(files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    good, _ = files
    assert main(["validate", str(good)]) == 0
    out = capsys.readouterr()
    assert out.out == f"{good}: valid: 2 services, 3 endpoints, 1 gateways, 2 routes\n"
    assert out.err == ""


def test_invalid_file(files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _, bad = files
    assert main(["validate", str(bad)]) == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.splitlines() == [
        f"{bad}: services.reviews.endpoints[1].port: must be 1..65535, got 0",
        f"{bad}: invalid (1 error)",
    ]


def test_cross_check_errors_and_error_count(files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _, bad = files
    bad.write_text(VALID.replace("service: productpage}", "service: details}").replace("weight: 3", "weight: 0"))
    assert main(["validate", str(bad)]) == 1
    lines = capsys.readouterr().err.splitlines()
    # Field errors stop before cross-checks, so fix the field first, then the reference shows.
    assert lines == [
        f"{bad}: services.reviews.endpoints[0].weight: must be 1..1000000, got 0",
        f"{bad}: invalid (1 error)",
    ]
    bad.write_text(VALID.replace("service: productpage}", "service: details}").replace("/reviews", "/"))
    assert main(["validate", str(bad)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"{bad}: gateways.edge.routes[1].service: unknown service 'details'",
        f"{bad}: gateways.edge.routes[1].prefix: duplicate prefix '/' (same as routes[0]); it could never match",
        f"{bad}: invalid (2 errors)",
    ]


def test_empty_file_is_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert main(["validate", str(empty)]) == 0
    assert capsys.readouterr().out == f"{empty}: valid: 0 services, 0 endpoints, 0 gateways, 0 routes\n"


def test_duplicate_key_and_bad_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dup = tmp_path / "dup.yaml"
    dup.write_text(VALID.replace("  productpage:\n", "  reviews:\n    endpoints: []\n  productpage:\n"))
    assert main(["validate", str(dup)]) == 1
    assert capsys.readouterr().err.splitlines()[0] == f"{dup}: services.reviews: duplicate key (line 7)"
    broken = tmp_path / "broken.yaml"
    broken.write_text("services: [unclosed\n")
    assert main(["validate", str(broken)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{broken}: not valid YAML: ") and err.endswith(f"{broken}: invalid (1 error)\n")


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"
    assert main(["validate", str(missing)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"{missing}: cannot read {missing}") and err[-1] == f"{missing}: invalid (1 error)"


def test_console_entry_point(files: tuple[Path, Path]) -> None:
    """The installed `xdsd` script (or `python -m xdsd` where it is not installed) runs the same code."""
    _, bad = files
    script = Path(sys.executable).with_name("xdsd")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "xdsd"]
    proc = subprocess.run([*cmd, "validate", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"{bad}: services.reviews.endpoints[1].port: must be 1..65535, got 0",
        f"{bad}: invalid (1 error)",
    ]


def _run_validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xdsd", "validate", str(path)], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[2])


@pytest.mark.parametrize("name, content, expected", [
    ("deep-flow.yaml", "services: " + "[" * 3000 + "]" * 3000 + "\n",
     "nested deeper than 64 levels of lists and mappings"),
    ("deep-block.yaml", "".join(" " * i + f"k{i}:\n" for i in range(3000)) + " " * 3000 + "x\n",
     "nested deeper than 64 levels of lists and mappings"),
    ("surrogate.yaml", VALID.replace("weight: 1}", 'weight: 1, zone: "\\ud800"}'),
     "services.reviews.endpoints[1].zone: lone surrogate U+D800 is not allowed: '\\ud800'"),
    ("nul.yaml", VALID.replace("weight: 1}", 'weight: 1, labels: {v: "a\\0b"}}'),
     "services.reviews.endpoints[1].labels.v: control character U+0000 is not allowed: 'a\\x00b'"),
    ("reserved.yaml", VALID.replace("  productpage:\n", "  xds_cluster:\n    endpoints: []\n  productpage:\n"),
     "services.xds_cluster: 'xds_cluster' is reserved for xdsd's own resources"),
    ("tags.yaml", "services: !!python/object/apply:os.system [echo hi]\n", "services: unsupported YAML tag"),
])
def test_hostile_files_are_field_errors_not_tracebacks(tmp_path: Path, name: str, content: str, expected: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    proc = _run_validate(path)
    assert proc.returncode == 1, proc
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert lines[-1] == f"{path}: invalid (1 error)", lines
    assert lines[0].startswith(f"{path}: ") and expected in lines[0], lines


def test_files_that_are_not_utf8_are_field_errors(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("services: {caf\xe9: {}}\n".encode("latin-1"))
    proc = _run_validate(path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc
    assert proc.stderr.splitlines()[0].startswith(f"{path}: {path} is not UTF-8: ")
