"""Architectures by name from timm: build, factorize, export, compose; and every refusal's message.

Small inputs (32x32 sprites, one channel) and a few training steps keep this quick: what is
checked is that real architectures go through every stage, not how well they learn.
"""
import json

import numpy as np
import onnx
import pytest
import torch

import kfdeploy
from conftest import TIMM_TASKS, cli_fails
from kfdeploy.training.architectures import BackboneConfig, ConvBackbone, build_backbone, load_pretrained
from kfdeploy.cli import main
from kfdeploy.training.data import SpritesSource
from kfdeploy.errors import KfError
from kfdeploy.bundling.export import PARITY_MAX_ABS_ERR, PARITY_MAX_REL_ERR, fold_batch_norm, torch_modules
from kfdeploy.training.models import FactorConfig, FactorNet, SpritesTeacher, TeacherConfig
from kfdeploy.training.pipeline import resize_images

SIZE = 32  # the smallest size resnet18 and mobilenetv2_050 take (their total stride)
TASKS = {"shape": 3, "scale": 6}


def test_resnet18_and_mobilenetv2_050_build_at_a_small_single_channel_input():
    for arch, width in (("resnet18", 512), ("mobilenetv2_050", 1280)):
        module, dim = build_backbone(BackboneConfig(in_channels=1, image_size=SIZE, arch=arch))
        assert dim == width
        assert module.eval()(torch.zeros(2, 1, SIZE, SIZE)).shape == (2, width)


def test_simpleconv_stays_the_default_and_old_configs_load_as_simpleconv():
    module, dim = build_backbone(BackboneConfig())
    assert isinstance(module, ConvBackbone) and dim == 256
    # A run.json / manifest written before architectures had names.
    old = {"task_classes": TASKS, "trunk": {"in_channels": 1, "image_size": 64, "width": 32, "feature_dim": 256,
                                           "coord_channels": True, "batch_norm": True},
           "task_width": 16, "task_hidden_dim": 128, "teacher_feature_dim": 256}
    config = FactorConfig.from_dict(old)
    assert config.trunk_arch == "simpleconv" and config.task_arch == "simpleconv"
    assert FactorConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_a_timm_trunk_is_warm_started_from_a_teacher_of_its_architecture():
    torch.manual_seed(0)
    teacher = SpritesTeacher(TeacherConfig(TASKS, BackboneConfig(image_size=SIZE, arch="resnet18"))).eval()
    student = FactorNet(FactorConfig(TASKS, trunk=teacher.config.backbone, teacher_feature_dim=512,
                                     task_arch="mobilenetv2_050")).eval()
    assert student.config.feature_dim == 512
    assert student.warm_start_from(teacher)
    images = resize_images(SpritesSource().batch(0, 4)[0], SIZE)
    with torch.no_grad():
        expected, got = teacher(images), student(images)
    for task in TASKS:
        torch.testing.assert_close(got[task], expected[task])
    # Another trunk architecture: no warm start, nothing changed.
    other = FactorNet(FactorConfig(TASKS, trunk=BackboneConfig(image_size=SIZE, arch="mobilenetv2_050"), teacher_feature_dim=512))
    assert not other.warm_start_from(teacher)


def test_infomax_at_three_stages_trains_its_projections_and_stays_out_of_the_bundle(timm_bundle):
    from safetensors import safe_open

    run = timm_bundle.parent / "kf"
    assert json.loads((run / "run.json").read_text())["model"]["teacher_stage_dims"] == [128, 256]  # resnet18's layer2, layer3
    with safe_open(str(run / "model.safetensors"), "pt") as weights:
        assert {k.split(".")[1] for k in weights.keys() if k.startswith("stage_proj.")} == {"0", "1"}
    assert "teacher_stage_dims" not in json.loads((timm_bundle / "manifest.json").read_text())["model"]


def test_infomax_over_stages_is_their_mean_and_reaches_every_projection():
    from kfdeploy.training.losses import FactorizationObjective, LossWeights, infomax_loss

    torch.manual_seed(0)
    teacher = SpritesTeacher(TeacherConfig(TASKS, BackboneConfig(image_size=SIZE, arch="resnet18")))
    student = FactorNet(FactorConfig(TASKS, trunk=BackboneConfig(image_size=SIZE, arch="resnet18"), teacher_feature_dim=512,
                                     teacher_stage_dims=teacher.stage_dims(3)))
    images = torch.rand(6, 1, SIZE, SIZE)
    loss, metrics = FactorizationObjective(student, teacher, LossWeights(feat=2.0)).train()(images, {t: torch.zeros(6, dtype=torch.long) for t in TASKS})
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.stage_proj.parameters())
    with torch.no_grad():
        pooled, stages = teacher.forward_stages(images, 3)
        common, own = student.forward_stages(images)
        expected = [infomax_loss(s, project(t)) for s, project, t in zip(own, student.stage_proj, stages)]
        expected.append(infomax_loss(common, student.teacher_proj(pooled)))
    assert [s.shape[1] for s in own] == [128, 256]
    torch.testing.assert_close(metrics["infomax"], 2.0 * sum(expected) / 3)
    # The teacher's stages precomputed (--teacher-targets once) and read with the batch: the same terms.
    from kfdeploy.training.teacher_targets import teacher_outputs

    labels = {t: torch.zeros(6, dtype=torch.long) for t in TASKS}
    with torch.no_grad():
        targets = teacher_outputs(teacher, images, 3)
        objective = FactorizationObjective(student, teacher, LossWeights(feat=2.0)).eval()
        torch.manual_seed(1)
        computed = objective(images, labels)[1]
        torch.manual_seed(1)
        read = objective(images, {**labels, **targets})[1]
    assert sorted(targets) == ["teacher:features", "teacher:logits:scale", "teacher:logits:shape", "teacher:stage0", "teacher:stage1"]
    assert computed.keys() == read.keys() and all(torch.equal(computed[k], read[k]) for k in computed)


