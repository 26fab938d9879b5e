"""Shared fixtures: tiny but real teacher and factor runs, trained once per test session."""
import fcntl
import functools
import json
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


def pytest_configure(config):
    _keep_this_worker_to_its_cores()


def _keep_this_worker_to_its_cores() -> None:
    """Under pytest-xdist (setup.cfg's addopts run the suite in two workers), each worker and
    everything it starts keeps to its own share of the cores, set before torch or ONNX Runtime
    is imported, which size their thread pools by it: two such processes on the same cores slow
    each other 5-10x (their threads spin-wait), and each on its own core overlap the suite's
    single-threaded waits (tracing exports, servers and browsers starting)."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cpus, index = sorted(os.sched_getaffinity(0)), int(worker.removeprefix("gw"))
    share = cpus[index * len(cpus) // count:(index + 1) * len(cpus) // count] or [cpus[index % len(cpus)]]
    os.sched_setaffinity(0, share)
    os.environ["OMP_NUM_THREADS"] = str(len(share))  # over .ci/run's 2: torch takes its threads from it


SESSION_RUNS = {"teacher_run", "factor_run", "bundle"}  # made once (made_once below) and shared by many files


def pytest_collection_modifyitems(config, items):
    """The order pytest-xdist hands files out in (setup.cfg: --dist loadfile --no-loadscope-reorder):
    first the largest file that needs the session's runs, so that one worker starts making them
    at once; then the files that need none of them, which the other worker runs meanwhile instead
    of waiting for the runs; then the rest. Larger files first within each group, as xdist's own
    order would have them, a test marked slow counting as ten: the last files handed out should
    be short ones, or one worker finishes long before the other."""
    files: dict = {}
    for item in items:
        files.setdefault(item.path, []).append(item)
    weight = {path: sum(10 if item.get_closest_marker("slow") else 1 for item in its) for path, its in files.items()}

    def needs_runs(item) -> bool:
        return bool(SESSION_RUNS & set(item.fixturenames)) or item.get_closest_marker("session_runs") is not None

    needing = sorted((path for path, its in files.items() if any(map(needs_runs, its))), key=lambda p: -weight[p])
    first = needing[0] if needing else None
    group = {path: 0 if path == first else 2 if path in needing else 1 for path in files}
    items[:] = sorted(items, key=lambda item: (group[item.path], -weight[item.path], str(item.path)))


def made_once(tmp_path_factory, name: str, make) -> Path:
    """A folder `make(folder)` fills once for the whole test run: under pytest-xdist the first
    worker to need it makes it and the others wait for it and share it (tests copy what they change)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # pytest-N/, which every worker's basetemp (pytest-N/popen-gwK) sits in
    folder, done = root / "made-once" / name, root / "made-once" / f"{name}.done"
    folder.parent.mkdir(exist_ok=True)
    with open(root / "made-once" / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            make(folder)
            done.touch()
    return folder


def _cli_into(*args: str):
    def make(out: Path) -> None:
        result = run_cli(*args, str(out))
        assert result.returncode == 0, result.stderr
    return make


@pytest.fixture(scope="session")
def teacher_run(tmp_path_factory) -> Path:
    return made_once(tmp_path_factory, "teacher", _cli_into("teacher", "--steps", "150", "--batch-size", "64", "--out"))


@pytest.fixture(scope="session")
def factor_run(teacher_run, tmp_path_factory) -> Path:
    return made_once(tmp_path_factory, "kf", _cli_into(
        "factorize", "--teacher", str(teacher_run), "--steps", "75", "--batch-size", "64", "--out"))


@pytest.fixture(scope="session")
def bundle(factor_run, tmp_path_factory) -> Path:
    return made_once(tmp_path_factory, "sprites", _cli_into("export", str(factor_run), "--archive", "--out"))


def _task_files(record: dict) -> list:
    from kfdeploy.bundling.bundle import module_entries

    return [entry["file"] for entry in module_entries(record)]


def manifest_json(folder: Path) -> dict:
    """A bundle's manifest.json as written, unchecked."""
    return json.loads((folder / "manifest.json").read_text())


def _write_manifest(folder: Path, manifest: dict) -> None:
    (folder / "manifest.json").unlink()  # never write through a hard link into the bundle it came from
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))


TIMM_SIZE = 32  # the smallest size resnet18 and mobilenetv2_050 take (their total stride)
TIMM_TASKS = ["shape", "scale", "orientation"]  # 3, 6 and 40 classes


