"""Shared fixtures: tiny but real teacher and factor runs, trained once per test session."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run `python -m kfdeploy ...` as a user would, capturing its output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "kfdeploy", *args], capture_output=True, text=True,
        timeout=timeout, cwd=kwargs.pop("cwd", REPO), env=env, **kwargs,
    )


def cli_fails(argv, capsys, expected: str) -> str:
    """Run `kfdeploy ARGV` in this process; assert it refused: exit code 2, one line on stderr
    starting `kfdeploy: error: ` and naming `expected`. Returns the line."""
    from kfdeploy.cli import main

    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("kfdeploy: error: ") and expected in err, err
    return err


@pytest.fixture(scope="session")
def teacher_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "teacher"
    result = run_cli("teacher", "--out", str(out), "--steps", "150", "--batch-size", "64")
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def factor_run(teacher_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "kf"
    result = run_cli("factorize", "--teacher", str(teacher_run), "--out", str(out), "--steps", "75", "--batch-size", "64")
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def bundle(factor_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "sprites"
    result = run_cli("export", str(factor_run), "--out", str(out), "--archive")
    assert result.returncode == 0, result.stderr
    return out
