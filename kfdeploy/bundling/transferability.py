"""How well will a bundle's frozen trunk serve a new task? Scored before any training.

`kfdeploy transferability BUNDLE --data SOURCE` passes a few hundred labelled images of
SOURCE through the trunk exactly as shipped (its ONNX graph, ONNX Runtime on the CPU) and
scores each task's labels against the trunk's `common` feature with LogME:

    Kaichao You, Yong Liu, Jianmin Wang, Mingsheng Long. "LogME: Practical Assessment of
    Pre-trained Models for Transfer Learning". ICML 2021. arXiv:2102.11005.

LogME treats a read-out as Bayesian linear regression from the feature f (N x D) to each
class's one-hot column y: weights w ~ N(0, 1/alpha I), y = f w + N(0, 1/beta) noise. The
log marginal evidence log p(y | f, alpha, beta), maximised over alpha and beta by MacKay's
fixed-point iteration on one SVD of f, is high when a simple linear map explains the
labels (good transfer) and low when it must be complicated or the labels are noise. The
score is the evidence averaged over classes, divided by N (the paper's normalisation).

What it predicts: the posterior mean of that same regression is a closed-form ridge
read-out, so each score comes with that read-out's k-fold accuracy on the same images
(still no training loop: one SVD per fold) against the majority-class rate. Where the
bundle was factorized on the embedded sprites (manifest `source.data`), the trunk's own
tasks are scored the same way on the same images, as a reference scale.

One caution the report repeats: LogME grows as a task's one-hot columns get sparser (a
32-class task's columns are mostly zeros, which a read-out predicts easily), so compare
LogME between tasks with similar class counts; `prior` (the LogME of the labels against a
constant feature, what the class frequencies alone score) and `gain` (LogME minus prior)
remove most of that. The read-out accuracy is the number to compare across tasks.

Divergence from the authors' code (github.com/thuml/LogME), on purpose: the evidence
counts all D eigenvalues of alpha I + beta f'f (their fixed-point version drops the
D - N zero ones' log alpha when N < D), and it is evaluated at the final alpha, beta
rather than one update behind, so the returned evidence is exactly log p(y | f, alpha, beta)
for the returned alpha and beta (tests check it against the Gaussian density directly).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ..errors import KfError

DEFAULT_IMAGES = 500
FOLDS = 5  # read-out accuracy: k-fold over the scored images
MAX_ITERATIONS = 1000  # each iteration is a few vector operations of length min(N, D)
TOLERANCE = 1e-8  # converged: alpha and beta change less than this, relatively,
EVIDENCE_TOLERANCE = 1e-10  # or the evidence per image by less than this (where alpha or beta heads
# to infinity, slowly, the evidence has nearly reached its limit: within ~100x this)
METHOD = "LogME (You, Liu, Wang, Long, ICML 2021, arXiv:2102.11005)"


# --- LogME -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Evidence:
    """LogME of one feature matrix for one labelling. Per class (`classes` order, the one-hot
    columns): the evidence per image, the alpha and beta it converged to, and the posterior
    mean weights (D x classes), which make the ridge read-out `predict`."""

    score: float
    classes: np.ndarray
    evidences: np.ndarray
    alphas: np.ndarray
    betas: np.ndarray
    weights: np.ndarray
    iterations: int
    converged: bool

    def predict(self, features: np.ndarray) -> np.ndarray:
        """The read-out's class for each row of `features`: the one-hot column whose posterior
        mean prediction is largest."""
        return self.classes[np.argmax(np.asarray(features, dtype=np.float64) @ self.weights, axis=1)]


def _checked(features: np.ndarray, labels: np.ndarray):
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    if features.ndim != 2:
        raise KfError(f"LogME takes an (images, features) matrix, got shape {features.shape}")
    if labels.shape != (features.shape[0],):
        raise KfError(f"LogME needs one label per feature row: {features.shape[0]} rows, labels of shape {labels.shape}")
    if not np.isfinite(features).all():
        raise KfError("the features hold NaN or infinite values; the trunk's output is not usable for scoring")
    classes = np.unique(labels)
    if len(classes) < 2:
        which = f"all {len(labels)} labels are {classes[0].item()!r}" if len(classes) else "there are no labels"
        raise KfError(f"LogME needs at least two classes to tell apart; {which}")
    return features, labels, classes


def _spectrum(features: np.ndarray):
    """The thin SVD of the features without its zero singular values, which add nothing to
    the evidence (their eigenvalue alpha of alpha I + beta f'f cancels the prior's)."""
    u, s, vh = np.linalg.svd(features, full_matrices=False)
    keep = s > (s[0] if s.size else 0.0) * max(features.shape) * np.finfo(np.float64).eps
    return u[:, keep], s[keep], vh[keep]


def _fit(spectrum, targets: np.ndarray, dims: int):
    """MacKay's fixed point for every column of `targets` (N x C) at once; returns the
    evidence per column and image at the final (alpha, beta), those, the posterior means,
    the iterations and whether every column converged."""
    u, s, vh = spectrum
    n = targets.shape[0]
    sigma = (s**2)[:, None]  # eigenvalues of f'f (the non-zero ones), k x 1
    x = u.T @ targets  # the targets in the features' left singular basis, k x C
    x2 = x**2
    outside = ((targets - u @ x) ** 2).sum(0)  # |y|^2 outside f's column space (not |y|^2 - |x|^2: that cancels)
    tiny = np.finfo(np.float64).tiny
    # With N <= D every labelling is fit exactly as the noise vanishes, and the evidence can
    # keep rising towards a finite limit as beta grows without bound. A residual below
    # float64's resolution of |y|^2 is rounding, not signal: flooring it there holds beta
    # where the evidence is within rounding of that limit.
    floor = np.finfo(np.float64).eps * (targets**2).sum(0)

    # Symmetrically, a class that the features do not explain at all drives alpha (the prior
    # precision) up without bound, towards w = 0. Past sigma_max / eps, t = alpha / beta moves
    # no weight by a representable amount: alpha stops there.
    most = float(sigma.max()) / np.finfo(np.float64).eps if sigma.size else np.inf

    def terms(alpha, beta):
        t = alpha / beta
        kept = sigma / (sigma + t)  # how much of each direction the posterior keeps, in [0, 1]
        shrunk = t / (sigma + t)  # 1 - kept, without cancelling
        gamma = kept.sum(0)  # effective number of well-determined weights
        rest = (n - len(s)) + shrunk.sum(0)  # n - gamma, without cancelling when gamma nears n
        m2 = (x2 * kept**2 / sigma).sum(0)  # |m|^2 = sum sigma x^2 / (sigma + t)^2, which overflows
        res2 = (x2 * shrunk**2).sum(0) + outside  # |y - f m|^2
        # log p(y | f, alpha, beta) = D/2 log alpha + N/2 log beta - 1/2 log|alpha I + beta f'f|
        #   - beta/2 |y - f m|^2 - alpha/2 |m|^2 - N/2 log 2 pi; the D/2 log alpha cancels the
        #   log alpha of each eigenvalue, which leaves log(1 + sigma / t) for the non-zero ones.
        with np.errstate(divide="ignore", invalid="ignore"):  # t = 0 only with no features at all (k = 0)
            log_det = np.log1p(sigma / t).sum(0) if sigma.size else np.zeros_like(t)
            alpha_m2 = np.where(m2 > 0, alpha * m2, 0.0)
        evidence = (n / 2 * np.log(beta) - log_det / 2 - beta / 2 * res2 - alpha_m2 / 2 - n / 2 * math.log(2 * math.pi)) / n
        return gamma, rest, m2, res2, evidence

    alpha = np.ones(targets.shape[1])
    beta = np.ones(targets.shape[1])
    gamma, rest, m2, res2, evidence = terms(alpha, beta)
    converged = False
    for iteration in range(1, MAX_ITERATIONS + 1):
        new_alpha = np.minimum(gamma / np.maximum(m2, tiny), most * beta)
        new_beta = rest / np.maximum(res2, floor)
        # On the floor (only when N <= D) rest grows with t = alpha / beta, so the update reads
        # beta' = c / beta, which cycles between two values; their geometric mean is its fixed point.
        new_beta = np.where(res2 < floor, np.sqrt(new_beta * beta), new_beta)
        change = np.maximum(np.abs(new_alpha - alpha) / np.maximum(alpha, tiny), np.abs(new_beta - beta) / beta)
        alpha, beta, previous = new_alpha, new_beta, evidence
        gamma, rest, m2, res2, evidence = terms(alpha, beta)
        if ((change <= TOLERANCE) | (np.abs(evidence - previous) <= EVIDENCE_TOLERANCE)).all():
            converged = True
            break
    t = alpha / beta
    weights = vh.T @ (s[:, None] * x / (sigma + t)) if sigma.size else np.zeros((dims, targets.shape[1]))
    return evidence, alpha, beta, weights, iteration, converged


def logme_fit(features: np.ndarray, labels: np.ndarray, spectrum=None) -> Evidence:
    """LogME of `features` (N x D) for integer `labels` (N), with what it converged to.
    `spectrum`: `_spectrum(features)` when the caller already has it."""
    features, labels, classes = _checked(features, labels)
    targets = (labels[:, None] == classes[None, :]).astype(np.float64)
    evidence, alpha, beta, weights, iterations, converged = _fit(spectrum or _spectrum(features), targets, features.shape[1])
    return Evidence(float(evidence.mean()), classes, evidence, alpha, beta, weights, iterations, converged)


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """LogME (You et al., ICML 2021): the log marginal evidence of a Bayesian linear
    regression from `features` (N x D) to each class's one-hot column, maximised over its
    prior and noise precisions, averaged over the classes present and divided by N. Higher
    means the features transfer better to these labels. Float64, any N and D.

    Fewer than two classes, mismatched shapes or non-finite features are refused (KfError);
    constant or all-zero features are valid and score what the class frequencies alone do
    (a constant feature) or less (none: no intercept to fit them with)."""
    return logme_fit(features, labels).score


class Folds:
    """k folds of one feature matrix, each with the spectrum of its training rows, computed
    once and shared by every task scored on these features: the decompositions are the
    only costly step (each task's fixed point is vector arithmetic)."""

    def __init__(self, features: np.ndarray, folds: int = FOLDS, seed: int = 0):
        self.features = np.asarray(features, dtype=np.float64)
        order = np.random.default_rng(seed).permutation(len(self.features))
        self.splits = [(np.setdiff1d(order, held, assume_unique=True), held) for held in np.array_split(order, folds)]
        self._spectra: Dict[int, tuple] = {}

    def spectrum(self, fold: int):
        if fold not in self._spectra:
            self._spectra[fold] = _spectrum(self.features[self.splits[fold][0]])
        return self._spectra[fold]

    def accuracy(self, labels: np.ndarray) -> float:
        """The share of rows whose held-out fold's read-out, fit on the other folds, is right."""
        _, labels, _ = _checked(self.features, labels)
        right = 0
        for fold, (train, held) in enumerate(self.splits):
            if len(np.unique(labels[train])) < 2:  # nothing to fit: the read-out can only say the one class it saw
                right += int((labels[held] == labels[train][0]).sum())
                continue
            fit = logme_fit(self.features[train], labels[train], self.spectrum(fold))
            right += int((fit.predict(self.features[held]) == labels[held]).sum())
        return right / len(labels)


def readout_accuracy(features: np.ndarray, labels: np.ndarray, folds: int = FOLDS, seed: int = 0) -> float:
    """k-fold accuracy of LogME's posterior-mean read-out: fit on k-1 folds, predict the
    held-out fold, every image predicted once. Training-free: one SVD per fold."""
    return Folds(features, folds, seed).accuracy(labels)


# --- the trunk's feature -----------------------------------------------------------------------

def trunk_features(bundle, images: np.ndarray) -> np.ndarray:
    """The trunk's `common` feature (N x D, float64) of 0-1 pixel `images` (N, C, H, W),
    through the bundle's own ONNX graph, in batches the bundle allows."""
    from .export import ort_session, run_module

    session = ort_session(bundle.graph("trunk").SerializeToString())
    batch, width = bundle.manifest["input"]["batch"], bundle.manifest["trunk"]["output"]["width"]
    images = np.ascontiguousarray(images, dtype=np.float32)
    out: List[np.ndarray] = []
    for start in range(0, len(images), batch["max"]):
        chunk = images[start : start + batch["max"]]
        rows = len(chunk)
        if rows < batch["min"]:  # pad a short last batch with copies of its first image
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch["min"] - rows, axis=0)])
        out.append(run_module(session, {"image": chunk}, "trunk", len(chunk), width)[:rows])
    return np.concatenate(out).astype(np.float64)


