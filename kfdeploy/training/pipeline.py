"""The front door: train a teacher, factorize a teacher. The CLI is a thin layer on these.

Your own teacher and data plug in here::

    from kfdeploy.training.pipeline import factorize
    factorize(my_teacher, "runs/mine", train_data=my_train_set, heldout_data=my_test_set)

`my_teacher` follows models.TeacherProtocol; a dataset item is (image tensor (C, H, W)
in [0, 1], {task: int label}).

Architectures are chosen by name (kfdeploy.training.architectures): `simpleconv` by default, or any
timm model, with optional local weights (`pretrained=`); nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import importlib
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import __version__
from ..errors import KfError
from .architectures import SIMPLECONV, build_backbone, load_pretrained, stage_widths
from .data import (
    IMAGE_SIZE, NEW_TASK_LABELS, RGB_IMAGE_SIZE, RGB_TASK_CLASSES, RGB_TASK_LABELS, TASK_CLASSES, TASK_LABELS,
    DatasetSource, SpritesRGBSource, SpritesSource, collate,
)
from .feed import resolve_feed
from .losses import FactorizationObjective, LossWeights, TeacherObjective
from .models import MAX_INFOMAX_STAGES, BackboneConfig, FactorConfig, FactorNet, SpritesTeacher, TeacherConfig
from .runs import RUN_FILE, load_teacher, prepare_run_dir, read_json, write_json_atomic
from .teacher_targets import check_mode as check_teacher_targets, fixed_rows, with_teacher_targets
from .train import Distributed, TrainConfig, accuracy, setup_distributed, train

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

    @property
    def renders_on_device(self) -> bool:
        return getattr(self.source, "renders_on_device", False)

    def device_batch(self, step: int, batch_size: int, rank: int = 0, device="cpu"):
        images, labels = self.source.device_batch(step, batch_size, rank, device)
        return resize_images(images, self.size), labels

    def heldout(self, count: int, offset: int = 0):
        images, labels = self.source.heldout(count, offset)
        return resize_images(images, self.size), labels


SPRITES, SPRITES_RGB, FOLDER = "sprites", "sprites-rgb", "folder"
EMBEDDED = {SPRITES: (TASK_CLASSES, TASK_LABELS, 1, IMAGE_SIZE), SPRITES_RGB: (RGB_TASK_CLASSES, RGB_TASK_LABELS, 3, RGB_IMAGE_SIZE)}


@dataclass
class OpenedData:
    """The data a run trains on, opened and checked: a batch source of [0, 1] images at the
    model's size, what its tasks are, and what run.json records about it."""

    kind: str  # "sprites", "sprites-rgb" or "folder"
    source: object  # batch(step, batch_size, rank) and heldout(count, offset)
    tasks: List[str]
    task_labels: Dict[str, List[str]]
    channels: int
    image_size: int
    record: dict  # run.json "data_source": what open_run_data needs to open it again

    @property
    def task_classes(self) -> Dict[str, int]:
        return {t: len(self.task_labels[t]) for t in self.tasks}