def test_infomax_stages_are_refused_where_the_networks_cannot_give_them(teacher_run, tmp_path, capsys):
    cli_fails(["factorize", "--teacher", str(teacher_run), "--out", str(tmp_path / "a"), "--infomax-stages", "3"], capsys,
              "--infomax-stages 3 needs a teacher that gives its stages")
    cli_fails(["factorize", "--teacher", str(teacher_run), "--out", str(tmp_path / "b"), "--infomax-stages", "9"], capsys,
              "--infomax-stages must be 1 to 5, not 9")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    from kfdeploy.training.pipeline import teacher_stage_dims

    resnet = SpritesTeacher(TeacherConfig(TASKS, BackboneConfig(image_size=SIZE, arch="resnet18")))
    with pytest.raises(KfError, match="needs a trunk that gives its stages .* simpleconv does not: choose --trunk-arch"):
        teacher_stage_dims(resnet, BackboneConfig(image_size=SIZE), 3)


def test_timm_modules_export_with_only_batch_dynamic_batchnorm_folded_and_parity_recorded(timm_bundle):
    manifest = json.loads((timm_bundle / "manifest.json").read_text())
    assert manifest["model"]["trunk"]["arch"] == "resnet18" and manifest["model"]["task_arch"] == "mobilenetv2_050"
    assert manifest["input"]["shape"] == ["batch", 1, SIZE, SIZE]
    assert manifest["trunk"]["output"]["width"] == 512
    tolerance = manifest["parity_tolerance"]
    assert tolerance["max_abs_err"] == PARITY_MAX_ABS_ERR and tolerance["max_rel_err"] == PARITY_MAX_REL_ERR
    for record in [manifest["trunk"], *manifest["tasks"].values()]:
        parity = record["parity"]
        assert parity["max_abs_err"] <= PARITY_MAX_ABS_ERR or parity["max_rel_err"] <= PARITY_MAX_REL_ERR
        graph = onnx.load(str(timm_bundle / record["file"]))
        onnx.checker.check_model(graph, full_check=True)
        assert not [n for n in graph.graph.node if n.op_type == "BatchNormalization"], record["file"]
        for value in list(graph.graph.input) + list(graph.graph.output):
            dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            assert isinstance(dims[0], str) and all(isinstance(d, int) for d in dims[1:]), (record["file"], dims)
    # The log-variance is a training-time output, mu's projection (512 x 1280) is folded into
    # the head, a classes x (512 + 1280) matrix, and the last convolution, on a one-pixel map
    # at this size, runs as a matrix product (kfdeploy/bundling/single_pixel.py).
    task_graph = onnx.load(str(timm_bundle / manifest["tasks"]["shape"]["file"]))
    matrices = [list(i.dims) for i in task_graph.graph.initializer if len(i.dims) == 2]
    assert sorted(matrices) == [[3, 512 + 1280], [1280, 160]] and not [i for i in task_graph.graph.initializer if "logvar" in i.name]
    assert "ReduceMean" not in {node.op_type for node in task_graph.graph.node}


def test_timm_bundle_passes_check_trt(timm_bundle, capsys):
    assert main(["check-trt", str(timm_bundle)]) == 0
    assert "every graph is within what TensorRT's ONNX parser accepts" in capsys.readouterr().out


def test_timm_bundle_loads_and_matches_pytorch(timm_bundle):
    images = resize_images(SpritesSource().heldout(16, offset=100)[0], SIZE)
    bundle = kfdeploy.bundling.bundle.Bundle.open(timm_bundle)
    model = torch_modules(bundle)
    mean, std = (torch.tensor(values).view(1, -1, 1, 1) for values in bundle.normalization())
    with torch.no_grad():  # the factor networks take normalized pixels; the bundle's graphs normalize 0-1 pixels themselves
        expected = model((images - mean) / std)
    assembly = kfdeploy.load(timm_bundle)
    got = assembly.run(images.numpy(), logits=True)
    assert set(got) == set(TIMM_TASKS)
    for task in TIMM_TASKS:
        np.testing.assert_allclose(got[task], expected[task].numpy(), atol=1e-4, rtol=1e-4)
    # One image at a time: the batch dimension really is dynamic.
    single = assembly.run(images[:1].numpy(), logits=True)
    np.testing.assert_allclose(single["shape"], expected["shape"][:1].numpy(), atol=1e-4, rtol=1e-4)


