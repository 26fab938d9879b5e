"""Shared fixtures: tiny but real teacher and factor runs, trained once per test session."""
import os
import shutil
import signal
import subprocess
import sys
import threading
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


def kill_at(argv, line_start: str, before_kill=lambda: None) -> list:
    """Start `python -m kfdeploy ARGV` and SIGKILL it as it prints a line starting with
    `line_start` (after calling `before_kill`); asserts it got there and died by the signal,
    since a command that ended early would pass any check of what it left. Returns its lines."""
    process = subprocess.Popen([sys.executable, "-m", "kfdeploy", *argv], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    watchdog = threading.Timer(300, process.kill)  # a hung command fails the test instead of blocking it
    watchdog.start()
    said = []
    for line in process.stdout:
        said.append(line)
        if line.startswith(line_start):
            break
    before_kill()
    process.send_signal(signal.SIGKILL)
    process.wait()
    watchdog.cancel()
    process.stdout.close()
    assert said and said[-1].startswith(line_start), f"it ended before printing {line_start!r}:\n" + "".join(said)
    assert process.returncode == -signal.SIGKILL, "it finished before it was killed"
    return said


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


def chromium_driver():
    """Headless Debian Chromium for the browser tests: skipped where it is not installed,
    failed under CI, which must install it (.ci/run does)."""
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException

    if not Path("/usr/bin/chromium").exists():
        if os.environ.get("CI"):
            pytest.fail("CI must install chromium and chromium-driver (.ci/run does)")
        pytest.skip("Debian's chromium is not installed: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update", "--window-size=1400,1900"):
        options.add_argument(flag)
    try:
        return webdriver.Chrome(options=options, service=webdriver.ChromeService("/usr/bin/chromedriver"))
    except WebDriverException as exc:
        pytest.fail(f"chromium did not start: {exc.msg}")


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


@pytest.fixture(scope="module")
def two_tasks(factor_run, tmp_path_factory) -> Path:
    """A bundle of shape and scale only: pos_x is what tests add to it on disk."""
    from kfdeploy.bundling.export import export_bundle

    return export_bundle(factor_run, tmp_path_factory.mktemp("two") / "b", tasks=["shape", "scale"], progress=lambda m: None)


@pytest.fixture
def live(two_tasks, tmp_path) -> Path:
    """A copy of the two-task bundle, for a test to change on disk while an assembly or the demo runs from it."""
    return shutil.copytree(two_tasks, tmp_path / "live")
