"""Transferability before training (kfdeploy/bundling/transferability.py): LogME checked against the
evidence computed directly, and the score of a real bundle's trunk on new sprites tasks."""
import json
import math

import numpy as np
import pytest
from PIL import Image

from kfdeploy.training.data import NEW_TASKS, TASK_NAMES
from kfdeploy.errors import KfError
from kfdeploy.bundling.transferability import Folds, format_report, logme, logme_fit, readout_accuracy, score


def direct_log_evidence(features, y, alpha, beta):
    """log p(y | F, alpha, beta) as the Gaussian it is, y ~ N(0, F F'/alpha + I/beta): an
    N x N covariance, its determinant and solve, nothing shared with the SVD route."""
    n = len(y)
    covariance = features @ features.T / alpha + np.eye(n) / beta
    _, log_det = np.linalg.slogdet(covariance)
    return -0.5 * (n * math.log(2 * math.pi) + log_det + y @ np.linalg.solve(covariance, y))


def direct_log_evidence_weights(features, y, alpha, beta):
    """The same evidence in weight space (the paper's form): A = alpha I + beta F'F (D x D),
    m = beta A^-1 F'y."""
    n, d = features.shape
    a = alpha * np.eye(d) + beta * features.T @ features
    m = beta * np.linalg.solve(a, features.T @ y)
    _, log_det = np.linalg.slogdet(a)
    return (d / 2 * math.log(alpha) + n / 2 * math.log(beta) - log_det / 2 - beta / 2 * np.sum((y - features @ m) ** 2)
            - alpha / 2 * m @ m - n / 2 * math.log(2 * math.pi))


