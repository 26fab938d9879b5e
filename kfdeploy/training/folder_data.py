"""A labelled image folder (`--data PATH`): images plus `labels.csv`, one class name per task.

    PATH/labels.csv     file,shape,colour[,split]
                        img/0001.png,circle,red,train
                        img/0002.jpg,square,blue,heldout

- `file`: a path relative to PATH (PNG, JPEG or anything Pillow reads; any size; grey or
  colour). Every other column but `split` is a task; its values are class names.
- `split` (optional): `train` or `heldout`. Without it a seeded hash of the file name puts
  HELDOUT_PERCENT% of the files in the held-out split: a file is in one split only, and
  stays there whatever else the folder holds (adding files moves none).
- Classes are the names found, sorted (numerically when every name is a number); a run
  records them, and they become the bundle's labels.

Everything is checked and decoded before a run folder exists, so bad input ends with one
line and leaves nothing behind. Images are decoded once with kfdeploy.images (the decoder
`kfdeploy run` and the demo use), converted to the run's channels and resized to its
size there, and held in memory as uint8 (N, C, S, S): 10,000 RGB images at 128x128 take
0.5 GB. Batches then cost an index and a division, like the sprites'.
"""
from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import KfError
from ..names import TASK_NAME_RULE, is_task_name, unprintable
from .data import epoch_slice

LABELS_FILE = "labels.csv"
FILE_COLUMN = "file"
SPLIT_COLUMN = "split"
SPLITS = ("train", "heldout")
HELDOUT_PERCENT = 20  # of the files, when labels.csv has no split column
DEFAULT_IMAGE_SIZE = 64
_FORMAT = f"{LABELS_FILE} needs a '{FILE_COLUMN}' column and one column of class names per task (optional: '{SPLIT_COLUMN}', train or heldout)"


def _class_order(names) -> List[str]:
    """Sorted class names; numerically when all are numbers, so '2' comes before '10'."""
    names = sorted(set(names))
    try:
        return sorted(names, key=float)
    except ValueError:
        return names


def _hash_heldout(files: Sequence[str], seed: int) -> np.ndarray:
    """True for the files a seeded hash of their name puts in the held-out split."""
    def bucket(name: str) -> int:
        digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") % 100

    return np.array([bucket(f) < HELDOUT_PERCENT for f in files], dtype=bool)


@dataclass
class LabelTable:
    """labels.csv, checked: files, their split, and each task's labels as class indices."""

    folder: Path
    files: List[str]
    heldout: np.ndarray  # bool (N,)
    labels: Dict[str, np.ndarray]  # task -> int64 (N,) index into task_labels[task]
    task_labels: Dict[str, List[str]]
    split: str  # "column" or "hash"
    split_seed: int
    sha256: str  # of labels.csv, so a run says which table it trained on

    @property
    def tasks(self) -> List[str]:
        return list(self.task_labels)