def open_data(
    data: str | Path = SPRITES,
    tasks: Optional[Sequence[str]] = None,
    seed: int = 0,
    image_size: Optional[int] = None,
    channels: Optional[int] = None,
    world_size: int = 1,
    known_classes: Optional[Mapping[str, Sequence[str]]] = None,
    split_seed: int = 0,
) -> OpenedData:
    """Open `sprites`, `sprites-rgb` or a labelled image folder (kfdeploy.training.folder_data).

    `image_size` defaults to the data's own (64, 128; 64 for a folder); `channels` (folders
    only) to RGB if any image is colour, else grey. `known_classes`: a teacher's class
    names per task, which a folder's labels must use. Everything is checked and a folder's
    images decoded here, before any run folder exists.
    """
    text = str(data)
    if image_size is not None and image_size < 1:
        raise KfError(f"--image-size must be positive, got {image_size}")
    if text in EMBEDDED:
        classes, labels, natural_channels, natural_size = EMBEDDED[text]
        if channels not in (None, natural_channels):
            raise KfError(f"--channels applies to image folders; {text} images have {natural_channels} channel(s)")
        # The factors by default; the new tasks (kfdeploy add-task) when named.
        labels = {**labels, **NEW_TASK_LABELS}
        tasks = parse_tasks(",".join(tasks) if tasks else ",".join(classes), list(labels), f"the {text} data")
        size = image_size or natural_size
        source = (SpritesSource if text == SPRITES else SpritesRGBSource)(seed=seed, tasks=tasks)
        source = source if size == natural_size else ResizedSource(source, size)
        record = {"data": text, "tasks": tasks, "image_size": size, "channels": natural_channels}
        return OpenedData(text, source, tasks, {t: labels[t] for t in tasks}, natural_channels, size, record)

    from .folder_data import DEFAULT_IMAGE_SIZE, FolderSource, infer_channels, load_images, read_labels

    if channels not in (None, 1, 3):
        raise KfError(f"--channels must be 1 (grey) or 3 (RGB), not {channels}")
    folder = Path(data).resolve()
    table = read_labels(folder, tasks, known_classes, split_seed)
    channels = channels or infer_channels(table)
    size = image_size or DEFAULT_IMAGE_SIZE
    images = load_images(table, size, channels)
    record = {
        "data": str(folder), "tasks": table.tasks, "image_size": size, "channels": channels, "split_seed": split_seed,
        "labels_sha256": table.sha256, "split": table.split,
        "train_images": int((~table.heldout).sum()), "heldout_images": int(table.heldout.sum()),
    }
    source = FolderSource(table, images, table.tasks, seed=seed, world_size=world_size)
    return OpenedData(FOLDER, source, table.tasks, table.task_labels, channels, size, record)


def open_run_data(info: dict, seed: Optional[int] = None, world_size: int = 1, tasks: Optional[Sequence[str]] = None) -> OpenedData:
    """The data a run (its run.json) trained on, opened again, classes as the run recorded them
    (`tasks`: a subset of its tasks). A folder whose labels.csv changed since is refused: it is
    no longer the run's data.
    """
    if info.get("data") == "custom":
        raise KfError("the run was trained on datasets passed from Python; kfdeploy cannot open them again")
    record = info.get("data_source")
    if record is None:  # runs made before data had a choice trained on sprites
        config = info["model"].get("backbone") or info["model"]["trunk"]
        record = {"data": SPRITES, "tasks": list(info["task_labels"]), "image_size": config["image_size"], "channels": 1}
    seed = info["train"]["seed"] if seed is None else seed
    opened = open_data(
        record["data"], tasks or record["tasks"], seed=seed, image_size=record["image_size"], channels=record["channels"],
        world_size=world_size, known_classes=info.get("task_labels"), split_seed=record.get("split_seed", 0),
    )
    if record.get("labels_sha256") not in (None, opened.record.get("labels_sha256")):
        raise KfError(f"{Path(record['data']) / 'labels.csv'} changed since the run was made; it is not the data the run "
                      "trained on (restore it, or train a new run on the new table)")
    return opened


def _identity(channels: int) -> dict:
    return {"mean": [0.0] * channels, "std": [1.0] * channels}


def _cfg_normalization(cfg, channels: int) -> Optional[dict]:
    """mean/std from a timm-style pretrained config (a dict or timm's PretrainedCfg), for `channels`."""
    get = cfg.get if isinstance(cfg, Mapping) else (lambda key: getattr(cfg, key, None))
    mean, std = get("mean") if cfg else None, get("std") if cfg else None
    if not mean or not std or len(mean) != len(std):
        return None
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    if len(mean) != channels:
        if channels != 1:
            return None
        # One channel from RGB statistics: their average, as a grey image averages its colours.
        mean, std = [sum(mean) / len(mean)], [sum(std) / len(std)]
    return {"mean": mean, "std": std}


