"""Run folders: config in JSON, weights and optimizer state in safetensors, never pickle.

Layout of a run folder::

    run.json              what was trained, how (written before the first step)
    checkpoint/           latest resumable state: model, optimizer, state.json
    model.safetensors     final weights (present only once the run has finished)
    metrics.jsonl         one JSON object per logged step or evaluation
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..atomic import atomic_write
from ..errors import KfError
from .models import FactorConfig, FactorNet, SpritesTeacher, TeacherConfig

RUN_FILE = "run.json"
MODEL_FILE = "model.safetensors"
CHECKPOINT_DIR = "checkpoint"
METRICS_FILE = "metrics.jsonl"
RNG_FILE = "rng.safetensors"  # in checkpoint/: the random generators' states


def write_json_atomic(path: Path, obj) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_tensors_atomic(path: Path, tensors: Dict[str, torch.Tensor]) -> None:
    with atomic_write(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))


def check_writable(out: Path) -> None:
    """Fail before anything is created if `out` cannot be made and written."""
    ancestor = out
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise KfError(f"cannot create {out}: {ancestor} is a file, not a folder; choose another --out")
    try:
        fd, probe = tempfile.mkstemp(dir=ancestor, prefix=".kfdeploy-write-probe-")
    except OSError as exc:
        raise KfError(
            f"cannot write to {out}: {ancestor} is not writable ({exc.strerror}); "
            "choose another --out or fix its permissions"
        ) from None
    os.close(fd)
    os.unlink(probe)


def prepare_run_dir(out: Path, resume: bool) -> bool:
    """Validate an output folder for a new or resumed run; returns True when resuming."""
    out = Path(out)
    check_writable(out)
    has_run = (out / RUN_FILE).exists()
    if has_run and not resume:
        raise KfError(
            f"{out} already holds a run; pass --resume to continue it or choose a new --out"
        )
    if out.exists() and not has_run and any(out.iterdir()):
        raise KfError(f"{out} exists and is not an empty folder or a kfdeploy run; choose a new --out")
    return has_run and resume


@contextlib.contextmanager
def _safetensors_read(path: Path, what: str):
    """Around a read of a safetensors file: a missing or unreadable one is a KfError naming it."""
    if not path.is_file():
        raise KfError(f"{what}: {path} is missing")
    try:
        yield
    except (SafetensorError, OSError, ValueError) as exc:
        raise KfError(f"{what}: {path} is not a readable safetensors file ({exc}); re-create it") from None


def load_weights(path: Path, what: str) -> Dict[str, torch.Tensor]:
    with _safetensors_read(path, what):
        return load_file(str(path))


def check_weights_fit(module: torch.nn.Module, path: Path, what: str) -> None:
    """Refuse a weights file whose tensors' names or shapes are not `module`'s, reading only
    the file's header. Build `module` on the meta device to check a configuration from an
    untrusted manifest before it costs memory: a width of 10^6 would ask for terabytes."""
    from safetensors import safe_open

    with _safetensors_read(path, what), safe_open(str(path), "np") as stored_file:
        stored = {name: tuple(stored_file.get_slice(name).get_shape()) for name in stored_file.keys()}
    expected = {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}
    if stored != expected:
        name = next(n for n in sorted(set(stored) | set(expected)) if stored.get(n) != expected.get(n))
        raise KfError(f"{what}: the weights do not fit the configured model ({name}: "
                      f"{stored.get(name, 'absent')} in {path.name}, {expected.get(name, 'absent')} configured)")


def apply_weights(module: torch.nn.Module, tensors: Dict[str, torch.Tensor], what: str) -> None:
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise KfError(f"{what}: the weights do not fit the configured model ({first})") from None


def read_json(path: Path, hint: str = "re-create it") -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise KfError(f"{path} is not valid JSON ({exc}); {hint}") from None


def read_run(run_dir: Path, kind: str, hint: str) -> dict:
    """Read run.json of a finished run of the given kind ('teacher' or 'factorized')."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN_FILE).is_file():
        raise KfError(f"no {kind} run at {run_dir} (no {RUN_FILE}); {hint}")
    info = read_json(run_dir / RUN_FILE, hint)
    if info.get("kind") != kind:
        raise KfError(f"{run_dir} is a {info.get('kind', 'unknown')!s} run, not a {kind} run; {hint}")
    if not (run_dir / MODEL_FILE).is_file():
        raise KfError(
            f"the {kind} run at {run_dir} has not finished (no {MODEL_FILE}); "
            f"continue it with --resume --out {run_dir}"
        )
    return info


