"""Evaluation of a factorized run: factor networks against their teacher, on one held-out set.

Also measures disentanglement, the paper's claim that each task's knowledge stays in its
task module: a linear probe reads task j from TSN_i's code (mu); the diagonal should be
high and the off-diagonal low.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import KfError
from ..extras import pyplot
from .data import SHAPES, collate
from .models import FactorNet
from .runs import load_factor_run, load_teacher, write_json_atomic
from .train import accuracy

EVALUATION_FILE = "evaluation.json"
DISENTANGLEMENT_PNG = "disentanglement.png"


@torch.no_grad()
def task_codes(model: FactorNet, images: torch.Tensor, batch_size: int = 1024) -> Dict[str, torch.Tensor]:
    codes: Dict[str, List[torch.Tensor]] = {t: [] for t in model.tasks}
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        for task, module in model.tasks.items():
            codes[task].append(module.code(chunk)[0])
    return {t: torch.cat(c) for t, c in codes.items()}


def linear_probe_accuracy(
    train_x: torch.Tensor, train_y: Dict[str, torch.Tensor],
    test_x: torch.Tensor, test_y: Dict[str, torch.Tensor],
    classes: Dict[str, int], steps: int = 300,
) -> Dict[str, float]:
    """Fit one multinomial logistic regression per target task (jointly, one matrix) on
    standardised features; return held-out accuracy per target task."""
    torch.manual_seed(0)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    probe = nn.Linear(train_x.shape[1], sum(classes.values()))
    optimizer = torch.optim.Adam(probe.parameters(), lr=0.02, weight_decay=1e-4)
    bounds = np.cumsum([0] + list(classes.values()))
    for _ in range(steps):
        logits = probe(train_x)
        loss = sum(
            F.cross_entropy(logits[:, bounds[i] : bounds[i + 1]], train_y[t]) for i, t in enumerate(classes)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        logits = probe(test_x)
    return {
        t: (logits[:, bounds[i] : bounds[i + 1]].argmax(1) == test_y[t]).float().mean().item()
        for i, t in enumerate(classes)
    }


def disentanglement(model: FactorNet, images: torch.Tensor, labels: Dict[str, torch.Tensor]) -> Dict[str, Dict[str, float]]:
    """matrix[i][j]: accuracy of a linear probe predicting task j from TSN_i's code."""
    half = len(images) // 2
    codes = task_codes(model, images)
    split = lambda y: ({t: v[:half] for t, v in y.items()}, {t: v[half:] for t, v in y.items()})  # noqa: E731
    train_y, test_y = split(labels)
    classes = {t: model.task_classes[t] for t in labels}
    return {
        i: linear_probe_accuracy(code[:half], train_y, code[half:], test_y, classes)
        for i, code in codes.items()
    }