# --- the report --------------------------------------------------------------------------------

VERDICTS = (  # by the share of the way from chance to 100% that the linear read-out goes
    (0.9, "in the trunk's feature: a linear read-out nearly solves it"),
    (0.5, "largely in the trunk's feature: a task module should learn it quickly"),
    (0.15, "weakly in the trunk's feature: the task module must learn most of it"),
    (0.05, "barely in the trunk's feature: a linear read-out does little better than chance"),
    (-math.inf, "not in the trunk's feature: a linear read-out is at chance"),
)


def verdict(accuracy: float, chance: float) -> str:
    share = (accuracy - chance) / (1.0 - chance) if chance < 1.0 else 0.0
    return next(text for bound, text in VERDICTS if share >= bound)


def _score_task(folds: Folds, spectrum, labels: np.ndarray, classes: int) -> dict:
    fit = logme_fit(folds.features, labels, spectrum)
    prior = logme_fit(np.ones((len(labels), 1)), labels).score
    accuracy = folds.accuracy(labels)
    chance = float(np.bincount(labels).max() / len(labels))
    return {
        "classes": classes, "classes_seen": int(len(fit.classes)),
        "logme": fit.score, "prior": prior, "gain": fit.score - prior, "converged": fit.converged,
        "readout_accuracy": accuracy, "chance": chance, "verdict": verdict(accuracy, chance),
    }