def input_spec(opened: OpenedData, arch: str = SIMPLECONV, pretrained: Optional[Path] = None,
               teacher: Optional[nn.Module] = None) -> Tuple[dict, str]:
    """run.json's "input" (channels, image size, per-channel mean and std in [0, 1] units) and where mean/std came from.

    - a teacher module of your own: its `pretrained_cfg` mean/std (timm's attribute) if it has
      one, else none (mean 0, std 1): the teacher gets the input it was trained on;
    - local pretrained weights for a timm architecture: timm's pretrained config for it;
    - an image folder: computed from its training images;
    - the sprites: none (mean 0, std 1), so the quickstart's networks see what they always saw.
    """
    channels = opened.channels
    spec = {"channels": channels, "image_size": opened.image_size}
    if teacher is not None:
        found = _cfg_normalization(getattr(teacher, "pretrained_cfg", None), channels)
        return {**spec, **(found or _identity(channels))}, "the teacher's pretrained_cfg" if found else "none (the teacher's own input)"
    if pretrained is not None and arch != SIMPLECONV:
        from .architectures import _timm

        found = _cfg_normalization(_timm().models.get_pretrained_cfg(arch), channels)
        if found:
            return {**spec, **found}, f"timm's pretrained config for {arch}"
    if opened.kind == FOLDER:
        from .folder_data import channel_stats

        source = opened.source
        mean, std = channel_stats(source.images[source.train_index])
        return {**spec, "mean": mean, "std": std}, f"computed from {len(source.train_index)} training images"
    return {**spec, **_identity(channels)}, "none (sprites)"


class NormalizedSource:
    """A batch source whose images are normalized per channel, as the model sees them."""

    def __init__(self, source, mean: Sequence[float], std: Sequence[float]):
        self.source = source
        self.mean = torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)

    def _normalize(self, batch):
        images, labels = batch
        return (images - self.mean.to(images.device)) / self.std.to(images.device), labels

    def batch(self, step: int, batch_size: int, rank: int = 0):
        return self._normalize(self.source.batch(step, batch_size, rank))

    @property
    def renders_on_device(self) -> bool:
        return getattr(self.source, "renders_on_device", False)

    def device_batch(self, step: int, batch_size: int, rank: int = 0, device="cpu"):
        images, labels = self.source.device_batch(step, batch_size, rank, device)
        if self.mean.device != images.device:  # once: a copy from the host each step would wait for the device
            self.mean, self.std = self.mean.to(images.device), self.std.to(images.device)
        return (images - self.mean) / self.std, labels

    def heldout(self, count: int, offset: int = 0):
        return self._normalize(self.source.heldout(count, offset))

    def rows(self, rows):
        return self._normalize(self.source.rows(rows))


def normalized(source, spec: dict):
    """`source` as the model sees it, given run.json's "input"; unchanged for mean 0, std 1."""
    if all(m == 0 for m in spec["mean"]) and all(s == 1 for s in spec["std"]):
        return source
    return NormalizedSource(source, spec["mean"], spec["std"])


def _check_teacher_input(teacher_run: str, input_spec_: dict, opened: OpenedData) -> None:
    if (opened.channels, opened.image_size) != (input_spec_["channels"], input_spec_["image_size"]):
        raise KfError(
            f"the teacher at {teacher_run} takes {input_spec_['channels']}x{input_spec_['image_size']}x{input_spec_['image_size']} "
            f"images; this data gives {opened.channels}x{opened.image_size}x{opened.image_size} (the factor network sees "
            "what the teacher sees: leave --image-size and --channels to the teacher's)"
        )


def _pretrained_record(path: Optional[Path], notes: Dict[str, str]) -> Optional[dict]:
    """What run.json says about the local weights a run started from."""
    if path is None:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"file": str(Path(path).resolve()), "sha256": digest.hexdigest(), **notes}


