"""benchmarks/paper_config.py end to end at toy size, on its --data separated folder: the CLI
chain it drives, and every figure its report and JSON promise (accuracy per task for teacher, factor networks and the
exported assembly; parameters and FLOPs per module; parity; composition timings)."""
import json
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_paper_config_benchmark_reports_every_figure_at_toy_size(tmp_path):
    # SimpleConv stands in for the ResNets here: the timm exports alone take ~25 s on 2 cores
    # (tests/test_architectures.py covers them); the benchmark's code is the same.
    tasks = ["colour", "shape"]
    result = subprocess.run(
        [sys.executable, "benchmarks/paper_config.py", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "results"),
         "--teacher-arch", "simpleconv", "--trunk-arch", "simpleconv", "--task-arch", "simpleconv", "--image-size", "32",
         "--data", "separated", "--data-images", "320", "--tasks", ",".join(tasks), "--teacher-steps", "2", "--factorize-steps", "2", "--batch-size", "8",
         "--eval-images", "64", "--seconds", "0.05", "--repeats", "1", "--throughput-seconds", "0.05", "--device", "cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "results" / "paper_config-separated-simpleconv-cpu.json").read_text())
    assert report["config"].endswith("separated at 3x32x32")
    labels = (tmp_path / "work" / "separated" / "labels.csv").read_text().splitlines()
    assert labels[0] == "file,shape,scale,pos_x,pos_y,colour,split" and len(labels) == 1 + 320 + 64
    assert {row.split(",")[2] for row in labels[1:]} == {"0.7", "1.0"}  # scale at two well-separated values
    assert report["budget"]["teacher_steps"] == 2 and report["budget"]["factorize_steps"] == 2
    accuracy = report["accuracy"]
    assert accuracy["images"] == 64
    for table in (accuracy["evaluation"]["teacher_accuracy"], accuracy["evaluation"]["factor_accuracy"], accuracy["assembly_accuracy"]):
        assert sorted(table) == sorted(tasks) and all(0.0 <= v <= 1.0 for v in table.values())
    # The exported assembly answers as the PyTorch factor networks do, on the same images.
    assert accuracy["assembly_accuracy"] == pytest.approx(accuracy["evaluation"]["factor_accuracy"], abs=1 / 64)
    size = report["size"]
    assert set(size) == {"teacher", "trunk", "assembly", *tasks}
    assert size["assembly"]["flops"] == size["trunk"]["flops"] + sum(size[t]["flops"] for t in tasks) > 0
    assert all(size[m]["parameters"] > 0 for m in size)
    assert all(p["argmax_agreement"] == 1.0 and p["max_abs_err"] < 1e-4 for p in report["parity"]["heldout"].values())
    assert set(report["parity"]["export"]) == {"trunk", *tasks}
    rows = report["composition"]["rows"]
    assert [r["batch"] for r in rows] == [1, 64]
    variants = {"assembly", "merged", "unmerged", "one task", "fused", "teacher", "trunk alone"}
    assert all(set(r["ms"]) == variants and min(r["ms"].values()) > 0 for r in rows)
    assert all(set(r["teacher_over"]) == {"assembly", "merged", "unmerged", "one task", "trunk alone"} for r in rows)
    assert len(report["composition"]["goals"]) == 4 and isinstance(report["composition"]["goal_met"], bool)
    assert "the teacher's time over the variant's" in result.stdout and "goals (all tasks" in result.stdout
    throughput = report["training_throughput"]
    assert set(throughput["samples_per_s"]) == {"teacher", "factorize fused", "factorize fused, targets once", "factorize unfused"}
    assert throughput["goal"].startswith("factorize fused, targets once (as kfdeploy factorizes this data)")
    assert report["budget"]["setup_s"]["teacher"] == 0 and report["budget"]["setup_s"]["factorize"] > 0
    assert min(throughput["samples_per_s"].values()) > 0 and isinstance(throughput["goal_met"], bool)
    assert "x simpleconv (colour, shape) fused into one grouped network" in result.stdout