def _labelled(bundle, data, tasks: Optional[Sequence[str]], images: int, seed: int):
    """`images` labelled training images of `data` at the bundle's input spec, and their tasks."""
    from .add_task import LabelledPool, open_new_task_data

    opened = open_new_task_data(bundle, data, tasks, seed=seed)
    pool = LabelledPool(opened, images, seed, flag="--images")
    labels = {t: pool.labels[t].numpy().astype(np.int64) for t in opened.tasks}
    for task, y in labels.items():
        if len(np.unique(y)) < 2:
            raise KfError(f"all {images} labelled images of task {task!r} are one class ({opened.task_labels[task][y[0]]!r}): "
                          "nothing to tell apart; give more images, or a folder with more than one class")
    return opened, pool.images.numpy(), labels


def score(
    bundle_path: Path | str,
    data: str | Path,
    tasks: Optional[Sequence[str]] = None,
    images: int = DEFAULT_IMAGES,
    seed: int = 0,
    progress: Callable[[str], None] = print,
) -> dict:
    """Score how well the bundle's frozen trunk serves each task of `data` (`tasks`; default
    as add-task: every new sprites task, or every column of a folder's labels.csv), from
    `images` labelled training images: LogME of the trunk's `common` feature, the k-fold
    accuracy of LogME's own read-out against the majority-class rate, and a verdict. Where
    the bundle was factorized on sprites/sprites-rgb, `reference` scores the trunk's own
    tasks the same way. Returns a JSON-ready dict; `format_report` prints it."""
    from .bundle import Bundle
    from ..training.data import RGB_TASK_CLASSES, TASK_CLASSES

    if images < 2 * FOLDS:
        raise KfError(f"--images must be at least {2 * FOLDS} (the read-out is scored {FOLDS}-fold), got {images}")
    started = time.perf_counter()
    bundle = Bundle.open(bundle_path)
    made_on = (bundle.manifest.get("source") or {}).get("data")
    factor_tasks = {"sprites": TASK_CLASSES, "sprites-rgb": RGB_TASK_CLASSES}.get(made_on, {})
    own = [t for t in bundle.tasks if t in factor_tasks]
    opened, pixels, labels = _labelled(bundle, data, tasks, images, seed)
    asked = list(opened.tasks)
    reference: Dict[str, dict] = {}
    if own and str(data) == made_on:  # the same images serve the reference: one pass through the trunk
        extra = [t for t in own if t not in asked]
        if extra:
            opened, pixels, labels = _labelled(bundle, data, asked + extra, images, seed)
    progress(f"scoring {len(asked)} task(s) of {opened.kind} data on {len(pixels)} labelled images "
             f"through the trunk of {bundle.root} ({bundle.manifest['trunk']['output']['width']}-d common feature)")
    opened_at = time.perf_counter()
    features = trunk_features(bundle, pixels)
    ref_features, ref_labels = features, labels
    if own and str(data) != made_on:
        _, ref_pixels, ref_labels = _labelled(bundle, made_on, own, images, seed)
        ref_features = trunk_features(bundle, ref_pixels)
    featured_at = time.perf_counter()
    folds, spectrum = Folds(features, FOLDS, seed), _spectrum(features)
    results = {t: _score_task(folds, spectrum, labels[t], len(opened.task_labels[t])) for t in asked}
    if own:
        if ref_features is not features:
            folds, spectrum = Folds(ref_features, FOLDS, seed), _spectrum(ref_features)
        reference = {t: _score_task(folds, spectrum, ref_labels[t], bundle.task(t)["classes"]) for t in own}
    done = time.perf_counter()
    note = None if own else (
        f"no reference: the bundle was factorized on {made_on or 'unrecorded'} data, not the embedded sprites"
        if not factor_tasks else f"no reference: the bundle has none of the {made_on} factor tasks")
    return {
        "bundle": str(bundle.root), "data": opened.kind if opened.kind != "folder" else str(data),
        "images": int(len(features)), "seed": seed, "feature_width": int(features.shape[1]),
        "method": METHOD, "folds": FOLDS,
        "tasks": results, "reference": reference, "reference_data": made_on if own else None, "reference_note": note,
        "seconds": {"open": opened_at - started, "features": featured_at - opened_at,
                    "scores": done - featured_at, "total": done - started},
    }


