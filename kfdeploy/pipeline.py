"""The front door: train a teacher, factorize a teacher. The CLI is a thin layer on these.

Your own teacher and data plug in here::

    from kfdeploy.pipeline import factorize
    factorize(my_teacher, "runs/mine", train_data=my_train_set, heldout_data=my_test_set)

`my_teacher` follows models.TeacherProtocol; a dataset item is (image tensor (C, H, W)
in [0, 1], {task: int label}).
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from . import __version__
from .data import TASK_CLASSES, TASK_LABELS, TASK_NAMES, DatasetSource, SpritesSource, collate
from .errors import KfError
from .losses import FactorizationObjective, LossWeights, TeacherObjective
from .models import BackboneConfig, FactorConfig, FactorNet, SpritesTeacher, TeacherConfig
from .runs import RUN_FILE, load_teacher, prepare_run_dir, read_json, write_json_atomic
from .train import Distributed, TrainConfig, accuracy, setup_distributed, train

EVAL_IMAGES = 2048  # held-out images scored during training (the curves in metrics.jsonl)


def parse_tasks(text: Optional[str], available: Sequence[str], where: str) -> List[str]:
    """'shape,scale' -> ['shape', 'scale'], refusing names `available` does not hold."""
    if not text:
        return list(available)
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in available]
    if unknown:
        raise KfError(f"unknown task {unknown[0]!r} for {where}; available: {', '.join(available)}")
    if len(set(tasks)) != len(tasks):
        raise KfError(f"--tasks names a task twice: {text}")
    return tasks


def _held_out_batch(heldout_data, tasks: Sequence[str], source: SpritesSource | None):
    if heldout_data is None:
        return source.heldout(EVAL_IMAGES)
    items = [heldout_data[i] for i in range(min(EVAL_IMAGES, len(heldout_data)))]
    return collate(items, tasks)


def _start_run(out: Path, resume: bool, env: Distributed, info: dict) -> tuple[bool, dict]:
    """Create or reopen the run folder; on resume the stored run.json is authoritative."""
    # Every rank validates before any rank writes, or rank 1 would find rank 0's run.json.
    resuming = prepare_run_dir(out, resume)
    if env.world_size > 1:
        torch.distributed.barrier()
    if resuming:
        stored = read_json(out / RUN_FILE)
        if stored.get("kind") != info["kind"]:
            raise KfError(f"{out} holds a {stored.get('kind')} run; it cannot be resumed as a {info['kind']} run")
        return True, stored
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / RUN_FILE, info)
    if env.world_size > 1:
        torch.distributed.barrier()
    return False, info


def train_teacher(
    out: Path,
    tasks: Sequence[str] = TASK_NAMES,
    config: TrainConfig = TrainConfig(),
    backbone: BackboneConfig = BackboneConfig(),
    resume: bool = False,
    device: Optional[str] = None,
) -> Path:
    """Train the multi-task sprites teacher into run folder `out`."""
    out = Path(out)
    tasks = parse_tasks(",".join(tasks), TASK_NAMES, "the sprites data")
    env = setup_distributed(device)
    model_config = TeacherConfig({t: TASK_CLASSES[t] for t in tasks}, backbone)
    info = {
        "kind": "teacher", "kfdeploy": __version__, "data": "sprites",
        "model": asdict(model_config), "task_labels": {t: TASK_LABELS[t] for t in tasks},
        "train": asdict(config),
    }
    resuming, info = _start_run(out, resume, env, info)
    model_config = TeacherConfig.from_dict(info["model"])
    config = TrainConfig(**info["train"])
    torch.manual_seed(config.seed)
    model = SpritesTeacher(model_config)
    source = SpritesSource(seed=config.seed, tasks=list(model_config.task_classes))
    images, labels = source.heldout(EVAL_IMAGES)
    train(
        out, TeacherObjective(model), source, config,
        evaluate=lambda m: accuracy(m, images, labels), env=env, resume=resuming, desc="teacher",
    )
    return out


def factorize(
    teacher: nn.Module | str | Path,
    out: Path,
    tasks: Optional[Sequence[str]] = None,
    train_data=None,
    heldout_data=None,
    task_labels: Optional[Dict[str, List[str]]] = None,
    config: TrainConfig = TrainConfig(),
    weights: LossWeights = LossWeights(),
    trunk: Optional[BackboneConfig] = None,
    task_width: int = 16,
    resume: bool = False,
    device: Optional[str] = None,
) -> Path:
    """Factorize `teacher` (a teacher run folder, or your own module) into run folder `out`.

    With a teacher run folder the data is the embedded sprites; with your own module pass
    `train_data` and `heldout_data` (and `trunk` if your images are not 1x64x64).
    """
    out = Path(out)
    teacher_run: Optional[str] = None
    if isinstance(teacher, (str, Path)):
        teacher_run = str(Path(teacher).resolve())
        teacher, teacher_info = load_teacher(Path(teacher))
        if train_data is not None:
            raise KfError("a teacher run folder trains on the embedded sprites; pass your teacher as a module to use your own data")
        task_labels = teacher_info["task_labels"]
        trunk = trunk or BackboneConfig(**teacher_info["model"]["backbone"])
    elif train_data is None or heldout_data is None:
        raise KfError("factorizing your own teacher module needs train_data and heldout_data datasets")
    teacher_tasks = list(teacher.task_classes)
    where = f"the teacher{' at ' + teacher_run if teacher_run else ''} (it was trained on these)"
    tasks = parse_tasks(",".join(tasks) if tasks else None, teacher_tasks, where)
    task_labels = {t: (task_labels or {}).get(t) or [str(i) for i in range(teacher.task_classes[t])] for t in tasks}
    env = setup_distributed(device)
    model_config = FactorConfig(
        task_classes={t: teacher.task_classes[t] for t in tasks},
        trunk=trunk or BackboneConfig(),
        task_width=task_width,
        teacher_feature_dim=teacher.feature_dim,
    )
    info = {
        "kind": "factorized", "kfdeploy": __version__,
        "data": "sprites" if teacher_run else "custom", "teacher_run": teacher_run,
        "model": model_config.to_dict(), "task_labels": task_labels,
        "train": asdict(config), "loss_weights": asdict(weights),
    }
    resuming, info = _start_run(out, resume, env, info)
    model_config = FactorConfig.from_dict(info["model"])
    config = TrainConfig(**info["train"])
    torch.manual_seed(config.seed)
    student = FactorNet(model_config)
    warm = student.warm_start_from(teacher)
    if env.is_main and not resuming:
        print("trunk and heads warm-started from the teacher" if warm else "trunk trained from scratch (teacher architecture differs)")
    if teacher_run:
        source = SpritesSource(seed=config.seed, tasks=tasks)
    else:
        source = DatasetSource(train_data, tasks, seed=config.seed, world_size=env.world_size)
    images, labels = _held_out_batch(heldout_data, tasks, source if teacher_run else None)
    objective = FactorizationObjective(student, teacher, LossWeights(**info["loss_weights"]))
    train(
        out, objective, source, config,
        evaluate=lambda m: accuracy(m, images, labels), env=env, resume=resuming, desc="factorize",
    )
    return out
