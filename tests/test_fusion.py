"""Horizontal fusion (kfdeploy.training.fusion): k task networks as one grouped network are the
same mathematics as k separate ones, layer by layer and over whole training steps."""
import copy

import pytest
import torch
from torch import nn

from kfdeploy.training.data import RGB_TASK_CLASSES
from kfdeploy.training.fusion import GroupedBatchNorm2d, GroupedConv2d, GroupedLinear, fuse
from kfdeploy.training.losses import FactorizationObjective, LossWeights
from kfdeploy.training.models import BackboneConfig, FactorConfig, FactorNet, FusedTaskModules, SpritesTeacher, TaskModule, TeacherConfig

K = 3


def _copies(make, k=K):
    torch.manual_seed(0)
    layers = [make() for _ in range(k)]
    for layer in layers:
        for p in layer.parameters():
            nn.init.normal_(p, std=0.3)
    return layers


def _blocks(x, k=K):
    return x.chunk(k, dim=1)


@pytest.mark.parametrize("groups", [1, 4])
def test_grouped_conv_on_the_shared_input_is_each_conv_side_by_side(groups):
    convs = _copies(lambda: nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=groups))
    x = torch.randn(2, 8, 9, 9)
    got = GroupedConv2d(convs)(x)
    for conv, block in zip(convs, _blocks(got)):
        torch.testing.assert_close(block, conv(x))


@pytest.mark.parametrize("groups", [1, 2, 8])  # 8: depthwise stays depthwise
def test_grouped_conv_on_a_grouped_input_gives_each_task_its_own_conv(groups):
    convs = _copies(lambda: nn.Conv2d(8, 8, 3, padding=1, groups=groups, bias=False))
    inputs = [torch.randn(2, 8, 6, 6) for _ in convs]
    got = GroupedConv2d(convs)(torch.cat(inputs, 1))
    for conv, x, block in zip(convs, inputs, _blocks(got)):
        torch.testing.assert_close(block, conv(x))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_grouped_batchnorm_normalizes_and_tracks_each_tasks_statistics(momentum):
    norms = _copies(lambda: nn.BatchNorm2d(5, momentum=momentum))
    twins = copy.deepcopy(norms)
    grouped = GroupedBatchNorm2d(norms)
    for _ in range(3):
        inputs = [torch.randn(4, 5, 3, 3) * (i + 1) + i for i in range(K)]
        got = grouped(torch.cat(inputs, 1))
        for twin, x, block in zip(twins, inputs, _blocks(got)):
            torch.testing.assert_close(block, twin(x))
    for norm, twin in zip(norms, twins):
        for name, buffer in twin.named_buffers():
            torch.testing.assert_close(getattr(norm, name), buffer)
    for layer in (*norms, *twins):
        layer.eval()
    x = [torch.randn(2, 5, 3, 3) for _ in range(K)]
    for twin, xi, block in zip(twins, x, _blocks(grouped(torch.cat(x, 1)))):
        torch.testing.assert_close(block, twin(xi))


def test_grouped_linear_on_shared_and_grouped_inputs():
    linears = _copies(lambda: nn.Linear(6, 4))
    shared = torch.randn(3, 6)
    for linear, block in zip(linears, _blocks(GroupedLinear(linears)(shared))):
        torch.testing.assert_close(block, linear(shared))
    inputs = [torch.randn(3, 6) for _ in linears]
    for linear, x, block in zip(linears, inputs, _blocks(GroupedLinear(linears)(torch.cat(inputs, 1)))):
        torch.testing.assert_close(block, linear(x))