def _held_out_batch(heldout_data, tasks: Sequence[str], count: int):
    items = [heldout_data[i] for i in range(min(count, len(heldout_data)))]
    return collate(items, tasks)


def _stored_config(info: dict, asked: TrainConfig) -> TrainConfig:
    """The run's training settings as run.json stores them; how the steps run (feed, compile, fusion,
    teacher targets) as asked now."""
    return replace(TrainConfig(**info["train"]), feed=asked.feed, compile=asked.compile, fuse_tasks=asked.fuse_tasks,
                   teacher_targets=asked.teacher_targets)


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


def _begin_run(out: Path, resume: bool, env: Distributed, info: dict, config: TrainConfig, model: nn.Module):
    """_start_run, then what run.json decides on resume: the training settings, and the model,
    built again (seeded) where the stored run was made with another configuration or seed.
    Returns (resuming, info, config, model)."""
    requested = (model.config, config.seed)
    resuming, info = _start_run(out, resume, env, info)
    config = _stored_config(info, config)
    stored = type(model.config).from_dict(info["model"])
    if (stored, config.seed) != requested:
        torch.manual_seed(config.seed)
        model = type(model)(stored)
    return resuming, info, config, model


def default_image_size(data: str | Path) -> int:
    """The size a run on `data` uses unless told otherwise: 64 for sprites and folders, 128 for sprites-rgb."""
    from .folder_data import DEFAULT_IMAGE_SIZE

    return EMBEDDED[str(data)][3] if str(data) in EMBEDDED else DEFAULT_IMAGE_SIZE


def _reopen_if_changed(opened: OpenedData, info: dict, seed: int, world_size: int) -> OpenedData:
    """On resume the stored run.json is authoritative: the data it names, not what was asked now."""
    return opened if info.get("data_source") == opened.record else open_run_data(info, seed, world_size)


def train_teacher(
    out: Path,
    tasks: Optional[Sequence[str]] = None,
    config: TrainConfig = TrainConfig(),
    backbone: Optional[BackboneConfig] = None,
    resume: bool = False,
    device: Optional[str] = None,
    pretrained: Optional[Path] = None,
    data: str | Path = SPRITES,
    channels: Optional[int] = None,
) -> Path:
    """Train a multi-task teacher on `data` into run folder `out`.

    `data` is "sprites" (the default), "sprites-rgb" or a labelled image folder
    (kfdeploy.training.folder_data); `tasks` a subset of its tasks (default: all). `backbone.arch`
    names the architecture (`simpleconv`, or a timm model such as "resnet50") and
    `backbone.image_size` the input size (default: the data's own); the channels are the
    data's (`channels` 1 or 3 converts a folder's images). `pretrained` is a local weights
    file for the architecture (safetensors or a torch/timm checkpoint).
    """
    out = Path(out)
    prepare_run_dir(out, resume)  # a folder that cannot take the run is refused before any data is read
    env = setup_distributed(device)
    backbone = backbone or BackboneConfig(image_size=default_image_size(data))
    # Data opened and checked, the model built and its weights loaded, all before the run
    # folder exists: bad labels, an unknown architecture, an image size it cannot take or
    # weights that do not fit leave nothing behind.
    opened = open_data(data, tasks, seed=config.seed, image_size=backbone.image_size, channels=channels, world_size=env.world_size)
    resolve_feed(config.feed, opened.source, env.device)
    backbone = replace(backbone, in_channels=opened.channels)
    torch.manual_seed(config.seed)
    model = SpritesTeacher(TeacherConfig(opened.task_classes, backbone))
    notes = load_pretrained(model.backbone, pretrained, model.config.backbone) if pretrained else {}
    spec, normalization = input_spec(opened, backbone.arch, pretrained)
    info = {
        "kind": "teacher", "kfdeploy": __version__, "data": opened.kind, "data_source": opened.record,
        "input": spec, "normalization": normalization,
        "model": model.config.to_dict(), "task_labels": opened.task_labels,
        "train": asdict(config), "pretrained": _pretrained_record(pretrained, notes),
    }
    resuming, info, config, model = _begin_run(out, resume, env, info, config, model)
    if resuming:
        opened = _reopen_if_changed(opened, info, config.seed, env.world_size)
    if env.is_main and not resuming:
        print(f"data: {opened.kind} ({opened.channels}x{opened.image_size}x{opened.image_size}), normalization: {normalization}")
        if pretrained:
            print(f"{model.config.arch} backbone initialised from {pretrained}")
    source = normalized(opened.source, info.get("input") or {**_identity(opened.channels)})
    images, labels = source.heldout(config.eval_images)
    train(
        out, TeacherObjective(model), source, config,
        evaluate=lambda m: accuracy(m, images, labels), env=env, resume=resuming, desc="teacher",
    )
    return out


