"""The bring-your-own-teacher example (demos/custom_teacher.py) runs end to end on non-sprites data."""
import json

import pytest

from conftest import REPO


@pytest.mark.slow
def test_custom_teacher_example_factorizes_evaluates_exports_and_runs(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "custom"
    result = subprocess.run(
        [sys.executable, str(REPO / "demos" / "custom_teacher.py"), "--out", str(out), "--quick"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trunk trained from scratch" in result.stdout
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert set(evaluation["factor_accuracy"]) == {"quadrant", "size"}
    assert evaluation["factor_accuracy"]["quadrant"] > 0.5  # chance is 0.25
    # ... and ships: a bundle with the demo's class names, scored on the test images passed from
    # Python, said where it is (and no "held-out accuracy: none" under the table of accuracies)
    manifest = json.loads((tmp_path / "custom-bundle" / "manifest.json").read_text())
    assert manifest["tasks"]["size"]["labels"] == ["small", "medium", "large"] and len(manifest["examples"]) == 6
    scored = {t: manifest["tasks"][t]["heldout_accuracy"] for t in ("quadrant", "size")}
    assert scored["quadrant"] > 0.5, scored
    assert (f"bundle written to {tmp_path / 'custom-bundle'}: held-out accuracy quadrant {scored['quadrant']:.4f}, "
            f"size {scored['size']:.4f} (ONNX Runtime)") in result.stdout.splitlines()
    assert "held-out accuracy: none" not in result.stdout
    answered = result.stdout.split("quadrant, bundle's answer vs truth: ")[1].splitlines()[0].split(", ")
    assert len(answered) == 6 and all(a.split(" (")[0] in manifest["tasks"]["quadrant"]["labels"] for a in answered)
    assert "size added live: " in result.stdout
