"""Plug a new task into a shipped bundle: one task module trained against its frozen trunk.

The trunk comes from the bundle itself (weights/trunk.safetensors) and never changes: it
gets no gradient and stays in eval mode, so its fingerprint still matches and the new
module composes with the trunk every device already runs. Only the task module (a task
network and a head, the bundle's task architecture) trains, on the labels of the new task,
with the factorization's own per-task terms (label loss on the head and on the auxiliary
head, InfoMin on the code; no teacher, so no distillation). The module is then exported
into the bundle in place, the way `kfdeploy export --into` adds tasks: built beside the
bundle and swapped in atomically, so an interrupted add-task leaves the bundle as it was.

Data: a labelled folder (labels.csv; the column named like the task holds its classes)
or the embedded sprites, which offer new tasks the factorization never saw
(kfdeploy.training.data.NEW_TASKS: quadrant, ring, diagonal, orientation_quarter, x_parity).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import torch

from .. import __version__
from ..errors import KfError
from ..names import TASK_NAME_RULE, is_task_name
from ..training.data import NEW_TASK_STEPS, NEW_TASKS, epoch_slice
from ..training.losses import FrozenTrunkObjective, LossWeights
from ..training.pipeline import EMBEDDED, OpenedData, _start_run, _stored_config, normalized, open_data
from ..training.train import TrainConfig, accuracy, setup_distributed, train, weights_digest
from .bundle import Bundle
from .export import _remove_stale_staging, export_bundle, torch_modules


def open_new_task_data(bundle: Bundle, data: str | Path, tasks: Optional[Sequence[str]] = None, seed: int = 0) -> OpenedData:
    """The labelled images of new tasks for `bundle`, at its input size and channels, as
    0-1 pixels: `sprites`/`sprites-rgb` (`tasks` default: every one of NEW_TASKS) or a
    labelled folder (default: every column of its labels.csv)."""
    text = str(data)
    size = bundle.image_size[0]
    if text in EMBEDDED:
        channels = EMBEDDED[text][2]
        if channels != bundle.channels:
            other = next(name for name, spec in EMBEDDED.items() if spec[2] == bundle.channels)
            raise KfError(f"the bundle takes {bundle.channels}-channel images and {text} are {channels}-channel; "
                          f"use --data {other}, or a folder of images")
        return open_data(text, list(tasks or NEW_TASKS), seed=seed, image_size=size)
    folder = Path(data)
    if not (folder / "labels.csv").is_file():
        raise KfError(f"unknown data source {text!r}: give sprites, sprites-rgb (new tasks: {', '.join(NEW_TASKS)}) "
                      "or a folder of images with labels.csv")
    return open_data(folder, tasks, seed=seed, image_size=size, channels=bundle.channels)


class LabelledPool:
    """`count` labelled training images of a source, drawn once, and the only ones training
    sees (epochs over them, as every finite source is read): how many labels a new task is
    given. Held-out images come from the source's held-out split, as without a budget.
    `flag` names the option that set `count`, in messages."""

    def __init__(self, opened: OpenedData, count: int, seed: int = 0, flag: str = "--labels"):
        if count < 1:
            raise KfError(f"{flag} must be at least 1, got {count}")
        available = opened.record.get("train_images")  # a folder's training split; sprites never run out
        if available is not None and count > available:
            raise KfError(f"{flag} {count} asks for more images than the folder's training split holds ({available})")
        self.images, self.labels = opened.source.batch(0, count)  # step 0 of the source's own seeded stream
        self.tasks, self.seed = tuple(opened.tasks), seed
        self.heldout = opened.source.heldout

    def batch(self, step: int, batch_size: int, rank: int = 0):
        picked = torch.from_numpy(epoch_slice(len(self.images), step, batch_size, self.seed))
        return self.images[picked], {t: y[picked] for t, y in self.labels.items()}


def _input_record(bundle: Bundle) -> dict:
    mean, std = bundle.normalization()
    return {"channels": bundle.channels, "image_size": bundle.image_size[0], "mean": mean, "std": std}


def add_task(
    bundle_path: Path | str,
    name: str,
    data: str | Path,
    labels: Optional[int] = None,
    config: TrainConfig = TrainConfig(steps=NEW_TASK_STEPS),
    weights: LossWeights = LossWeights(),
    replace_existing: bool = False,
    run: Optional[Path] = None,
    resume: bool = False,
    device: Optional[str] = None,
    progress=print,
) -> dict:
    """Train task `name` on `data` against the bundle's frozen trunk and add it to the bundle
    in place; returns its manifest record. `labels`: train on that many labelled images
    only. `run`: keep the training run there (otherwise it lives in a work folder beside
    the bundle and is removed at the end; `resume` continues a kept one)."""
    bundle_path = Path(bundle_path)
    if not bundle_path.is_dir():
        raise KfError(f"add-task changes a bundle folder in place; {bundle_path} is not one "
                      "(extract an archive with `tar -xzf`, then add the task to the folder)")
    bundle = Bundle.open(bundle_path)
    if not is_task_name(name):
        raise KfError(f"task name {name!r} cannot name a task module; use {TASK_NAME_RULE}")
    if name in bundle.tasks and not replace_existing:
        raise KfError(f"the bundle already has a task {name!r}; pass --replace to retrain it, or choose another --name")
    if resume and run is None:
        raise KfError("--resume continues the run kept with --run DIR; name that folder")
    opened = open_new_task_data(bundle, data, [name], seed=config.seed)
    env = setup_distributed(device)
    if env.world_size > 1:
        raise KfError("add-task trains one small module: run it as one process, not under torchrun")
    classes = len(opened.task_labels[name])
    torch.manual_seed(config.seed)
    model = torch_modules(bundle, new_tasks={name: classes})
    fingerprint = bundle.manifest["trunk"]["fingerprint"]
    info = {
        "kind": "factorized", "kfdeploy": __version__,
        "data": opened.kind, "data_source": opened.record, "input": _input_record(bundle),
        "normalization": "the bundle's", "teacher_run": None, "teacher": None,
        "added_to": {"bundle": str(bundle_path.resolve()), "trunk_fingerprint": fingerprint, "labels": labels},
        "model": model.config.to_dict(), "task_labels": {name: opened.task_labels[name]},
        "train": asdict(config), "loss_weights": asdict(weights), "pretrained": None,
    }
    # Without --run, the run lives beside the bundle for the command's life; a killed
    # add-task's is cleared by the next one, as export clears its staging folders.
    _remove_stale_staging(bundle_path, "add-task")
    work = bundle_path.with_name(f".{bundle_path.name}.add-task-{os.getpid()}") if run is None else None
    try:
        run_dir = Path(run) if run is not None else work / "run"
        resuming, info = _start_run(run_dir, resume, env, info)
        if resuming and info.get("added_to", {}).get("trunk_fingerprint") != fingerprint:
            raise KfError(f"the run in {run_dir} trained against another trunk than {bundle_path}'s; start a new --run")
        config = _stored_config(info, config)
        source = LabelledPool(opened, labels, config.seed) if labels is not None else opened.source
        source = normalized(source, info["input"])
        images, truth = source.heldout(config.eval_images)
        progress(f"training task {name!r} ({classes} classes, {opened.kind} data"
                 f"{f', {labels} labelled images' if labels is not None else ''}) on the frozen trunk {fingerprint[:12]}")
        train(run_dir, FrozenTrunkObjective(model, name, weights), source, config,
              evaluate=(lambda m: accuracy(m, images, truth)) if len(images) else (lambda m: {}),
              env=env, resume=resuming, desc=f"add-task {name}")
        if weights_digest(model.trunk) != fingerprint:  # FrozenTrunkObjective's whole promise
            raise KfError("the trunk changed while training the task module; this is a kfdeploy bug, please report it")
        export_bundle(run_dir, bundle_path, tasks=[name], into=True, progress=progress, keep_examples=True,
                      opened_data=opened)
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    return Bundle.open(bundle_path, verify=False).task(name)  # export checked every file it wrote