def test_batchnorm_left_by_an_exporter_is_folded_into_its_conv(tmp_path):
    import onnxruntime as ort

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).eval()
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1), net[1].running_var.uniform_(0.5, 2), net[1].weight.uniform_(0.5, 2)
    path = tmp_path / "bn.onnx"
    x = torch.rand(2, 1, 8, 8)
    torch.onnx.export(net, (x,), str(path), dynamo=True, optimize=False, external_data=False, input_names=["image"])
    if not any(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node):
        pytest.skip("this exporter folds BatchNorm even unoptimized")
    graph = onnx.load(str(path))
    assert fold_batch_norm(graph) == 1
    assert not [n for n in graph.graph.node if n.op_type == "BatchNormalization"]
    onnx.checker.check_model(graph, full_check=True)
    onnx.save(graph, str(path))
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    np.testing.assert_allclose(out, net(x).detach().numpy(), atol=1e-5)


# --- what users get wrong ------------------------------------------------------------------

def test_unknown_architecture_is_refused_with_close_timm_names(timm_bundle, tmp_path, capsys):
    out = tmp_path / "teacher"
    err = cli_fails(["teacher", "--out", str(out), "--arch", "resnet81"], capsys, "unknown architecture 'resnet81'")
    assert "resnet18" in err and "simpleconv" in err
    assert not out.exists()
    teacher = timm_bundle.parent / "teacher"
    for flag in ("--task-arch", "--trunk-arch"):
        err = cli_fails(["factorize", "--teacher", str(teacher), "--out", str(tmp_path / "kf"), flag, "mobilenetv2_05"],
                     capsys, "unknown architecture 'mobilenetv2_05'")
        assert "mobilenetv2_050" in err
    assert not (tmp_path / "kf").exists()


def test_an_image_size_the_architecture_cannot_take_is_refused_with_what_works(tmp_path, capsys):
    out = tmp_path / "teacher"
    err = cli_fails(["teacher", "--out", str(out), "--arch", "resnet18", "--image-size", "16"], capsys, "cannot take 16x16 images")
    assert "32x32" in err and "--image-size 32" in err
    cli_fails(["teacher", "--out", str(out), "--image-size", "40"], capsys, "simpleconv takes image sizes that are multiples of 16")
    assert not out.exists()
    with pytest.raises(KfError, match="mobilenetv2_050 cannot take 8x8 images"):
        build_backbone(BackboneConfig(image_size=8, arch="mobilenetv2_050"))


def test_names_and_options_that_would_download_are_refused(tmp_path, capsys):
    out = tmp_path / "teacher"
    cli_fails(["teacher", "--out", str(out), "--arch", "hf-hub:timm/resnet18.a1_in1k"], capsys, "would be fetched from a hub")
    err = cli_fails(["teacher", "--out", str(out), "--arch", "resnet18.a1_in1k"], capsys, "names pretrained weights")
    assert "--arch resnet18" in err and "--pretrained FILE" in err
    for value in ("imagenet", "https://example.com/resnet18.pth", "resnet18.a1_in1k"):
        cli_fails(["teacher", "--out", str(out), "--arch", "resnet18", "--pretrained", value], capsys, "would need a download")
    cli_fails(["teacher", "--out", str(out), "--arch", "resnet18", "--pretrained", str(tmp_path / "missing.safetensors")], capsys, "no such file")
    assert not out.exists()


def test_pretrained_weights_with_wrong_keys_are_refused_naming_them(tmp_path, capsys):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"conv1.weight": torch.zeros(64, 1, 7, 7), "encoder.block.weight": torch.zeros(3)}, str(bad))
    out = tmp_path / "teacher"
    err = cli_fails(["teacher", "--out", str(out), "--arch", "resnet18", "--image-size", "32", "--pretrained", str(bad)],
                 capsys, "does not fit resnet18")
    assert "missing bn1.bias" in err and "unexpected encoder.block.weight" in err
    assert not out.exists()


def test_a_timm_checkpoint_loads_weights_only_with_its_classifier_dropped_and_first_conv_adapted(tmp_path):
    import timm

    source = timm.create_model("resnet18", pretrained=False)  # 3 channels, 1000 classes: as published
    path = tmp_path / "resnet18.pth"
    torch.save({"epoch": 3, "state_dict": source.state_dict()}, path)
    module, _ = build_backbone(BackboneConfig(image_size=SIZE, arch="resnet18"))
    notes = load_pretrained(module, path, BackboneConfig(image_size=SIZE, arch="resnet18"))
    assert set(notes) == {"classifier", "first_conv"}
    torch.testing.assert_close(module.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert module.conv1.weight.shape[1] == 1
    # A pickle that needs code to load is refused, never run.
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": source.state_dict(), "hook": SpritesSource()}, evil)
    with pytest.raises(KfError, match="not a weights-only torch checkpoint"):
        load_pretrained(module, evil, BackboneConfig(image_size=SIZE, arch="resnet18"))
