"""Training really learns, resumes exactly after a kill, and runs data-parallel."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO, run_cli
from kfdeploy.training.data import TASK_CLASSES
from kfdeploy.errors import KfError
from kfdeploy.training.runs import RNG_FILE, load_checkpoint, save_checkpoint


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_teacher_learns_every_task_well_beyond_chance(teacher_run):
    records = _records(teacher_run)
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < 0.75 * losses[0]
    final = records[-1]
    assert final["event"] == "finished"
    for task in ("shape", "scale", "pos_x", "pos_y"):  # after only 150 small steps
        assert final["heldout_accuracy"][task] > 1.0 / TASK_CLASSES[task] + 0.1, (task, final)
    assert final["heldout_accuracy"]["pos_x"] > 10.0 / TASK_CLASSES["pos_x"]


def test_factor_networks_start_from_and_keep_the_teachers_accuracy(teacher_run, factor_run):
    teacher = _records(teacher_run)[-1]["heldout_accuracy"]
    factor = _records(factor_run)[-1]["heldout_accuracy"]
    for task in ("shape", "scale", "pos_x", "pos_y"):
        assert factor[task] > teacher[task] - 0.1, (task, teacher[task], factor[task])


def test_task_codes_learn_their_task(factor_run):
    records = [r for r in _records(factor_run) if "aux_scale" in r]
    assert len(records) >= 3
    assert records[-1]["aux_scale"] < records[0]["aux_scale"]


def test_run_folder_holds_safetensors_and_json_only(factor_run):
    names = {p.name for p in factor_run.rglob("*") if p.is_file()}
    assert {"run.json", "model.safetensors", "metrics.jsonl", "state.json", "optimizer.safetensors"} <= names
    assert not [n for n in names if n.endswith((".pt", ".pth", ".pkl", ".bin"))]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["teacher", "factorize"])
def test_a_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_twin(tmp_path, command, request):
    """Resume continues the data stream, the learning-rate schedule, the Adam moments, the
    BatchNorm statistics and the random draws (factorize samples each task code) exactly: on
    one CPU, with the same seed and threads, the resumed run's final weights are bit-equal to
    those of a run that was never killed."""
    total, every = 30, 10  # the log's interval is 25: the resumed run logs at least once
    args = ["--steps", str(total), "--batch-size", "16", "--checkpoint-every", str(every), "--eval-images", "64"]
    if command == "factorize":
        args += ["--teacher", str(request.getfixturevalue("teacher_run"))]
    twin = tmp_path / "twin"
    uninterrupted = run_cli(command, "--out", str(twin), *args)
    assert uninterrupted.returncode == 0, uninterrupted.stderr

    out = tmp_path / command
    process = subprocess.Popen(
        [sys.executable, "-m", "kfdeploy", command, "--out", str(out), *args], cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    state_file = out / "checkpoint" / "state.json"
    deadline = time.time() + 120
    while not state_file.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run must be killed, not end by itself"
    killed_at = json.loads(state_file.read_text())["step"]
    assert every <= killed_at < total, "the run must be killed mid-way"
    assert not (out / "model.safetensors").exists()
    adam_steps = load_file(str(out / "checkpoint" / "optimizer.safetensors"))["0.step"].item()
    assert adam_steps == killed_at

    resumed = run_cli(command, "--out", str(out), *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {out} at step {killed_at}" in resumed.stdout
    steps = [r["step"] for r in _records(out) if "loss" in r]
    assert [s for s in steps if s > killed_at][0] == (killed_at // 25 + 1) * 25  # the log continues, not restarts
    assert _records(out)[-1]["step"] == total

    expected, got = load_file(str(twin / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert expected.keys() == got.keys()
    differing = [name for name in expected if not torch.equal(expected[name], got[name])]
    assert not differing, f"resumed weights differ from the uninterrupted run's in {differing}"


@pytest.mark.slow
def test_two_process_data_parallel_run_ends_with_identical_weights(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "kfdeploy",
         "teacher", "--out", str(out), "--steps", "6", "--batch-size", "16", "--eval-images", "64", "--device", "cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    digests = _records(out)[-1]["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]


def test_a_checkpoint_restores_the_random_draws_and_refuses_an_unusable_state(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path, model, optimizer, {"step": 7, "train_time_s": 1.0})
    expected = torch.randn(5)  # what the next step would draw
    torch.randn(11)  # draws a killed run made after its checkpoint
    assert load_checkpoint(tmp_path, model, optimizer)["step"] == 7
    assert torch.equal(torch.randn(5), expected)

    save_file({"cpu": torch.zeros(3, dtype=torch.uint8)}, str(tmp_path / "checkpoint" / RNG_FILE))
    with pytest.raises(KfError, match="delete its rng.safetensors to resume with fresh random draws"):
        load_checkpoint(tmp_path, model, optimizer)