class _MixesChannels(nn.Module):
    """Every layer is one fusion knows, but the forward reverses the channel order: across tasks, once fused."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()

    def forward(self, x):
        return self.flat(self.pool(self.conv(x).flip(1)))


def test_networks_that_mix_channels_or_hold_unknown_layers_are_not_fused():
    network, why = fuse(_copies(_MixesChannels, 2), (3, 8, 8))
    assert network is None and "mixes channels" in why
    network, why = fuse(_copies(lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.ChannelShuffle(2)), 2), (3, 8, 8))
    assert network is None and "ChannelShuffle" in why
    network, why = fuse([nn.Conv2d(3, 4, 1), nn.Conv2d(3, 5, 1)], (3, 8, 8))
    assert network is None and "differ" in why


SIZE = 32


def _factor_pair(task_arch, tasks):
    """A teacher and a factor network twice over, fused and not, in float64.

    In float32 the grouped and the separate convolutions may take different kernels (which, is
    the CPU's choice), and their last-bit differences grow over steps through BatchNorm on
    1x1 maps of 8 images: a 1e-4 gap became 8% by step 3 on one CI machine. Float64 keeps the
    test about the mathematics."""
    torch.manual_seed(0)
    classes = {t: RGB_TASK_CLASSES[t] for t in tasks}
    teacher = SpritesTeacher(TeacherConfig(classes, BackboneConfig(in_channels=3, image_size=SIZE, width=8)))
    fused = FactorNet(FactorConfig(classes, trunk=BackboneConfig(in_channels=3, image_size=SIZE, width=8),
                                   task_arch=task_arch, task_width=8, teacher_feature_dim=teacher.feature_dim))
    for module in fused.tasks.values():  # codes start at zero; make them matter from the first step
        for p in module.parameters():
            if p.ndim > 1:
                nn.init.normal_(p, std=0.05)
    teacher.double()
    fused.double()
    unfused = copy.deepcopy(fused)
    unfused.fuse_tasks = False
    return teacher, fused, unfused


def _train_in_step(teacher, models, steps=4, batch=8):
    objectives = [FactorizationObjective(m, teacher, LossWeights()).train() for m in models]
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in models]
    classes = models[0].task_classes
    generator = torch.Generator().manual_seed(1)
    losses = [[] for _ in models]
    for step in range(steps):
        images = torch.rand(batch, 3, SIZE, SIZE, generator=generator, dtype=torch.float64)
        labels = {t: torch.randint(0, n, (batch,), generator=generator) for t, n in classes.items()}
        for objective, optimizer, record in zip(objectives, optimizers, losses):
            torch.manual_seed(100 + step)  # the same code samples for both
            loss, _ = objective(images, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            record.append(loss.item())
    return losses


@pytest.mark.parametrize("task_arch", ["simpleconv", "mobilenetv2_050"])
@pytest.mark.parametrize("tasks", [list(RGB_TASK_CLASSES), ["orientation", "colour"]], ids=["all", "subset"])
def test_fused_training_equals_unfused_losses_weights_and_batchnorm_statistics(task_arch, tasks):
    teacher, fused, unfused = _factor_pair(task_arch, tasks)
    assert [type(e) for e in fused._plan(tuple(tasks))] == [FusedTaskModules]
    assert all(isinstance(e, str) for e in unfused._plan(tuple(tasks)))
    fused_losses, unfused_losses = _train_in_step(teacher, [fused, unfused])
    assert fused_losses == pytest.approx(unfused_losses, rel=1e-9)
    assert fused_losses[-1] != fused_losses[0]  # it trained
    got, expected = fused.state_dict(), unfused.state_dict()
    assert got.keys() == expected.keys()  # nothing of the fusion is saved
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, msg=name)
    assert any("running_mean" in name for name in expected)
    fused.eval()
    unfused.eval()
    images = torch.rand(4, 3, SIZE, SIZE, dtype=torch.float64)
    with torch.no_grad():
        for task, logits in unfused(images).items():
            torch.testing.assert_close(fused(images)[task], logits)


def test_task_networks_of_different_architectures_fuse_by_group_of_equal_ones():
    teacher, model, _ = _factor_pair("mobilenetv2_050", list(RGB_TASK_CLASSES))
    odd = "orientation"
    model.tasks[odd] = TaskModule(FactorConfig(model.config.task_classes, trunk=model.config.trunk, task_width=8,
                                               task_arch="simpleconv"), model.task_classes[odd]).double()
    plan = model._plan(tuple(model.tasks))
    assert odd in plan
    fused = [e for e in plan if isinstance(e, FusedTaskModules)]
    assert len(fused) == 1 and sorted(fused[0].tasks) == sorted(set(RGB_TASK_CLASSES) - {odd})
    unfused = copy.deepcopy(model)
    unfused.fuse_tasks = False
    fused_losses, unfused_losses = _train_in_step(teacher, [model, unfused], steps=2)
    assert fused_losses == pytest.approx(unfused_losses, rel=1e-9)