def _check_labels_fit(teacher: nn.Module, opened: OpenedData, where: str) -> None:
    """The data's classes must be the teacher's outputs, in the teacher's order."""
    for task in opened.tasks:
        outputs = teacher.task_classes[task]
        if len(opened.task_labels[task]) != outputs:
            names = opened.task_labels[task]
            raise KfError(
                f"task '{task}': {where} has {outputs} outputs but the data has {len(names)} classes "
                f"({', '.join(names[:6])}{', ...' if len(names) > 6 else ''}); give the teacher a task_labels attribute "
                "naming its classes in output order"
            )


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: " + ((str(exc).strip().splitlines() or [""])[0][:200])


def teacher_from_factory(factory: str, weights: Optional[Path] = None) -> Tuple[nn.Module, dict]:
    """Your teacher from the command line: import MODULE (and nothing else), call FUNCTION().

    MODULE is looked up on sys.path with the current folder first, as `python -m` does; it
    is never taken from a run folder or a bundle. The module returned must have
    forward_features and forward_head; `weights` (safetensors, or a weights-only torch
    checkpoint) are then loaded into it, every key matching. Returns the module (in eval
    mode) and what run.json records about it.
    """
    import os

    name, sep, function = factory.partition(":")
    if not sep or not function.isidentifier() or not all(part.isidentifier() for part in name.split(".")):
        raise KfError(f"--teacher-factory {factory!r} is not MODULE:FUNCTION (e.g. my_pkg.models:build)")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # anything its import raises is the user's code failing, said in one line
        raise KfError(f"--teacher-factory {factory}: cannot import {name} ({_first_line(exc)})") from None
    build = getattr(module, function, None)
    if not callable(build):
        raise KfError(f"--teacher-factory {factory}: {name} has no function {function}")
    try:
        teacher = build()
    except Exception as exc:
        raise KfError(f"--teacher-factory {factory}: {function}() raised {_first_line(exc)}") from None
    if not isinstance(teacher, nn.Module):
        raise KfError(f"--teacher-factory {factory} returned a {type(teacher).__name__}, not a torch nn.Module")
    missing = [m for m in ("forward_features", "forward_head") if not callable(getattr(teacher, m, None))]
    if missing:
        raise KfError(f"--teacher-factory {factory} returned a {type(teacher).__name__} without {' and '.join(missing)}; "
                      "a teacher maps images to pooled features (forward_features) and features to {task: logits} (forward_head)")
    if weights is not None:
        from .architectures import read_weights, weights_mismatch

        tensors = read_weights(Path(weights), "--teacher-weights")
        mismatch = weights_mismatch(teacher.state_dict(), tensors)
        if mismatch:
            raise KfError(f"--teacher-weights {weights} does not fit the module {factory} returns: {mismatch}")
        teacher.load_state_dict(tensors, strict=False)
    return teacher.eval(), {"factory": factory, "weights": _pretrained_record(weights, {})}


