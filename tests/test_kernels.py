"""How networks run in training (kfdeploy.training.kernels): other kernels, the same numbers."""
import copy

import pytest
import torch
from torch import nn

from kfdeploy.training.kernels import DepthwiseConv2d, match_parameter_layouts, prepare_for_training, use_cpu_kernels


def _depthwise_stack():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU6(),  # depthwise: replaced
        nn.Conv2d(16, 16, 3, padding=1),  # ordinary: kept
        nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16),  # depthwise: replaced
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )


@pytest.mark.parametrize("size", [2, 1, 5])  # maps smaller than the kernel pad explicitly; 5 does not
@pytest.mark.parametrize("channels_last", [False, True])
def test_depthwise_convolutions_on_small_maps_give_the_same_outputs_and_gradients(size, channels_last):
    plain = _depthwise_stack()
    fast = copy.deepcopy(plain)
    assert use_cpu_kernels(fast) == 2
    assert [type(m) for m in fast if isinstance(m, nn.Conv2d)] == [nn.Conv2d, DepthwiseConv2d, nn.Conv2d, DepthwiseConv2d]
    assert fast.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(4, 8, size, size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for model in (plain, fast):
        model.train()
        model(x).square().sum().backward()
    torch.testing.assert_close(fast(x), plain(x), rtol=0, atol=0)
    for (name, got), expected in zip(fast.named_parameters(), plain.parameters()):
        # Another kernel computes the weight gradient: the same sum, summed in another order.
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_in_eval_mode_the_replaced_convolution_is_the_plain_one():
    model = _depthwise_stack()
    use_cpu_kernels(model)
    model.eval()
    graph = torch.jit.trace(model, torch.randn(1, 8, 2, 2)).inlined_graph
    assert "aten::pad" not in str(graph) and "constant_pad_nd" not in str(graph)


def test_timm_networks_train_channels_last_and_a_restored_optimizer_takes_their_layout():
    timm = pytest.importorskip("timm")
    model = timm.create_model("mobilenetv2_050", num_classes=3, pretrained=False)
    assert prepare_for_training(model, torch.device("cpu"))
    weight = model.conv_stem.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert not prepare_for_training(_depthwise_stack(), torch.device("cpu"))  # not timm: as it was
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    model(torch.rand(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)).sum().backward()
    optimizer.step()
    stored = copy.deepcopy(optimizer.state_dict())
    for state in stored["state"].values():  # a checkpoint stores every tensor contiguous
        for name, value in state.items():
            state[name] = value.contiguous()
    restored = torch.optim.AdamW(model.parameters(), fused=True)
    restored.load_state_dict(stored)
    match_parameter_layouts(restored)
    assert restored.state[weight]["exp_avg"].stride() == weight.stride()
    torch.testing.assert_close(restored.state[weight]["exp_avg"], optimizer.state[weight]["exp_avg"], rtol=0, atol=0)
    restored.step()  # the fused kernel takes the restored state