def _rows(tasks: Dict[str, dict]) -> List[str]:
    width = max([len("task"), *map(len, tasks)])
    lines = [f"{'task':<{width}}  classes   LogME  (gain)  read-out  chance  verdict"]
    for name, r in tasks.items():
        classes = f"{r['classes']}" if r["classes_seen"] == r["classes"] else f"{r['classes_seen']}/{r['classes']}"
        lines.append(f"{name:<{width}}  {classes:>7}  {r['logme']:6.3f}  ({r['gain']:+5.3f})  "
                     f"{r['readout_accuracy']:8.1%}  {r['chance']:6.1%}  {r['verdict']}")
    return lines


def format_report(result: dict) -> str:
    """The score as a short table: per task, its classes, LogME (and its gain over the
    labels' prior), the read-out's k-fold accuracy against chance, and a verdict."""
    lines = [f"transferability of the trunk of {result['bundle']} ({result['feature_width']}-d common feature) "
             f"to {result['data']}: {result['images']} labelled images, {result['method']}", ""]
    lines += _rows(result["tasks"])
    if result["reference"]:
        lines += ["", f"reference: the trunk's own tasks on {result['reference_data']}"]
        lines += _rows(result["reference"])
    elif result.get("reference_note"):
        lines += ["", result["reference_note"]]
    lines += [
        "",
        "LogME: mean log evidence per image of a Bayesian linear read-out of the trunk's feature (higher transfers",
        "better); it also grows with the class count, so compare it between tasks with similar counts, or compare",
        f"(gain): LogME minus what the class frequencies alone score. read-out: {result['folds']}-fold accuracy of that",
        "read-out's posterior mean on the same images; chance: the most frequent class's share. A task module also",
        "sees the image through its own network, so a low score means the trunk will not help, not that the task fails.",
    ]
    unsettled = [t for t, r in {**result["tasks"], **result["reference"]}.items() if not r["converged"]]
    if unsettled:
        lines.append(f"LogME's fixed point had not settled within {MAX_ITERATIONS} iterations for {', '.join(unsettled)}: "
                     "its evidence is a lower bound there (with fewer images than feature dimensions, a class the "
                     "feature does not explain drives the prior precision to infinity, slowly)")
    lines += [
        f"({result['seconds']['total']:.1f} s: {result['seconds']['features']:.1f} s through the trunk, "
        f"{result['seconds']['scores']:.2f} s scoring)",
    ]
    return "\n".join(lines)