@torch.no_grad()
def complete_teacher(teacher: nn.Module, channels: int, size: int) -> nn.Module:
    """Run a module teacher once on zero images of the data's shape: refuse, in one line, one that
    cannot take them or answers in another form than TeacherProtocol's; fill in `task_classes`
    and `feature_dim` when it does not declare them."""
    was_training = teacher.training
    teacher.eval()
    shape = f"{channels}x{size}x{size}"
    try:
        features = teacher.forward_features(torch.zeros(2, channels, size, size))
    except Exception as exc:
        raise KfError(f"the teacher cannot take {shape} images: forward_features raised {_first_line(exc)}") from None
    if not torch.is_tensor(features) or features.ndim != 2:
        got = tuple(features.shape) if torch.is_tensor(features) else type(features).__name__
        raise KfError(f"the teacher's forward_features gave {got}, not pooled (N, D) features "
                      "(a timm model's pooled feature is forward_head(forward_features(x), pre_logits=True))")
    try:
        logits = teacher.forward_head(features)
    except Exception as exc:
        raise KfError(f"the teacher's forward_head raised {_first_line(exc)} on its own features") from None
    if not isinstance(logits, Mapping) or not logits or not all(torch.is_tensor(v) and v.ndim == 2 for v in logits.values()):
        raise KfError(f"the teacher's forward_head gave {type(logits).__name__}, not a dict of (N, classes) logits per task")
    classes = {str(t): int(v.shape[1]) for t, v in logits.items()}
    declared = getattr(teacher, "task_classes", None)
    if declared is not None and dict(declared) != classes:
        raise KfError(f"the teacher's task_classes {dict(declared)} disagree with what forward_head returns {classes}")
    if declared is None:
        teacher.task_classes = classes
    if getattr(teacher, "feature_dim", None) is None:
        teacher.feature_dim = int(features.shape[1])
    elif int(teacher.feature_dim) != features.shape[1]:
        raise KfError(f"the teacher's feature_dim is {teacher.feature_dim} but forward_features gives {features.shape[1]}")
    teacher.train(was_training)
    return teacher


