"""The front door: train a teacher, factorize a teacher. The CLI is a thin layer on these.

Your own teacher and data plug in here::

    from kfdeploy.pipeline import factorize
    factorize(my_teacher, "runs/mine", train_data=my_train_set, heldout_data=my_test_set)

`my_teacher` follows models.TeacherProtocol; a dataset item is (image tensor (C, H, W)
in [0, 1], {task: int label}).

Architectures are chosen by name (kfdeploy.architectures): `simpleconv` by default, or any
timm model, with optional local weights (`pretrained=`); nothing is downloaded.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import __version__
from .architectures import SIMPLECONV, load_pretrained
from .data import IMAGE_SIZE, TASK_CLASSES, TASK_LABELS, TASK_NAMES, DatasetSource, SpritesSource, collate
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


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images at the model's size: sprites render at 64x64, a model may want another size."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp_(0.0, 1.0)


class ResizedSource:
    """A batch source whose images are resized to the model's input size."""

    def __init__(self, source, size: int):
        self.source, self.size = source, size

    def batch(self, step: int, batch_size: int, rank: int = 0):
        images, labels = self.source.batch(step, batch_size, rank)
        return resize_images(images, self.size), labels

    def heldout(self, count: int, offset: int = 0):
        images, labels = self.source.heldout(count, offset)
        return resize_images(images, self.size), labels


def sprites_source(seed: int, tasks: Sequence[str], size: int):
    """The embedded sprites at `size` (rendered at 64x64, resized when the model wants another size)."""
    source = SpritesSource(seed=seed, tasks=tasks)
    return source if size == IMAGE_SIZE else ResizedSource(source, size)


def _pretrained_record(path: Optional[Path], notes: Dict[str, str]) -> Optional[dict]:
    """What run.json says about the local weights a run started from."""
    if path is None:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"file": str(Path(path).resolve()), "sha256": digest.hexdigest(), **notes}


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
    pretrained: Optional[Path] = None,
) -> Path:
    """Train the multi-task sprites teacher into run folder `out`.

    `backbone.arch` names the architecture (`simpleconv`, or a timm model such as
    "resnet50"); `pretrained` is a local weights file for it (safetensors or a torch/timm
    checkpoint). The sprites are resized to `backbone.image_size` when it is not 64.
    """
    out = Path(out)
    tasks = parse_tasks(",".join(tasks), TASK_NAMES, "the sprites data")
    env = setup_distributed(device)
    # Built, and its weights loaded, before the run folder exists: an unknown architecture,
    # an image size it cannot take or weights that do not fit leave nothing behind.
    torch.manual_seed(config.seed)
    model = SpritesTeacher(TeacherConfig({t: TASK_CLASSES[t] for t in tasks}, backbone))
    notes = load_pretrained(model.backbone, pretrained, model.config.backbone) if pretrained else {}
    info = {
        "kind": "teacher", "kfdeploy": __version__, "data": "sprites",
        "model": model.config.to_dict(), "task_labels": {t: TASK_LABELS[t] for t in tasks},
        "train": asdict(config), "pretrained": _pretrained_record(pretrained, notes),
    }
    requested = (model.config, config.seed)
    resuming, info = _start_run(out, resume, env, info)
    model_config = TeacherConfig.from_dict(info["model"])
    config = TrainConfig(**info["train"])
    if (model_config, config.seed) != requested:  # resuming a run made with other settings
        torch.manual_seed(config.seed)
        model = SpritesTeacher(model_config)
    if env.is_main and pretrained and not resuming:
        print(f"{model_config.arch} backbone initialised from {pretrained}")
    source = sprites_source(config.seed, list(model_config.task_classes), model_config.backbone.image_size)
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
    trunk_arch: Optional[str] = None,
    task_arch: str = SIMPLECONV,
    pretrained: Optional[Path] = None,
) -> Path:
    """Factorize `teacher` (a teacher run folder, or your own module) into run folder `out`.

    With a teacher run folder the data is the embedded sprites; with your own module pass
    `train_data` and `heldout_data` (and `trunk` if your images are not 1x64x64).

    `trunk_arch` and `task_arch` name the trunk's and the task networks' architectures
    (`simpleconv` or timm names; the trunk defaults to the teacher's, which warm-starts it
    from the teacher). `pretrained` is a local weights file for the trunk; the trunk then
    starts from it instead of the teacher.
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
    trunk = trunk or BackboneConfig()
    if trunk_arch and trunk_arch != trunk.arch:
        # Another architecture than the teacher's: same input, the architecture's own width.
        trunk = BackboneConfig(in_channels=trunk.in_channels, image_size=trunk.image_size, arch=trunk_arch)
    teacher_tasks = list(teacher.task_classes)
    where = f"the teacher{' at ' + teacher_run if teacher_run else ''} (it was trained on these)"
    tasks = parse_tasks(",".join(tasks) if tasks else None, teacher_tasks, where)
    task_labels = {t: (task_labels or {}).get(t) or [str(i) for i in range(teacher.task_classes[t])] for t in tasks}
    env = setup_distributed(device)
    # Built (architectures and image size checked, local weights loaded) before the run
    # folder exists, so a refusal leaves nothing behind.
    torch.manual_seed(config.seed)
    student = FactorNet(FactorConfig(
        task_classes={t: teacher.task_classes[t] for t in tasks},
        trunk=trunk,
        task_width=task_width,
        teacher_feature_dim=teacher.feature_dim,
        task_arch=task_arch,
    ))
    notes = load_pretrained(student.trunk, pretrained, student.config.trunk) if pretrained else {}
    info = {
        "kind": "factorized", "kfdeploy": __version__,
        "data": "sprites" if teacher_run else "custom", "teacher_run": teacher_run,
        "model": student.config.to_dict(), "task_labels": task_labels,
        "train": asdict(config), "loss_weights": asdict(weights), "pretrained": _pretrained_record(pretrained, notes),
    }
    requested = (student.config, config.seed)
    resuming, info = _start_run(out, resume, env, info)
    model_config = FactorConfig.from_dict(info["model"])
    config = TrainConfig(**info["train"])
    if (model_config, config.seed) != requested:  # resuming a run made with other settings
        torch.manual_seed(config.seed)
        student = FactorNet(model_config)
    if info.get("pretrained"):
        # The user's weights for the trunk win; the teacher's heads would not fit them.
        message = f"trunk initialised from {info['pretrained']['file']} (no warm start from the teacher)"
    else:
        warm = student.warm_start_from(teacher)
        message = "trunk and heads warm-started from the teacher" if warm else "trunk trained from scratch (teacher architecture differs)"
    if env.is_main and not resuming:
        print(message)
    if teacher_run:
        source = sprites_source(config.seed, tasks, model_config.trunk.image_size)
    else:
        source = DatasetSource(train_data, tasks, seed=config.seed, world_size=env.world_size)
    images, labels = _held_out_batch(heldout_data, tasks, source if teacher_run else None)
    objective = FactorizationObjective(student, teacher, LossWeights(**info["loss_weights"]))
    train(
        out, objective, source, config,
        evaluate=lambda m: accuracy(m, images, labels), env=env, resume=resuming, desc="factorize",
    )
    return out
