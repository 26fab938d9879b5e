"""Factorize your own teacher on your own data: a complete, runnable example.

The data here is a toy (not sprites): 32x32 noisy images holding one bright rectangle;
task "quadrant" asks where it is (4 classes), task "size" how big it is (3 classes).
The teacher is an ordinary PyTorch model you trained yourself. All kfdeploy needs is:

- the teacher exposes `task_classes`, `feature_dim`, `forward_features(x)` and
  `forward_head(features) -> {task: logits}` (kfdeploy.training.models.TeacherProtocol);
- a dataset item is `(image tensor (C, H, W) in [0, 1], {task: int label})`.

    python demos/custom_teacher.py --out runs/custom      # the bundle goes to runs/custom-bundle
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import kfdeploy
from kfdeploy.bundling.export import export_bundle
from kfdeploy.training.evaluate import evaluate_run, format_table
from kfdeploy.training.models import BackboneConfig
from kfdeploy.training.pipeline import factorize
from kfdeploy.training.train import TrainConfig


# Class names, in the order of the labels the data gives (they become the bundle's labels).
TASK_LABELS = {"quadrant": ["top-left", "top-right", "bottom-left", "bottom-right"], "size": ["small", "medium", "large"]}


class Rectangles(torch.utils.data.Dataset):
    """Toy two-task data, generated once from a seed."""

    sizes = (4, 7, 10)

    def __init__(self, count: int, seed: int):
        rng = np.random.default_rng(seed)
        self.images = rng.uniform(0.0, 0.3, size=(count, 1, 32, 32)).astype(np.float32)
        self.quadrant = rng.integers(0, 4, count)
        self.size = rng.integers(0, 3, count)
        for i in range(count):
            side = self.sizes[self.size[i]]
            top = (self.quadrant[i] // 2) * 16 + rng.integers(0, 16 - side + 1)
            left = (self.quadrant[i] % 2) * 16 + rng.integers(0, 16 - side + 1)
            self.images[i, 0, top : top + side, left : left + side] = 1.0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return torch.from_numpy(self.images[i]), {"quadrant": int(self.quadrant[i]), "size": int(self.size[i])}


class MyTeacher(nn.Module):
    """Your network: any architecture, as long as it offers the four members below."""

    task_classes = {"quadrant": 4, "size": 3}
    feature_dim = 64

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(32 * 16, self.feature_dim), nn.ReLU(),
        )
        self.heads = nn.ModuleDict({t: nn.Linear(self.feature_dim, n) for t, n in self.task_classes.items()})

    def forward_features(self, x):
        return self.body(x)

    def forward_head(self, features):
        return {t: head(features) for t, head in self.heads.items()}


def train_my_teacher(data: Rectangles, epochs: int) -> MyTeacher:
    """Stands in for however you trained your teacher."""
    torch.manual_seed(0)
    teacher = MyTeacher()
    optimizer = torch.optim.Adam(teacher.parameters(), lr=2e-3)
    loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True)
    for _ in range(epochs):
        for images, labels in loader:
            logits = teacher.forward_head(teacher.forward_features(images))
            loss = sum(F.cross_entropy(logits[t], labels[t]) for t in logits)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return teacher.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/custom"))
    parser.add_argument("--bundle", type=Path, help="where the bundle goes (default: --out's name + '-bundle' beside it)")
    parser.add_argument("--quick", action="store_true", help="a smaller run (used by the tests)")
    args = parser.parse_args()

    train_set, test_set = Rectangles(4000, seed=1), Rectangles(1000, seed=2)
    teacher = train_my_teacher(train_set, epochs=2 if args.quick else 6)

    factorize(
        teacher, args.out, train_data=train_set, heldout_data=test_set,
        trunk=BackboneConfig(image_size=32, width=16, feature_dim=64),  # sized for 1x32x32 input
        task_width=8,
        config=TrainConfig(steps=150 if args.quick else 1000, batch_size=64, eval_every=50, log_every=10),
        task_labels=TASK_LABELS,
    )
    result = evaluate_run(args.out, teacher=teacher, heldout_data=test_set)
    print(format_table(result))
    print(f"factor networks in {args.out}")

    # Ship them: one ONNX file per module, checksummed, checked and scored on the test images
    # (the first of them become the bundle's examples).
    bundle = export_bundle(args.out, args.bundle or args.out.with_name(args.out.name + "-bundle"), heldout_data=test_set)
    # What an app does with the bundle: no PyTorch, no teacher, only the tasks it wants.
    model = kfdeploy.load(bundle, tasks=["quadrant"])
    scores = ", ".join(f"{t} {model.bundle.task(t)['heldout_accuracy']:.4f}" for t in TASK_LABELS)
    print(f"bundle written to {bundle}: held-out accuracy {scores} (ONNX Runtime)")
    images = np.stack([test_set[i][0].numpy() for i in range(6)])
    answers = model.top(model(images))["quadrant"]
    truth = [TASK_LABELS["quadrant"][test_set[i][1]["quadrant"]] for i in range(6)]
    print("quadrant, bundle's answer vs truth: " + ", ".join(f"{best[0][0]} ({true})" for best, true in zip(answers, truth)))
    model.add_task("size")  # composed anew while calls could go on
    sizes = [best[0][0] for best in model.top(model(images))["size"]]
    print(f"size added live: {', '.join(sizes)} ({model.last_timings.total_ms:.2f} ms for 6 images, both tasks)")


if __name__ == "__main__":
    main()