def read_labels(
    folder: Path | str,
    tasks: Optional[Sequence[str]] = None,
    known_classes: Optional[Mapping[str, Sequence[str]]] = None,
    split_seed: int = 0,
) -> LabelTable:
    """Read and check PATH/labels.csv (see the module's docstring); KfError for anything wrong.

    `tasks`: the columns to use (default: every task column). `known_classes`: class names
    a teacher already has, per task; labels then index into those, and a name the teacher
    does not know is refused.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise KfError(f"--data {folder}: no such folder; pass a folder holding images and {LABELS_FILE}, or sprites or sprites-rgb")
    table_path = folder / LABELS_FILE
    if not table_path.is_file():
        raise KfError(f"--data {folder} has no {LABELS_FILE}; {_FORMAT}")
    raw = table_path.read_bytes()
    try:
        rows = list(csv.reader(raw.decode("utf-8-sig").splitlines()))
    except UnicodeDecodeError as exc:
        raise KfError(f"{table_path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8 CSV") from None
    except csv.Error as exc:
        raise KfError(f"{table_path} is not a readable CSV file ({exc})") from None
    rows = [(number, [cell.strip() for cell in row]) for number, row in enumerate(rows, start=1) if any(c.strip() for c in row)]
    if not rows:
        raise KfError(f"{table_path} is empty; {_FORMAT}")
    (_, header), body = rows[0], rows[1:]
    if FILE_COLUMN not in header:
        raise KfError(f"{table_path} has no '{FILE_COLUMN}' column (its columns: {', '.join(header) or 'none'}); {_FORMAT}")
    duplicate = next((c for c in header if header.count(c) > 1), None)
    if duplicate is not None:
        raise KfError(f"{table_path} names column '{duplicate}' twice")
    columns = [c for c in header if c not in (FILE_COLUMN, SPLIT_COLUMN)]
    if not columns:
        raise KfError(f"{table_path} has no task columns; {_FORMAT}")
    if tasks is None:
        tasks = columns
    if len(set(tasks)) != len(tasks):
        raise KfError(f"--tasks names a task twice: {','.join(tasks)}")
    for task in tasks:
        if task not in columns:
            raise KfError(f"{table_path} has no column for task '{task}'; its tasks: {', '.join(columns)}")

    for task in tasks:
        if not is_task_name(task):
            raise KfError(f"{table_path}: task column {task!r} cannot name a task module; rename it ({TASK_NAME_RULE})")
    if not body:
        raise KfError(f"{table_path} lists no images")

    index = {c: header.index(c) for c in header}
    files: List[str] = []
    names: Dict[str, List[str]] = {t: [] for t in tasks}
    splits: List[str] = []
    seen: Dict[str, int] = {}
    for number, row in body:
        row = row + [""] * (len(header) - len(row))
        if len(row) > len(header):
            raise KfError(f"{table_path} line {number} has {len(row)} cells but the header has {len(header)}")
        file = row[index[FILE_COLUMN]]
        if not file:
            raise KfError(f"{table_path} line {number} has no file name")
        if file in seen:
            raise KfError(f"{table_path} lists {file} twice (lines {seen[file]} and {number})")
        seen[file] = number
        if not (folder / file).is_file():
            raise KfError(f"{table_path} line {number} lists {file}, which is not a file in {folder}")
        for task in tasks:
            name = row[index[task]]
            if not name:
                raise KfError(f"{table_path} line {number} ({file}) has no class for task '{task}'")
            if unprintable(name):
                raise KfError(f"{table_path} line {number} ({file}): class {name!r} of task '{task}' holds control "
                              "characters; class names become a bundle's labels, so write them as plain text")
            names[task].append(name)
        if SPLIT_COLUMN in index:
            split = row[index[SPLIT_COLUMN]]
            if split not in SPLITS:
                raise KfError(f"{table_path} line {number} ({file}): split must be train or heldout, not {split!r}")
            splits.append(split)
        files.append(file)

    heldout = np.array([s == "heldout" for s in splits]) if splits else _hash_heldout(files, split_seed)
    if heldout.all() or not heldout.any():
        which = "training" if heldout.all() else "held-out"
        hint = f"mark some rows heldout in its {SPLIT_COLUMN} column" if splits else f"add a {SPLIT_COLUMN} column (train or heldout)"
        raise KfError(f"{table_path} gives no {which} images ({len(files)} listed); {hint}")
    task_labels: Dict[str, List[str]] = {}
    labels: Dict[str, np.ndarray] = {}
    for task in tasks:
        found = names[task]
        known = list(known_classes[task]) if known_classes and known_classes.get(task) is not None else None
        if known is None:
            classes = _class_order(found)
            if len(classes) < 2:
                raise KfError(f"task '{task}' has a single class ({classes[0]!r}) in {table_path}: there is nothing to learn; "
                              "give it images of other classes or leave it out with --tasks")
        else:
            classes = known
            stranger = next((n for n in found if n not in set(known)), None)
            if stranger is not None:
                raise KfError(f"class {stranger!r} of task '{task}' in {table_path} is not one the teacher knows "
                              f"({', '.join(known[:8])}{', ...' if len(known) > 8 else ''})")
        position = {name: i for i, name in enumerate(classes)}
        labels[task] = np.array([position[n] for n in found], dtype=np.int64)
        task_labels[task] = classes
        trained = set(labels[task][~heldout].tolist())
        unseen = next((i for i in np.flatnonzero(heldout) if labels[task][i] not in trained), None)
        if unseen is not None:
            raise KfError(
                f"class {found[unseen]!r} of task '{task}' is in held-out images ({files[unseen]}) but in no training image; "
                f"add training images of it{'' if splits else f' or a {SPLIT_COLUMN} column to {LABELS_FILE}'}"
            )
    return LabelTable(folder, files, heldout, labels, task_labels, "column" if splits else "hash", split_seed,
                      hashlib.sha256(raw).hexdigest())


def infer_channels(table: LabelTable) -> int:
    """3 if any image holds colour, else 1 (from the files' headers; no pixels decoded)."""
    from ..images import is_colour

    for file in table.files:
        if _in_folder(table, file, is_colour):
            return 3
    return 1


def _in_folder(table: LabelTable, file: str, read):
    try:
        return read(table.folder / file)
    except KfError as exc:
        raise KfError(f"{table.folder / LABELS_FILE} lists {file}: {exc}") from None


def load_images(table: LabelTable, size: int, channels: int, workers: Optional[int] = None) -> np.ndarray:
    """Every listed image decoded, converted to `channels` and resized to size x size: uint8 (N, C, S, S).

    Threads decode in parallel (Pillow releases the GIL while it decodes and resizes); the
    result does not depend on how many.
    """
    from concurrent.futures import ThreadPoolExecutor

    from ..images import fit_image, read_image

    images = np.empty((len(table.files), channels, size, size), dtype=np.uint8)

    def load(i: int) -> None:
        images[i] = fit_image(_in_folder(table, table.files[i], read_image), channels, (size, size))[0]

    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        for _ in pool.map(load, range(len(table.files))):  # consumed in order: the first bad file is the one named
            pass
    return images


def channel_stats(images: np.ndarray) -> Tuple[List[float], List[float]]:
    """Per-channel mean and standard deviation of uint8 (N, C, H, W) images, in [0, 1] units.

    Exact, from a histogram of the 256 values per channel. A constant channel gets std
    1/255 rather than 0, so normalising by it stays finite.
    """
    values = np.arange(256, dtype=np.float64)
    mean, std = [], []
    for c in range(images.shape[1]):
        counts = np.bincount(images[:, c].ravel(), minlength=256).astype(np.float64)
        m = (counts @ values) / counts.sum()
        variance = (counts @ np.square(values - m)) / counts.sum()
        mean.append(round(float(m) / 255.0, 6))
        std.append(round(max(float(np.sqrt(variance)), 1.0) / 255.0, 6))
    return mean, std


class FolderSource:
    """A loaded folder as the trainer's batch source (images float32 in [0, 1]).

    Each epoch is a seeded permutation of the training images, split across ranks; a step
    maps to a fixed slice of it, so a batch is a function of (seed, rank, step) and resuming
    needs nothing but the step number.
    """

    def __init__(self, table: LabelTable, images: np.ndarray, tasks: Sequence[str], seed: int = 0, world_size: int = 1):
        self.table = table
        self.images = images
        self.tasks = tuple(tasks)
        self.seed = seed
        self.world_size = world_size
        self.train_index = np.flatnonzero(~table.heldout)
        self.heldout_index = np.flatnonzero(table.heldout)

    def rows(self, rows: np.ndarray):
        """The batch of these rows of the label table."""
        import torch

        images = torch.from_numpy(self.images[rows]).float().div_(255.0)
        labels = {t: torch.from_numpy(self.table.labels[t][rows]) for t in self.tasks}
        return images, labels

    def picked(self, step: int, batch_size: int, rank: int = 0) -> np.ndarray:
        """The label-table rows of a step's batch."""
        return self.train_index[epoch_slice(len(self.train_index), step, batch_size, self.seed, self.world_size, rank)]

    def batch(self, step: int, batch_size: int, rank: int = 0):
        return self.rows(self.picked(step, batch_size, rank))

    def heldout(self, count: int, offset: int = 0):
        return self.rows(self.heldout_index[offset : offset + count])