# kind -> (model class, config class, how to make such a run)
_RUN_KINDS = {
    "teacher": (SpritesTeacher, TeacherConfig, "train one with `kfdeploy teacher --out {run}`"),
    "factorized": (FactorNet, FactorConfig, "make one with `kfdeploy factorize --teacher TEACHER_RUN --out {run}`"),
}


def load_run(run_dir: Path, kind: str) -> Tuple[torch.nn.Module, dict]:
    """Load a finished run's model in eval mode, with its run.json."""
    model_class, config_class, hint = _RUN_KINDS[kind]
    info = read_run(run_dir, kind, hint.format(run=run_dir))
    model = model_class(config_class.from_dict(info["model"]))
    what = f"{kind} checkpoint"
    apply_weights(model, load_weights(Path(run_dir) / MODEL_FILE, what), what)
    return model.eval(), info


def load_teacher(run_dir: Path) -> Tuple[SpritesTeacher, dict]:
    return load_run(run_dir, "teacher")


def load_factor_run(run_dir: Path) -> Tuple[FactorNet, dict]:
    return load_run(run_dir, "factorized")


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (safetensors) and plain JSON values."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: Dict[str, torch.Tensor], meta: dict) -> dict:
    state: Dict[int, dict] = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir: Path, model: torch.nn.Module, optimizer, state: dict) -> None:
    """Write checkpoint/ so that a kill at any instant leaves the old or the new one whole."""
    run_dir = Path(run_dir)
    staging, current, old = (run_dir / n for n in (".checkpoint.tmp", CHECKPOINT_DIR, ".checkpoint.old"))
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(staging / MODEL_FILE))
    save_file({k: v.contiguous().cpu() for k, v in opt_tensors.items()}, str(staging / "optimizer.safetensors"))
    save_file(_rng_states(), str(staging / RNG_FILE))
    (staging / "state.json").write_text(json.dumps({**state, "optimizer": opt_meta}))
    if current.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(current, old)
    os.replace(staging, current)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(run_dir: Path, model: torch.nn.Module, optimizer) -> Optional[dict]:
    """Restore the latest whole checkpoint; None when the run never reached one."""
    run_dir = Path(run_dir)
    for name in (CHECKPOINT_DIR, ".checkpoint.old"):  # .old survives a kill mid-swap
        folder = run_dir / name
        if (folder / "state.json").is_file():
            break
    else:
        return None
    state = json.loads((folder / "state.json").read_text())
    apply_weights(model, load_weights(folder / MODEL_FILE, "checkpoint"), "checkpoint")
    optimizer.load_state_dict(
        _optimizer_state(load_weights(folder / "optimizer.safetensors", "optimizer state"), state.pop("optimizer"))
    )
    if (folder / RNG_FILE).is_file():  # checkpoints written before it existed resume with fresh draws
        _restore_rng(load_weights(folder / RNG_FILE, "checkpoint's random-generator state"))
    return state


def _rng_states() -> Dict[str, torch.Tensor]:
    """What the steps draw random numbers from (factorize: each task code's reparameterisation
    noise), so that a resumed run draws what the uninterrupted one would have: the CPU
    generator's state and, once CUDA is in use, the current device's. Under data parallelism
    rank 0 writes it; every rank seeded alike and drew alike, so it is every rank's."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _restore_rng(states: Dict[str, torch.Tensor]) -> None:
    try:
        torch.set_rng_state(states["cpu"])
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state(states["cuda"])
    except (KeyError, RuntimeError, TypeError) as exc:
        raise KfError(f"the checkpoint's random-generator state is not usable ({exc}); "
                      "delete its rng.safetensors to resume with fresh random draws") from None