def clustered(n, d, classes, spread, seed=0):
    """Features around one random centre per class (`spread`: noise around it), and the labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = rng.normal(size=(classes, d))
    return centres[labels] + spread * rng.normal(size=(n, d)), labels


@pytest.mark.parametrize("n, d", [(120, 16), (30, 64)], ids=["more images than features", "fewer images than features"])
def test_logme_matches_direct_evidence(n, d):
    features, labels = clustered(n, d, classes=3, spread=1.5)
    fit = logme_fit(features, labels)
    assert fit.converged
    for c, cls in enumerate(fit.classes):
        y = (labels == cls).astype(float)
        expected = direct_log_evidence(features, y, fit.alphas[c], fit.betas[c])
        assert fit.evidences[c] * n == pytest.approx(expected, rel=1e-9, abs=1e-9)
        # the paper's D x D form agrees, within its own rounding (beta reaches ~1e8 when N < D)
        assert expected == pytest.approx(direct_log_evidence_weights(features, y, fit.alphas[c], fit.betas[c]), rel=1e-6)
    assert fit.score == pytest.approx(np.mean(fit.evidences))


def test_logme_stops_at_a_maximum_of_the_evidence():
    features, labels = clustered(80, 12, classes=2, spread=2.0)
    fit = logme_fit(features, labels)
    y = (labels == fit.classes[0]).astype(float)
    best = direct_log_evidence(features, y, fit.alphas[0], fit.betas[0])
    for a, b in [(1.2, 1), (0.8, 1), (1, 1.2), (1, 0.8)]:
        assert direct_log_evidence(features, y, fit.alphas[0] * a, fit.betas[0] * b) < best


def test_separable_features_score_higher_than_noise():
    separable, labels = clustered(200, 32, classes=4, spread=0.3)
    noise = np.random.default_rng(1).normal(size=separable.shape)
    assert logme(separable, labels) > logme(noise, labels) + 0.5


def test_readout_of_separable_features_is_right_and_of_noise_near_chance():
    separable, labels = clustered(200, 32, classes=4, spread=0.3)
    noise = np.random.default_rng(1).normal(size=separable.shape)
    assert readout_accuracy(separable, labels) >= 0.98
    assert readout_accuracy(noise, labels) < 0.45  # chance is ~0.25


def test_constant_features_score_what_the_class_frequencies_alone_score():
    labels = np.random.default_rng(0).integers(0, 3, 100)
    constant = logme(np.full((100, 8), 3.0), labels)
    assert constant == pytest.approx(logme(np.ones((100, 1)), labels), rel=1e-9)
    zero = logme(np.zeros((100, 8)), labels)  # no intercept to fit the frequencies with: less, but a number
    assert math.isfinite(zero) and zero < constant


def test_one_class_is_refused():
    with pytest.raises(KfError, match="LogME needs at least two classes to tell apart; all 20 labels are 4"):
        logme(np.random.default_rng(0).normal(size=(20, 5)), np.full(20, 4))


def test_non_finite_features_are_refused():
    features = np.ones((10, 3))
    features[2, 1] = np.nan
    with pytest.raises(KfError, match="the features hold NaN or infinite values"):
        logme(features, np.arange(10) % 2)


def test_folds_predict_every_image_once():
    features, labels = clustered(53, 8, classes=3, spread=0.5)
    held = np.concatenate([h for _, h in Folds(features).splits])
    assert sorted(held) == list(range(53))


# --- a real bundle: the session's sprites bundle (tests/conftest.py) -------------------------

IMAGES = 300


@pytest.fixture(scope="module")
def scored(bundle):
    return score(bundle, "sprites", images=IMAGES, progress=lambda message: None)


def test_score_reports_every_new_sprites_task(scored):
    assert list(scored["tasks"]) == list(NEW_TASKS)
    for task, result in scored["tasks"].items():
        assert result["classes"] == len(NEW_TASKS[task][0])
        assert math.isfinite(result["logme"]) and result["converged"], task
        assert 0.0 <= result["readout_accuracy"] <= 1.0 and 0.0 < result["chance"] < 1.0, task
    assert scored["images"] == IMAGES


def test_score_has_the_trunks_own_tasks_as_reference(scored):
    assert scored["reference_data"] == "sprites"
    assert list(scored["reference"]) == list(TASK_NAMES)


def test_trunk_scores_a_task_it_was_trained_for_above_x_parity(scored):
    # `gain` (LogME minus the labels' own prior) compares tasks of different class counts;
    # raw LogME would favour pos_x's 32 sparse one-hot columns whatever the trunk held.
    assert scored["reference"]["pos_x"]["gain"] > scored["tasks"]["x_parity"]["gain"] + 0.02


def test_report_prints_each_task_with_its_score_accuracy_and_verdict(scored):
    report = format_report(scored)
    for task, result in {**scored["tasks"], **scored["reference"]}.items():
        line = next(line for line in report.splitlines() if line.startswith(task + " "))
        assert f"{result['logme']:.3f}" in line and f"{result['readout_accuracy']:.1%}" in line and result["verdict"] in line
    assert "reference: the trunk's own tasks on sprites" in report and "LogME" in report


def test_too_few_images_are_refused(bundle):
    with pytest.raises(KfError, match="--images must be at least 10"):
        score(bundle, "sprites", images=9, progress=lambda message: None)


def test_more_images_than_a_folders_training_split_are_refused(bundle, tmp_path):
    rows = ["file,kind,split"]
    for i in range(12):
        Image.fromarray(np.full((16, 16), 40 + 200 * (i % 2), np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{'light' if i % 2 else 'dark'},{'heldout' if i < 2 else 'train'}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(KfError, match=r"--images 50 asks for more images than the folder's training split holds \(10\)"):
        score(bundle, tmp_path, images=50, progress=lambda message: None)


def test_the_command_prints_the_report_and_writes_the_scores(bundle, tmp_path, capsys):
    from kfdeploy.cli import main

    out = tmp_path / "scores.json"
    assert main(["transferability", str(bundle), "--data", "sprites", "--tasks", "quadrant,x_parity", "--images", "60",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    written = json.loads(out.read_text())
    assert set(written["tasks"]) == {"quadrant", "x_parity"}
    for task, row in written["tasks"].items():
        line = next(line for line in printed.splitlines() if line.startswith(task))
        assert f"{row['logme']:.3f}" in line