def teacher_stage_dims(teacher: nn.Module, trunk: BackboneConfig, stages: int) -> List[int]:
    """The widths of the teacher's stages that InfoMax aligns besides its pooled feature, for
    `stages` in all; refused, naming which, where the teacher or the trunk cannot give them."""
    if not 1 <= stages <= MAX_INFOMAX_STAGES + 1:
        raise KfError(f"--infomax-stages must be 1 to {MAX_INFOMAX_STAGES + 1}, not {stages}")
    if stages == 1:
        return []
    stage_dims = getattr(teacher, "stage_dims", None)
    dims = stage_dims(stages) if callable(stage_dims) and callable(getattr(teacher, "forward_stages", None)) else None
    if dims is None:
        raise KfError(f"--infomax-stages {stages} needs a teacher that gives its stages (a timm architecture trained by "
                      f"`kfdeploy teacher`, or stage_dims and forward_stages on your own); this one does not: use 1")
    if trunk.arch == SIMPLECONV or stage_widths(build_backbone(trunk)[0], stages) is None:
        raise KfError(f"--infomax-stages {stages} needs a trunk that gives its stages (a timm architecture such as resnet18); "
                      f"{trunk.arch} does not: choose --trunk-arch, or use 1")
    return dims


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
    data: Optional[str | Path] = None,
    image_size: Optional[int] = None,
    channels: Optional[int] = None,
    teacher_source: Optional[dict] = None,
    infomax_stages: int = 1,
) -> Path:
    """Factorize `teacher` (a teacher run folder, or your own module) into run folder `out`.

    Data: `data` ("sprites", "sprites-rgb" or a labelled image folder); a teacher run
    folder defaults to the data it trained on, and the factor network always takes the
    input the teacher takes (its channels, size and normalization). Your own module takes
    `data` too, with `image_size` and `channels` (defaults: the data's), or your datasets
    as `train_data` and `heldout_data` (and `trunk` if your images are not 1x64x64). Its
    classes are the data's, in the order of its `task_labels` attribute if it has one
    (else sorted names), and its input is normalized with its `pretrained_cfg` mean/std if
    it has one (timm's attribute), else not at all. `teacher_source` is recorded in
    run.json as where the module came from (the CLI's --teacher-factory).

    `trunk_arch` and `task_arch` name the trunk's and the task networks' architectures
    (`simpleconv` or timm names; the trunk defaults to the teacher's, which warm-starts it
    from the teacher). `pretrained` is a local weights file for the trunk; the trunk then
    starts from it instead of the teacher. `infomax_stages` > 1 aligns the trunk with the
    teacher at that many stages (the last its pooled feature), as the reference does with 3;
    both must be timm networks that give their stages.
    """
    out = Path(out)
    prepare_run_dir(out, resume)  # a folder that cannot take the run is refused before any data is read
    env = setup_distributed(device)
    teacher_run: Optional[str] = None
    opened: Optional[OpenedData] = None
    if isinstance(teacher, (str, Path)):
        teacher_run = str(Path(teacher).resolve())
        teacher, teacher_info = load_teacher(Path(teacher))
        if train_data is not None:
            raise KfError("a teacher run folder trains on its data (data=...); pass your teacher as a module to use your own datasets")
        where = f"the teacher at {teacher_run} (it was trained on these)"
        tasks = parse_tasks(",".join(tasks) if tasks else None, list(teacher.task_classes), where)
        backbone = BackboneConfig(**teacher_info["model"]["backbone"])
        spec = teacher_info.get("input") or {"channels": backbone.in_channels, "image_size": backbone.image_size, **_identity(backbone.in_channels)}
        normalization = teacher_info.get("normalization", "none (sprites)")
        if data is None:
            opened = open_run_data(teacher_info, config.seed, env.world_size, tasks=tasks)
        else:
            folder = str(data) not in EMBEDDED
            opened = open_data(data, tasks, seed=config.seed, image_size=image_size or spec["image_size"],
                               channels=(channels or spec["channels"]) if folder else channels, world_size=env.world_size,
                               known_classes=teacher_info["task_labels"] if folder else None)
        _check_teacher_input(teacher_run, spec, opened)
        for task in tasks:
            if opened.task_labels[task] != teacher_info["task_labels"][task]:
                raise KfError(f"task '{task}' of {data} has other classes than the teacher at {teacher_run} was trained on")
        task_labels = opened.task_labels
        trunk = trunk or backbone
    elif data is not None:
        if train_data is not None or heldout_data is not None:
            raise KfError("give factorize either data=... or train_data and heldout_data, not both")
        folder = str(data) not in EMBEDDED
        size = image_size or default_image_size(data)
        if channels is None:  # the teacher is tried on the data's shape before the images are decoded
            from .folder_data import infer_channels, read_labels

            channels = infer_channels(read_labels(data, tasks=[])) if folder else EMBEDDED[str(data)][2]
        complete_teacher(teacher, channels, size)
        tasks = parse_tasks(",".join(tasks) if tasks else None, list(teacher.task_classes), "the teacher")
        known = getattr(teacher, "task_labels", None) if folder else None
        opened = open_data(data, tasks, seed=config.seed, image_size=size, channels=channels,
                           world_size=env.world_size, known_classes=known)
        _check_labels_fit(teacher, opened, "the teacher")
        if folder and known is None and env.is_main and not resume:
            print("the teacher has no task_labels: its outputs are taken to be the classes in sorted order")
        task_labels = opened.task_labels
        spec, normalization = input_spec(opened, teacher=teacher)
        trunk = replace(trunk or BackboneConfig(), in_channels=opened.channels, image_size=opened.image_size)
    elif train_data is None or heldout_data is None:
        raise KfError("factorizing your own teacher module needs data=... (sprites, sprites-rgb or an image folder), "
                      "or train_data and heldout_data datasets")
    else:
        trunk = trunk or BackboneConfig()
        spec, normalization = {"channels": trunk.in_channels, "image_size": trunk.image_size, **_identity(trunk.in_channels)}, "none (your datasets)"
    if trunk_arch and trunk_arch != trunk.arch:
        # Another architecture than the teacher's: same input, the architecture's own width.
        trunk = BackboneConfig(in_channels=trunk.in_channels, image_size=trunk.image_size, arch=trunk_arch)
    teacher_tasks = list(teacher.task_classes)
    where = f"the teacher{' at ' + teacher_run if teacher_run else ''} (it was trained on these)"
    tasks = parse_tasks(",".join(tasks) if tasks else None, teacher_tasks, where)
    task_labels = {t: (task_labels or {}).get(t) or [str(i) for i in range(teacher.task_classes[t])] for t in tasks}
    # Built (architectures and image size checked, local weights loaded) before the run
    # folder exists, so a refusal leaves nothing behind.
    torch.manual_seed(config.seed)
    student = FactorNet(FactorConfig(
        task_classes={t: teacher.task_classes[t] for t in tasks},
        trunk=trunk,
        task_width=task_width,
        teacher_feature_dim=teacher.feature_dim,
        task_arch=task_arch,
        teacher_stage_dims=teacher_stage_dims(teacher, trunk, infomax_stages),
    ))
    notes = load_pretrained(student.trunk, pretrained, student.config.trunk) if pretrained else {}
    info = {
        "kind": "factorized", "kfdeploy": __version__,
        "data": opened.kind if opened else "custom", "data_source": opened.record if opened else None,
        "input": spec, "normalization": normalization,
        "teacher_run": teacher_run, "teacher": teacher_source,
        "model": student.config.to_dict(), "task_labels": task_labels,
        "train": asdict(config), "loss_weights": asdict(weights), "pretrained": _pretrained_record(pretrained, notes),
    }
    if opened is not None:
        resolve_feed(config.feed, opened.source, env.device)
    check_teacher_targets(config.teacher_targets, fixed_rows(opened.source) if opened is not None else None)
    resuming, info, config, student = _begin_run(out, resume, env, info, config, student)
    if resuming and opened is not None:
        opened = _reopen_if_changed(opened, info, config.seed, env.world_size)
    if info.get("pretrained"):
        # The user's weights for the trunk win; the teacher's heads would not fit them.
        message = f"trunk initialised from {info['pretrained']['file']} (no warm start from the teacher)"
    else:
        warm = student.warm_start_from(teacher)
        message = "trunk and heads warm-started from the teacher" if warm else "trunk trained from scratch (teacher architecture differs)"
    if env.is_main and not resuming:
        if opened is not None:
            print(f"data: {opened.kind} ({opened.channels}x{opened.image_size}x{opened.image_size}), normalization: {normalization}")
        print(message)
    if opened is not None:
        source = normalized(opened.source, info.get("input") or spec)
        images, labels = source.heldout(config.eval_images)
    else:
        source = DatasetSource(train_data, tasks, seed=config.seed, world_size=env.world_size)
        images, labels = _held_out_batch(heldout_data, tasks, config.eval_images)
    student.fuse_tasks = config.fuse_tasks
    if env.is_main:
        print(student.describe_task_networks())
    objective = FactorizationObjective(student, teacher, LossWeights(**info["loss_weights"]))
    indexed = fixed_rows(opened.source) if opened is not None else None
    source, setup_s = with_teacher_targets(config.teacher_targets, source, indexed, teacher, len(student.stage_proj) + 1,
                                           env.device, show_progress=env.is_main)
    train(
        out, objective, source, config,
        evaluate=lambda m: accuracy(m, images, labels), env=env, resume=resuming, desc="factorize", setup_s=setup_s,
    )
    return out
