"""Shared fixtures: tiny but real teacher and factor runs, trained once per test session."""
import functools
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


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"  # Debian's: a browser download cannot work here


@functools.cache
def _chromium_missing() -> str:
    """Why Debian's Chromium cannot be had here, or "" once it is installed: installed first,
    once, where this user may (root with apt-get), so that one command runs the browser tests."""
    if Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists():
        return ""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "Debian's chromium is not installed and this user cannot install it: apt-get install chromium chromium-driver"
    print("\ninstalling Debian's chromium and chromium-driver for the browser tests (once)", flush=True)
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    wait = ["-o", "DPkg::Lock::Timeout=600"]  # another apt-get (another test run) may hold the lock
    for step in (["apt-get", *wait, "update", "-qq"], ["apt-get", *wait, "install", "-y", "-qq", "chromium", "chromium-driver"]):
        done = subprocess.run(step, capture_output=True, text=True, timeout=1800, env=environment)
        if done.returncode:
            return f"`{' '.join(step)}` failed: {(done.stderr.strip() or 'no output').splitlines()[-1]}"
    return ""


def need_chromium() -> None:
    why = _chromium_missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"the browser tests must run in CI: {why}")
        pytest.skip(why)


def chromium_driver():
    """Headless Debian Chromium for the browser tests (@pytest.mark.chromium)."""
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException

    need_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update", "--window-size=1400,1900"):
        options.add_argument(flag)
    try:
        return webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    except WebDriverException as exc:
        pytest.fail(f"chromium did not start: {exc.msg}")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """What a marked test needs from outside Python, found or made before any of its fixtures
    is set up: a test that is going to skip says so before a bundle is trained for it."""
    from triton_servers import need_serve_env

    needs = [need for marker, need in (("chromium", need_chromium), ("serve_env", need_serve_env)) if item.get_closest_marker(marker)]
    if needs:
        capture = item.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled():  # a first run's one-time install says what it is doing
            for need in needs:
                need()


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
