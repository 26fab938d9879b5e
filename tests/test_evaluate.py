import json

from kfdeploy.cli import main
from kfdeploy.training.data import TASK_NAMES


def test_evaluate_prints_the_table_and_writes_json_and_heatmap(factor_run, tmp_path, capsys):
    assert main(["evaluate", str(factor_run), "--images", "1024", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "teacher" in out and "factor" in out and "disentanglement" in out
    result = json.loads((factor_run / "evaluation.json").read_text())
    assert result == json.loads((tmp_path / "r.json").read_text())
    assert set(result["teacher_accuracy"]) == set(result["factor_accuracy"]) == set(TASK_NAMES)
    matrix = result["disentanglement"]
    assert set(matrix) == set(TASK_NAMES) and all(set(row) == set(TASK_NAMES) for row in matrix.values())
    assert set(result["orientation_by_shape"]) == {"square", "ellipse", "heart"}
    assert (factor_run / "disentanglement.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluating_a_teacher_run_says_it_needs_a_factor_run(teacher_run, capsys):
    assert main(["evaluate", str(teacher_run)]) == 2
    assert "is a teacher run, not a factorized run" in capsys.readouterr().err