def plot_disentanglement(matrix: Dict[str, Dict[str, float]], chance: Dict[str, float], path: Path) -> None:
    plt = pyplot("train")

    rows, cols = list(matrix), list(next(iter(matrix.values())))
    values = np.array([[matrix[r][c] for c in cols] for r in rows])
    fig, ax = plt.subplots(figsize=(1.3 * len(cols) + 2, 1.1 * len(rows) + 1.6))
    image = ax.imshow(values, vmin=0, vmax=1, cmap="viridis")
    for r in range(len(rows)):
        for c in range(len(cols)):
            ax.text(c, r, f"{values[r, c]:.2f}", ha="center", va="center",
                    color="black" if values[r, c] > 0.6 else "white", fontsize=9)
    ax.set_xticks(range(len(cols)), [f"{c}\n(chance {chance[c]:.2f})" for c in cols], fontsize=8)
    ax.set_yticks(range(len(rows)), [f"TSN {r}" for r in rows])
    ax.set_xlabel("task read by a linear probe")
    ax.set_title("Disentanglement: what each task module's code knows")
    fig.colorbar(image, ax=ax, label="probe accuracy (held-out)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarise(matrix: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    diagonal = [matrix[t][t] for t in matrix if t in matrix[t]]
    off = [matrix[i][j] for i in matrix for j in matrix[i] if i != j]
    return {
        "diagonal_mean": float(np.mean(diagonal)) if diagonal else float("nan"),
        "off_diagonal_mean": float(np.mean(off)) if off else float("nan"),
        "off_diagonal_max": float(np.max(off)) if off else float("nan"),
    }


def format_table(result: dict) -> str:
    lines = [f"{'task':<12} {'teacher':>8} {'factor':>8} {'delta':>8}"]
    for task, teacher_acc in result["teacher_accuracy"].items():
        factor_acc = result["factor_accuracy"][task]
        lines.append(f"{task:<12} {teacher_acc:>8.4f} {factor_acc:>8.4f} {factor_acc - teacher_acc:>+8.4f}")
    if "orientation_by_shape" in result:
        lines.append("orientation by shape (teacher / factor; ceiling from symmetry):")
        for shape, row in result["orientation_by_shape"].items():
            lines.append(f"  {shape:<10} {row['teacher']:.3f} / {row['factor']:.3f}  (ceiling {row['ceiling']:.2f}, chance 0.025)")
    d = result["disentanglement_summary"]
    lines.append(
        f"disentanglement: diagonal mean {d['diagonal_mean']:.3f}, off-diagonal mean "
        f"{d['off_diagonal_mean']:.3f} (max {d['off_diagonal_max']:.3f})"
    )
    return "\n".join(lines)


def _teacher_accuracy(teacher: nn.Module, images: torch.Tensor, labels: Dict[str, torch.Tensor]) -> Dict[str, float]:
    # Only the protocol is promised: a user's teacher need not have a forward().
    return accuracy(teacher, images, labels, predict=lambda x: teacher.forward_head(teacher.forward_features(x)))


def _orientation_by_shape(teacher, student, images, shape_labels, orientation) -> Dict[str, dict]:
    ceilings = {"square": 0.25, "ellipse": 0.5, "heart": 1.0}  # rotational symmetry of each shape
    result = {}
    for index, name in enumerate(SHAPES):
        mask = shape_labels == index
        if mask.any():
            subset = images[mask]
            labels = {"orientation": orientation[mask]}
            result[name] = {
                "teacher": _teacher_accuracy(teacher, subset, labels)["orientation"],
                "factor": accuracy(student, subset, labels)["orientation"],
                "ceiling": ceilings[name],
                "images": int(mask.sum()),
            }
    return result


def evaluate_run(
    run_dir: Path,
    teacher: Optional[nn.Module] = None,
    heldout_data=None,
    images: int = 8192,
) -> dict:
    """Score teacher and factor networks on the same held-out images; write JSON and PNG."""
    run_dir = Path(run_dir)
    student, info = load_factor_run(run_dir)
    tasks = list(student.task_classes)
    if teacher is None:
        if not info.get("teacher_run"):
            record = info.get("teacher") or {}
            weights = f" --teacher-weights {record['weights']['file']}" if record.get("weights") else ""
            how = (f"pass it again: kfdeploy evaluate {run_dir} --teacher-factory {record['factory']}{weights}" if record.get("factory")
                   else "evaluate it from Python with evaluate_run(run, teacher=..., heldout_data=...)")
            raise KfError(f"{run_dir} factorized your own teacher; {how}")
        teacher, _ = load_teacher(Path(info["teacher_run"]))
    embedded = False
    if heldout_data is None:
        from .pipeline import EMBEDDED, _identity, normalized, open_run_data

        # The run's own data, normalized as it trained; every sprite task, for orientation by shape.
        kind = info.get("data", "sprites")
        embedded = kind in EMBEDDED
        opened = open_run_data(info, tasks=list(EMBEDDED[kind][0]) if embedded else None)
        spec = info.get("input") or _identity(opened.channels)
        x, all_labels = normalized(opened.source, spec).heldout(images)
    else:
        x, all_labels = collate([heldout_data[i] for i in range(min(images, len(heldout_data)))], tasks)
    labels = {t: all_labels[t] for t in tasks}
    result = {
        "run": str(run_dir),
        "heldout_images": len(x),
        "teacher_accuracy": _teacher_accuracy(teacher, x, labels),
        "factor_accuracy": accuracy(student, x, labels),
    }
    if embedded and "orientation" in tasks:
        result["orientation_by_shape"] = _orientation_by_shape(
            teacher, student, x, all_labels["shape"], all_labels["orientation"]
        )
    matrix = disentanglement(student, x, labels)
    result["disentanglement"] = matrix
    result["disentanglement_summary"] = summarise(matrix)
    result["chance"] = {t: 1.0 / n for t, n in student.task_classes.items()}
    write_json_atomic(run_dir / EVALUATION_FILE, result)
    plot_disentanglement(matrix, result["chance"], run_dir / DISENTANGLEMENT_PNG)
    return result
