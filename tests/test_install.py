"""Installs that fit where the code runs: a built wheel, not the checkout, must work.

The rest of the suite runs from an editable install inside the checkout, where files the
package reads from the source tree are always there; these tests build the wheel users get
and run it elsewhere: from a folder outside the checkout, and in a fresh venv that has the
runtime's dependencies only (no torch).
"""
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement

from kfdeploy import cli
from kfdeploy.errors import KfError
from kfdeploy.extras import require

REPO = Path(__file__).resolve().parents[1]
ORT_BUILDS = {"onnxruntime", "onnxruntime-gpu"}
# Left out of the copy the wheel is built from: what is large, local or not part of the package.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv*", "runs", "bundles", "build", "dist", "*.egg-info",
                                    "__pycache__", ".pytest_cache", "benchmarks", "tests", "demos")


def pip(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The kfdeploy wheel, built from a copy of the checkout (a stale build/ folder there cannot leak in)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    shutil.copytree(REPO, source, ignore=NOT_SOURCE)
    built = pip("wheel", "--no-deps", str(source), "-w", str(work / "dist"))
    if built.returncode and ("No matching distribution" in built.stderr or "Could not find a version" in built.stderr):
        pytest.skip(f"pip cannot build a wheel here (no setuptools for the isolated build): {built.stderr.strip()[-300:]}")
    assert built.returncode == 0, built.stderr
    (found,) = (work / "dist").glob("kfdeploy-*.whl")
    return found


def wheel_requirements(wheel: Path):
    with zipfile.ZipFile(wheel) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        lines = zf.read(name).decode().splitlines()
    extras = [line.split(":", 1)[1].strip() for line in lines if line.startswith("Provides-Extra:")]
    return extras, [Requirement(line.split(":", 1)[1].strip()) for line in lines if line.startswith("Requires-Dist:")]


def installed_with(requirements, extras, wanted: set) -> set:
    """Every distribution `pip install kfdeploy[wanted]` asks for, following kfdeploy[...] self-references."""
    names, todo = set(), set(wanted) | {""}
    seen = set()
    while todo:
        extra = todo.pop()
        seen.add(extra)
        for req in requirements:
            if req.marker is not None and not req.marker.evaluate({"extra": extra}):
                continue
            if req.marker is None and extra != "":
                continue
            if req.name == "kfdeploy":
                todo |= set(req.extras) - seen
            else:
                names.add(req.name.lower())
    return names


def test_wheel_metadata_base_is_the_runtime_and_one_onnx_runtime_per_extra(wheel):
    extras, requirements = wheel_requirements(wheel)
    base = installed_with(requirements, extras, set())
    assert {"numpy", "onnx"} <= base
    assert not base & ({"torch", "gradio", "matplotlib", "tensorrt"} | ORT_BUILDS), base
    assert {"cpu", "gpu", "train", "demo", "tensorrt", "dev"} <= set(extras)
    assert installed_with(requirements, extras, {"cpu"}) & ORT_BUILDS == {"onnxruntime"}
    assert installed_with(requirements, extras, {"gpu"}) & ORT_BUILDS == {"onnxruntime-gpu"}
    for extra in extras:  # no extra, self-references followed, pulls both builds of ONNX Runtime
        assert len(installed_with(requirements, extras, {extra}) & ORT_BUILDS) <= 1, extra
    assert not installed_with(requirements, extras, {"train"}) & ORT_BUILDS  # so [gpu,train] stays one build
    assert {"torch", "gradio", "pytest", "selenium", "onnxruntime"} <= installed_with(requirements, extras, {"dev"})


def test_wheel_ships_every_module_and_the_export_profiles(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    # setup.cfg lists its packages (export/ is mapped in as kfdeploy.profiles): a subpackage
    # added later and not listed there would be missing from every install but an editable one
    modules = {f"kfdeploy/{p.relative_to(REPO / 'kfdeploy').as_posix()}" for p in (REPO / "kfdeploy").rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    shipped = {Path(n).name for n in names if n.startswith("kfdeploy/profiles/") and n.endswith(".toml")}
    assert shipped == {p.name for p in (REPO / "export").glob("*.toml")}


@pytest.mark.slow
def test_wheel_exports_from_outside_the_checkout(wheel, factor_run, tmp_path):
    target = tmp_path / "site"
    installed = pip("install", "--no-deps", "--target", str(target), str(wheel))
    assert installed.returncode == 0, installed.stderr
    elsewhere = tmp_path / "elsewhere"  # not the checkout, not a parent of it: nothing found by cwd
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "PYTHONUNBUFFERED": "1"}

    def python(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=elsewhere, env=env, timeout=300)

    where = python("-c", "import importlib.resources, kfdeploy; print(kfdeploy.__file__); print(importlib.resources.files('kfdeploy.profiles'))")
    assert where.returncode == 0, where.stderr
    package_file, profiles = where.stdout.split()
    assert Path(package_file).is_relative_to(target) and Path(profiles).is_relative_to(target), where.stdout
    out = tmp_path / "bundle"
    result = python("-m", "kfdeploy", "export", str(factor_run), "--out", str(out), "--tasks", "shape", "--profile", "jetson-fp16")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "manifest.json").read_text())["profile"]["name"] == "jetson-fp16"
    unknown = python("-m", "kfdeploy", "export", str(factor_run), "--out", str(tmp_path / "b2"), "--profile", "nope")
    assert unknown.returncode == 2 and "available: cpu-fp32, gpu-fp16, jetson-fp16" in unknown.stderr, unknown.stderr


