"""The command line: help for every job, and a clear one-line error (exit 2) for bad input."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import cli_fails
from kfdeploy.cli import COMMANDS, main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and f"kfdeploy {command}" in text


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert all(command in text for command in COMMANDS)


def test_missing_teacher_checkpoint_is_refused_and_nothing_is_written(tmp_path, capsys):
    out = tmp_path / "kf"
    err = cli_fails(["factorize", "--teacher", str(tmp_path / "nope"), "--out", str(out)], capsys, "no teacher run at")
    assert "kfdeploy teacher --out" in err  # says how to make one
    assert not out.exists()


def test_a_factor_run_given_as_teacher_is_refused(factor_run, tmp_path, capsys):
    cli_fails(["factorize", "--teacher", str(factor_run), "--out", str(tmp_path / "kf")], capsys,
           "is a factorized run, not a teacher run")
    assert not (tmp_path / "kf").exists()


def _damaged_copy(run, tmp_path, damage):
    copy = tmp_path / run.name
    shutil.copytree(run, copy)
    damage(copy / "model.safetensors")
    return copy


def test_corrupted_teacher_weights_are_refused(teacher_run, tmp_path, capsys):
    broken = _damaged_copy(teacher_run, tmp_path, lambda f: f.write_bytes(b"\x00garbage" * 10))
    cli_fails(["factorize", "--teacher", str(broken), "--out", str(tmp_path / "kf")], capsys,
           "not a readable safetensors file")
    assert not (tmp_path / "kf").exists()


def test_unfinished_teacher_run_is_refused_with_how_to_resume(teacher_run, tmp_path, capsys):
    unfinished = _damaged_copy(teacher_run, tmp_path, lambda f: f.unlink())
    cli_fails(["factorize", "--teacher", str(unfinished), "--out", str(tmp_path / "kf")], capsys, "--resume")


def test_unknown_task_name_lists_the_known_ones(tmp_path, capsys):
    err = cli_fails(["teacher", "--out", str(tmp_path / "t"), "--tasks", "shape,colour"], capsys, "unknown task 'colour'")
    assert "pos_x" in err
    assert not (tmp_path / "t").exists()


def test_a_teacher_scores_eval_images_and_refuses_tasks_it_was_not_trained_on(tmp_path, capsys):
    teacher = tmp_path / "t"
    assert main(["teacher", "--out", str(teacher), "--tasks", "shape,scale", "--steps", "3", "--batch-size", "8", "--eval-images", "64"]) == 0
    capsys.readouterr()
    assert json.loads((teacher / "run.json").read_text())["train"]["eval_images"] == 64
    final = [json.loads(line) for line in (teacher / "metrics.jsonl").read_text().splitlines()][-1]
    assert all((accuracy * 64).is_integer() for accuracy in final["heldout_accuracy"].values()), final
    err = cli_fails(["factorize", "--teacher", str(teacher), "--out", str(tmp_path / "kf"), "--tasks", "shape,pos_x"],
                 capsys, "unknown task 'pos_x' for the teacher")
    assert "available: shape, scale" in err
    assert not (tmp_path / "kf").exists()


def test_no_held_out_images_to_score_is_refused(tmp_path, capsys):
    cli_fails(["teacher", "--out", str(tmp_path / "t"), "--eval-images", "0"], capsys, "--eval-images 0: score at least 1")
    assert not (tmp_path / "t").exists()


def test_output_inside_a_file_is_refused(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cli_fails(["teacher", "--out", str(blocker / "run")], capsys, "is a file, not a folder")


def test_unwritable_output_folder_is_refused(capsys):
    # /proc refuses new files even to root, unlike a chmod-ed folder.
    cli_fails(["teacher", "--out", "/proc/kfdeploy-test/run"], capsys, "not writable")
    assert not Path("/proc/kfdeploy-test").exists()


def test_an_existing_run_is_not_overwritten_without_resume(teacher_run, capsys):
    before = (teacher_run / "model.safetensors").read_bytes()
    cli_fails(["teacher", "--out", str(teacher_run), "--steps", "2"], capsys, "pass --resume")
    assert (teacher_run / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("top", ["0", "-1"])
def test_run_refuses_a_top_below_one(top, tmp_path, capsys):
    cli_fails(["run", str(tmp_path / "bundle"), str(tmp_path / "a.png"), "--top", top], capsys,
              f"--top must be 1 or more (classes shown per task), got {top}")


def test_run_refuses_a_numpy_batch_among_image_files_naming_it(tmp_path, capsys):
    batch = tmp_path / "batch.npy"
    np.save(batch, np.zeros((1, 1, 64, 64), dtype=np.uint8))
    picture = tmp_path / "a.png"
    Image.fromarray(np.zeros((64, 64), dtype=np.uint8)).save(picture)
    cli_fails(["run", str(tmp_path / "bundle"), str(picture), str(batch)], capsys,
              f"{batch} is a numpy batch, which goes alone: give one .npy batch (N, C, H, W), or image files only")


def test_inspect_on_a_file_says_it_is_a_file_not_a_bundle(tmp_path, capsys):
    picture = tmp_path / "square.png"
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(picture)
    cli_fails(["inspect", str(picture)], capsys, f"{picture} is a file, not a bundle: a bundle is a folder made by "
              "`kfdeploy export RUN --out BUNDLE`, or its .tar.gz archive")


def test_the_demo_announces_itself_with_the_command_line_flags_not_gradios_launch_advice(bundle, capsys):
    from kfdeploy.demo import launch
    from triton_servers import free_ports

    port = free_ports(1)[0]
    app = launch(bundle, port=port, block=False)
    try:
        said = capsys.readouterr()
    finally:
        app.close()
    assert f"kfdeploy demo: {bundle} on http://127.0.0.1:{port}/ (Ctrl-C stops it; --host, --port and --share for more)" \
        in said.out.splitlines(), said.out
    assert "share=True" not in said.out + said.err


def test_the_quickstart_prints_each_stages_time_and_the_total(tmp_path, monkeypatch, capsys):
    """The stages themselves are the other tests' (and the README example's); here, what it says."""
    from kfdeploy import cli
    from kfdeploy.bundling import export
    from kfdeploy.training import pipeline

    for module, name in [(pipeline, "train_teacher"), (pipeline, "factorize"), (export, "export_bundle"),
                         (export, "verify_bundle"), (cli, "run_evaluation"), (cli, "quickstart_answers")]:
        monkeypatch.setattr(module, name, lambda *args, **kwargs: None)
    assert main(["quickstart", "--out", str(tmp_path / "qs")]) == 0
    lines = capsys.readouterr().out.splitlines()
    stages = ["teacher", "factorize", "evaluate", "export", "compose"]
    for number, stage in enumerate(stages, 1):
        assert re.fullmatch(rf"\[{number}/5 {stage}\] done in \d+\.\d s", lines[2 * number - 1]), lines
    assert re.fullmatch(r"quickstart finished in \d+\.\d s \(" + ", ".join(rf"{s} \d+\.\d s" for s in stages) + r"\)",
                        lines[11]), lines