def _make_timm_run(root: Path) -> None:
    import torch

    from kfdeploy.bundling.export import export_bundle
    from kfdeploy.training.architectures import BackboneConfig
    from kfdeploy.training.pipeline import factorize, train_teacher
    from kfdeploy.training.runs import MODEL_FILE, load_factor_run, load_teacher, save_tensors_atomic
    from kfdeploy.training.train import TrainConfig

    quick = TrainConfig(steps=2, batch_size=8, eval_every=1000, eval_images=64, log_every=1, checkpoint_every=1000)
    train_teacher(root / "teacher", TIMM_TASKS, quick, backbone=BackboneConfig(image_size=TIMM_SIZE, arch="resnet18"))
    teacher, _ = load_teacher(root / "teacher")
    teacher.pretrained_cfg = {"mean": [0.4], "std": [0.3]}  # so the graphs normalize: Sub and Div at their start
    factorize(teacher, root / "kf", tasks=TIMM_TASKS, config=quick, data="sprites", image_size=TIMM_SIZE, channels=1,
              trunk=BackboneConfig(image_size=TIMM_SIZE, arch="resnet18"), task_arch="mobilenetv2_050", infomax_stages=3)
    model, _ = load_factor_run(root / "kf")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # task networks' statistics far from BatchNorm's initial ones: every folded bias and scale its own
        for layer in (m for m in model.tasks.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            for tensor, low, high in ((layer.running_mean, -0.5, 0.5), (layer.running_var, 0.5, 2.0),
                                      (layer.weight, 0.5, 1.5), (layer.bias, -0.5, 0.5)):
                tensor.uniform_(low, high, generator=generator)
    save_tensors_atomic(root / "kf" / MODEL_FILE, model.state_dict())
    export_bundle(root / "kf", root / "bundle", progress=lambda message: None)


@pytest.fixture(scope="session")
def timm_bundle(tmp_path_factory) -> Path:
    """A real timm bundle, made once for tests/test_architectures.py and test_merge.py: a resnet18
    teacher (TIMM_TASKS, 1x32x32 sprites, a few steps) factorized into a resnet18 trunk aligned
    with it at three stages and mobilenetv2_050 task modules, with a normalization in its graphs
    and the task networks' BatchNorm statistics scrambled before export. Its runs are beside it
    (teacher/, kf/). Most of a minute, mostly torch.onnx's exports."""
    return made_once(tmp_path_factory, "timm", _make_timm_run) / "bundle"


@pytest.fixture(scope="module")
def two_tasks(bundle, tmp_path_factory) -> Path:
    """A bundle of shape and scale only (pos_x is what tests add to it on disk): the session
    bundle without its other tasks, which is what `kfdeploy export --tasks shape,scale` of
    the same run writes (its trunk, these tasks' files and records, its examples), without
    exporting them again."""
    manifest = manifest_json(bundle)
    dropped = {file for task, record in manifest["tasks"].items() if task not in ("shape", "scale") for file in _task_files(record)}
    target = tmp_path_factory.mktemp("two") / "b"
    shutil.copytree(bundle, target, ignore=lambda folder, names: [
        name for name in names if (Path(folder) / name).relative_to(bundle).as_posix() in dropped])
    manifest["tasks"] = {task: manifest["tasks"][task] for task in ("shape", "scale")}
    for example in manifest["examples"]:
        example["labels"] = {task: example["labels"][task] for task in manifest["tasks"]}
    _write_manifest(target, manifest)
    return target


def add_on_disk(source: Path, bundle_dir: Path, task: str = "pos_x") -> None:
    """What `kfdeploy add-task` and `export --into` do to a bundle an app runs from: a new bundle
    beside it, its files hard-linked, the task's files and record added, swapped in atomically
    (kfdeploy's own exchange). The task comes from bundle `source`, exported from the same run,
    rather than exported again: tests/test_export.py and test_add_task.py test those commands."""
    from kfdeploy.bundling.export import _exchange

    source_manifest = manifest_json(source)
    staging = bundle_dir.with_name(f".{bundle_dir.name}.staging-{os.getpid()}")
    shutil.copytree(bundle_dir, staging, copy_function=os.link)
    for file in _task_files(source_manifest["tasks"][task]):
        (staging / file).parent.mkdir(parents=True, exist_ok=True)
        (staging / file).unlink(missing_ok=True)
        shutil.copyfile(source / file, staging / file)
    manifest = manifest_json(staging)
    manifest["tasks"][task] = source_manifest["tasks"][task]
    truths = {example["sha256"]: example["labels"] for example in source_manifest["examples"]}
    for example in manifest["examples"]:  # the same images: what export writes for them
        example["labels"][task] = truths[example["sha256"]][task]
    _write_manifest(staging, manifest)
    _exchange(staging, bundle_dir)


@pytest.fixture
def live(two_tasks, tmp_path) -> Path:
    """A copy of the two-task bundle, for a test to change on disk while an assembly or the demo runs from it."""
    return shutil.copytree(two_tasks, tmp_path / "live")