@pytest.mark.slow
def test_runtime_extra_alone_runs_a_bundle_without_torch(wheel, bundle, tmp_path):
    """A fresh venv with kfdeploy[cpu] only: what an edge device installs."""
    venv = tmp_path / "venv"
    made = subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    installed = pip("--python", str(python), "install", "-q", f"{wheel}[cpu]", timeout=600)
    assert installed.returncode == 0, installed.stderr
    cwd = tmp_path  # outside the checkout, so the checkout's kfdeploy cannot stand in
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    np.save(tmp_path / "batch.npy", np.zeros((2, 1, 64, 64), dtype=np.uint8))
    script = (
        "import importlib.util, sys, numpy as np, kfdeploy\n"
        f"assert kfdeploy.__file__.startswith({str(venv)!r}), kfdeploy.__file__\n"
        "assert importlib.util.find_spec('torch') is None, 'torch is installed'\n"
        f"model = kfdeploy.load({str(bundle)!r}, tasks=['shape', 'pos_x'])\n"
        "scores = model(np.zeros((3, 1, 64, 64), dtype=np.uint8))\n"
        "assert sorted(scores) == ['pos_x', 'shape'] and scores['shape'].shape == (3, 3), scores\n"
        "assert np.allclose(scores['shape'].sum(axis=1), 1, atol=1e-5)\n"
        "assert 'torch' not in sys.modules\n"
        "print('ok')\n"
    )
    ran = subprocess.run([str(python), "-c", script], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)
    assert ran.returncode == 0 and ran.stdout.strip().endswith("ok"), ran.stderr
    cli_run = subprocess.run([str(venv / "bin" / "kfdeploy"), "run", str(bundle), str(tmp_path / "batch.npy"), "--tasks", "scale"],
                             capture_output=True, text=True, cwd=cwd, env=env, timeout=120)
    assert cli_run.returncode == 0 and "scale=" in cli_run.stdout, cli_run.stderr
    teacher = subprocess.run([str(venv / "bin" / "kfdeploy"), "teacher", "--out", str(tmp_path / "t")],
                             capture_output=True, text=True, cwd=cwd, env=env, timeout=120)
    assert teacher.returncode == 2, teacher.stderr
    assert teacher.stderr.strip() == "kfdeploy: error: PyTorch is not installed: pip install 'kfdeploy[train]'"
    png = subprocess.run([str(venv / "bin" / "kfdeploy"), "run", str(bundle), str(tmp_path / "a.png")],
                         capture_output=True, text=True, cwd=cwd, env=env, timeout=120)
    assert png.returncode == 2 and "pip install pillow" in png.stderr, png.stderr


@pytest.mark.parametrize("command, missing, message", [
    (["teacher", "--out", "x"], "torch", "PyTorch is not installed: pip install 'kfdeploy[train]'"),
    (["export", "run", "--out", "x"], "onnxruntime",
     "ONNX Runtime is not installed: pip install 'kfdeploy[cpu]' (or 'kfdeploy[gpu]' on a CUDA machine)"),
    (["export", "run", "--out", "x"], "onnxscript", "onnxscript is not installed: pip install 'kfdeploy[train]'"),
    (["demo", "b"], "gradio", "Gradio is not installed: pip install 'kfdeploy[demo]'"),
])
def test_a_missing_extra_is_named_before_the_command_starts(command, missing, message, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, missing, None)  # what `import missing` sees when it is not installed
    assert cli.main(command) == 2
    assert capsys.readouterr().err.strip() == f"kfdeploy: error: {message}"


def test_require_names_the_extra_and_keeps_real_import_errors(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(KfError, match=r"^ONNX Runtime is not installed: pip install 'kfdeploy\[cpu\]' \(or 'kfdeploy\[gpu\]' on a CUDA machine\)$"):
        require("onnxruntime", "cpu")
    # an installed package whose own dependency is missing is a broken install, not a missing extra
    (tmp_path / "brokenpkg.py").write_text("import not_a_module_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="not_a_module_anywhere"):
        require("brokenpkg", "train")
    assert require("json", "train") is json
