"""The InfoMax-Bottleneck objective of Knowledge Factorization, and the teacher's loss.

Objectives are nn.Modules whose forward returns (loss, metrics) so DistributedDataParallel
can wrap them: DDP only synchronises gradients of what runs inside its forward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .models import Code, FactorNet, freeze
from .teacher_targets import split_targets, teacher_outputs, unpack

Metrics = Dict[str, torch.Tensor]


def wide(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor in at least float32: losses of autocast's half-precision activations are taken
    in float32, and a float64 model (the fusion parity test) keeps its precision."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


def infomax_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Negative contrastive lower bound on I(student; teacher) over a batch.

    `-(E_joint[s] - log E_marginal[exp s])` with s the cosine similarity: matched pairs
    (same image) are the joint, all pairs the product of marginals.
    """
    scores = F.normalize(wide(student), dim=1) @ F.normalize(wide(teacher), dim=1).T
    joint = scores.diagonal().mean()
    marginal = torch.logsumexp(scores.flatten(), dim=0) - math.log(scores.numel())
    return -(joint - marginal)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)), summed over the code, averaged over the batch."""
    mu, logvar = wide(mu), wide(logvar)
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1).mean()


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft-target KL at a temperature, scaled by T^2 so its gradient keeps its size."""
    t = temperature
    return F.kl_div(
        F.log_softmax(wide(student) / t, dim=1),
        F.log_softmax(wide(teacher) / t, dim=1),
        log_target=True,
        reduction="batchmean",
    ) * (t * t)


class TeacherObjective(nn.Module):
    """Sum of per-task cross-entropies for the monolithic teacher."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, labels: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Metrics]:
        logits = self.model(images)
        metrics = {f"ce_{t}": F.cross_entropy(wide(logits[t]), labels[t]) for t in labels}
        return sum(metrics.values()), metrics


@dataclass
class LossWeights:
    """Defaults from the reference configs."""

    kd: float = 0.1  # lambda_kd
    feat: float = 1.0  # lambda_feat, InfoMax
    kl: float = 1e-3  # beta, InfoMin
    aux: float = 1.0  # the auxiliary head on the task code alone
    temperature: float = 10.0


class FactorizationObjective(nn.Module):
    """InfoMax on the trunk, InfoMin on each task code, KD and label losses on each head."""

    def __init__(self, student: FactorNet, teacher: nn.Module, weights: LossWeights):
        super().__init__()
        self.model = student
        self.teacher = teacher.eval().requires_grad_(False)
        self.weights = weights

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher is a fixed reference, never in training mode
        return self

    def forward(self, images: torch.Tensor, labels: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Metrics]:
        w = self.weights
        student = self.model
        labels, targets = split_targets(labels)
        if not targets:  # not precomputed: the teacher runs in the step
            with torch.no_grad():
                targets = teacher_outputs(self.teacher, images, len(student.stage_proj) + 1)
        teacher_features, teacher_stages, teacher_logits = unpack(targets)
        common, student_stages = student.forward_stages(images)
        # The reference averages InfoMax over the stages it aligns.
        infomax = [infomax_loss(s, project(wide(t))) for s, project, t in zip(student_stages, student.stage_proj, teacher_stages)]
        infomax.append(infomax_loss(common, student.teacher_proj(wide(teacher_features))))
        metrics: Metrics = {"infomax": sum(infomax) / len(infomax) * w.feat}
        codes = student.task_codes(images)  # task networks of one architecture run fused
        noise = code_noise(codes)
        for (task, module), eps in zip(student.tasks.items(), noise):
            logits = task_terms(task, module, common, codes[task], eps, labels[task], w, metrics)
            metrics[f"kd_{task}"] = distillation_loss(logits, teacher_logits[task], w.temperature) * w.kd
        return sum(metrics.values()), metrics


def code_noise(codes: Dict[str, Code]) -> torch.Tensor:
    """The reparameterisation's standard normal draws for every task's code, in one draw: task
    i's are row i, however the codes were computed (fused or not), so both draw the same."""
    mu = next(iter(codes.values()))[0]
    return torch.randn((len(codes), *mu.shape), device=mu.device, dtype=mu.dtype)


def task_terms(task: str, module: nn.Module, common: torch.Tensor, code: Code, noise: torch.Tensor,
               labels: torch.Tensor, w: LossWeights, metrics: Metrics) -> torch.Tensor:
    """A task module's own terms, added to `metrics`: label loss on its head and on its
    auxiliary head, InfoMin on its code sampled with `noise`. Returns the head's logits."""
    mu, logvar = code
    sampled = mu + noise * (0.5 * logvar).exp()  # reparameterisation
    logits = module.head(common + sampled)
    metrics[f"ce_{task}"] = F.cross_entropy(wide(logits), labels)
    metrics[f"aux_{task}"] = F.cross_entropy(wide(module.aux_head(sampled)), labels) * w.aux
    metrics[f"kl_{task}"] = gaussian_kl(mu, logvar) * w.kl
    return logits


def single_task_terms(task: str, module: nn.Module, images: torch.Tensor, common: torch.Tensor, labels: torch.Tensor,
                      w: LossWeights, metrics: Metrics) -> torch.Tensor:
    """`task_terms` of one task module run on its own (its code computed here)."""
    code = module.code(images)
    return task_terms(task, module, common, code, code_noise({task: code})[0], labels, w, metrics)


class FrozenTrunkObjective(nn.Module):
    """A new task module trained against a shipped trunk that stays exactly as it was
    (kfdeploy add-task): no gradient reaches the trunk, and it stays in eval mode so not
    even BatchNorm's running statistics move. There is no teacher for a new task, so no KD."""

    def __init__(self, student: FactorNet, task: str, weights: LossWeights):
        super().__init__()
        self.model = student.requires_grad_(False)
        freeze(student.trunk)  # held by the trunk itself: an evaluation between steps resets modes
        student.tasks[task].requires_grad_(True)
        self.task, self.weights = task, weights

    def forward(self, images: torch.Tensor, labels: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Metrics]:
        with torch.no_grad():
            common = self.model.forward_features(images)
        metrics: Metrics = {}
        single_task_terms(self.task, self.model.tasks[self.task], images, common, labels[self.task], self.weights, metrics)
        return sum(metrics.values()), metrics
