"""The teacher's outputs on a fixed set of training images, computed once instead of every step.

Factorization runs the frozen teacher (eval mode, no gradients) on each batch, and what it
gives for an image depends on that image alone. An image folder is a fixed set of images that
the steps revisit every epoch unchanged (kfdeploy does not augment them), so the teacher's
outputs on every training image can be computed once, in large inference batches, and each
step reads its rows: on 2 CPU cores the teacher's forward was 13% of the factorize step of the
paper's configuration (ResNet-50 teacher, 32x32, batch 32). Rendered sprites are new at every
step, and a dataset of your own may augment its images: both keep the teacher in the step.

The outputs travel with the batch, in its labels under TARGET_PREFIX keys (no task name holds
':'), so every feed, data-parallel rank and resumed run gets them the way it gets the labels.
Precomputed outputs are the same function of the image as the step's, computed in other batch
sizes: equal to float rounding, not bit for bit.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..errors import KfError

TARGET_PREFIX = "teacher:"
_FEATURES = TARGET_PREFIX + "features"
_STAGE = TARGET_PREFIX + "stage"
_LOGITS = TARGET_PREFIX + "logits:"
MODES = ("auto", "once", "every-step")
# What `auto` spends at most on host memory for them (every training image's).
AUTO_MEMORY_LIMIT = 2 << 30
PRECOMPUTE_BATCH = 256

Targets = Dict[str, torch.Tensor]


def teacher_outputs(teacher: nn.Module, images: torch.Tensor, stages: int) -> Targets:
    """What the objective needs from the teacher on `images`: its pooled features, the features
    of its `stages` - 1 earlier stages that InfoMax aligns, and its logits per task."""
    if stages > 1:
        features, earlier = teacher.forward_stages(images, stages)
    else:
        features, earlier = teacher.forward_features(images), []
    logits = teacher.forward_head(features)
    return {_FEATURES: features, **{f"{_STAGE}{i}": s for i, s in enumerate(earlier)},
            **{_LOGITS + task: v for task, v in logits.items()}}


def split_targets(labels: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Targets]:
    """A batch's labels as (task labels, the teacher's precomputed outputs, empty if none)."""
    tasks = {k: v for k, v in labels.items() if not k.startswith(TARGET_PREFIX)}
    return tasks, {k: v for k, v in labels.items() if k.startswith(TARGET_PREFIX)}


def unpack(targets: Targets) -> Tuple[torch.Tensor, List[torch.Tensor], Dict[str, torch.Tensor]]:
    """(pooled features, earlier stage features in order, {task: logits}) from `teacher_outputs`'s keys."""
    stages = sorted((k for k in targets if k.startswith(_STAGE)), key=lambda k: int(k[len(_STAGE):]))
    logits = {k[len(_LOGITS):]: v for k, v in targets.items() if k.startswith(_LOGITS)}
    return targets[_FEATURES], [targets[k] for k in stages], logits


class TargetedSource:
    """A batch source whose batches carry the teacher's precomputed outputs on their images.

    `picked(step, batch_size, rank)` names the rows of the images table a step's batch holds,
    `source.rows` gives them as the model sees them; `targets` holds row `rows[i]`'s outputs
    at index i."""

    def __init__(self, source, picked: Callable[[int, int, int], np.ndarray], rows: np.ndarray, targets: Targets):
        self.source, self.picked, self.targets = source, picked, targets
        self.slot = np.full(int(rows.max()) + 1, -1, dtype=np.int64)
        self.slot[rows] = np.arange(len(rows))

    def batch(self, step: int, batch_size: int, rank: int = 0):
        # The source's own batch is rows(picked): picked once here, for the images and the targets.
        picked = self.picked(step, batch_size, rank)
        images, labels = self.source.rows(picked)
        slots = torch.from_numpy(self.slot[picked])
        return images, {**labels, **{k: v[slots] for k, v in self.targets.items()}}

    def heldout(self, count: int, offset: int = 0):
        return self.source.heldout(count, offset)


@torch.no_grad()
def compute_targets(teacher: nn.Module, stages: int, rows: np.ndarray, images_of: Callable[[np.ndarray], torch.Tensor],
                    device: torch.device, memory_limit: Optional[int], show_progress: bool = True) -> Optional[Targets]:
    """`teacher_outputs` on the images of `rows` (`images_of(rows)` gives them as the model sees
    them), kept on the host; None if they would take more than `memory_limit` bytes. The
    teacher moves to `device` (where training would take it next)."""
    was_training = teacher.training
    teacher.to(device).eval()
    store: Optional[Targets] = None
    try:
        for start in tqdm(range(0, len(rows), PRECOMPUTE_BATCH), desc="teacher targets", disable=not show_progress,
                          dynamic_ncols=True, mininterval=1.0):
            chunk = rows[start : start + PRECOMPUTE_BATCH]
            outputs = teacher_outputs(teacher, images_of(chunk).to(device), stages)
            if store is None:
                per_image = sum(v[0].numel() * v.element_size() for v in outputs.values())
                if memory_limit is not None and per_image * len(rows) > memory_limit:
                    return None
                store = {k: torch.empty((len(rows), *v.shape[1:]), dtype=v.dtype) for k, v in outputs.items()}
            for key, value in outputs.items():
                store[key][start : start + len(chunk)] = value.cpu()
    finally:
        teacher.train(was_training)
    return store


def fixed_rows(source) -> Optional[object]:
    """`source` if its images are a fixed table whose rows each batch names (an image folder's:
    `rows` and `picked`), else None."""
    return source if callable(getattr(source, "picked", None)) and callable(getattr(source, "rows", None)) else None


def check_mode(mode: str, indexed) -> None:
    """Refuse, before anything is written, a `mode` that is not one or cannot apply to the data."""
    if mode not in MODES:
        raise KfError(f"--teacher-targets must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "once" and indexed is None:
        raise KfError("--teacher-targets once needs an image folder: rendered sprites are new at every step, and a "
                      "dataset of your own may augment; use --teacher-targets every-step (or auto)")


def with_teacher_targets(mode: str, source, indexed, teacher: nn.Module, stages: int, device: torch.device,
                         show_progress: bool = True) -> Tuple[object, float]:
    """`source` with the teacher's outputs precomputed where `mode` asks for it, and the seconds
    that took (training time: the step no longer pays for the teacher).

    `indexed`: `fixed_rows` of the data under `source`. `mode`: "once" precomputes (`check_mode`
    refuses it without fixed rows); "every-step" leaves the teacher in the step; "auto"
    precomputes for fixed rows whose outputs fit in AUTO_MEMORY_LIMIT bytes."""
    check_mode(mode, indexed)
    if mode == "every-step" or indexed is None:
        return source, 0.0
    started = time.perf_counter()
    rows = indexed.train_index
    targets = compute_targets(teacher, stages, rows, lambda chunk: source.rows(chunk)[0], device,
                              AUTO_MEMORY_LIMIT if mode == "auto" else None, show_progress)
    seconds = time.perf_counter() - started
    if targets is None:
        if show_progress:
            print(f"teacher targets: over {AUTO_MEMORY_LIMIT >> 30} GiB for {len(rows)} images; the teacher runs in every step")
        return source, seconds
    if show_progress:
        size = sum(v.numel() * v.element_size() for v in targets.values()) / 2**20
        print(f"teacher targets: {len(rows)} images in {seconds:.1f} s ({size:.0f} MiB), read by every step")
    return TargetedSource(source, indexed.picked, rows, targets), seconds
