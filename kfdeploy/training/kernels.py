"""How networks run in training: the same mathematics, on the fast paths of the hardware.

- **Channels-last.** timm's convolutional networks train in channels-last memory format
  (NHWC), on a CPU and on a GPU: oneDNN's and cuDNN's fast convolutions are NHWC ones. On 2
  CPU cores it made the ResNet-50 and the ResNet-18 + six MobileNetV2 x0.5 training steps
  faster (batch 64, 64x64 images). SimpleConv stays as it was.
- **Explicit padding of small depthwise maps on a CPU**, below.

A depthwise convolution whose feature map is smaller than its kernel (MobileNetV2's last
stages at 64x64 images: 480 channels on 2x2 maps, a 3x3 kernel padded by 1) takes a slow
path for its weight gradient in PyTorch 2.14's oneDNN: 16 ms forward and backward at batch 64
on 2 cores, where the same convolution on the input padded beforehand (and no padding of
its own) takes 1.3 ms: the same outputs bit for bit (zeros are zeros, wherever they are
added), and the same gradients up to float rounding (another kernel sums them). Six
MobileNetV2 x0.5 task networks spent a fifth of their training step there. Ordinary convolutions and forward passes are not affected, so only depthwise
convolutions in training mode on small maps take the explicit padding.

Nothing here ships: the modules keep their class's state-dict keys, and in eval mode (export,
evaluation) they are plain convolutions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pads_explicitly(x: torch.Tensor, conv: nn.Conv2d, groups: int) -> bool:
    """Whether convolving `x` with `conv`'s weights (in `groups` groups) should pad beforehand:
    a depthwise convolution on a CPU, in training, on a map smaller than its kernel."""
    return (x.device.type == "cpu" and conv.training and groups == x.shape[1] > 1 and conv.padding_mode == "zeros"
            and any(conv.padding) and (x.shape[-2] < conv.kernel_size[0] or x.shape[-1] < conv.kernel_size[1]))


def conv2d(x: torch.Tensor, conv: nn.Conv2d, weight: torch.Tensor, bias, groups: int) -> torch.Tensor:
    """F.conv2d with `conv`'s geometry, padded explicitly where `pads_explicitly` says so."""
    padding = conv.padding
    if conv.padding_mode != "zeros" or pads_explicitly(x, conv, groups):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x, padding = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode), 0
    return F.conv2d(x, weight, bias, conv.stride, padding, conv.dilation, groups)


class DepthwiseConv2d(nn.Conv2d):
    """nn.Conv2d whose depthwise training passes on small maps pad explicitly (see the module)."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
        return conv2d(input, self, weight, bias, self.groups)


def use_cpu_kernels(model: nn.Module) -> int:
    """Make `model`'s depthwise nn.Conv2d layers DepthwiseConv2d, in place; returns how many.
    Their parameters, buffers and state-dict keys stay the very same objects and names."""
    changed = 0
    for module in model.modules():
        if type(module) is nn.Conv2d and module.groups == module.in_channels > 1 and any(module.padding):
            module.__class__ = DepthwiseConv2d
            changed += 1
    return changed


def trains_channels_last(model: nn.Module) -> bool:
    """Whether `model` holds a timm network (the networks channels-last was measured on)."""
    return any(type(m).__module__.startswith("timm.") for m in model.modules())


def prepare_for_training(objective: nn.Module, device: torch.device) -> bool:
    """Put `objective` (its student and teacher alike) on the kernels above, in place; returns
    whether its inputs should come channels-last."""
    channels_last = trains_channels_last(objective)
    if channels_last:
        objective.to(memory_format=torch.channels_last)
    if device.type == "cpu":
        use_cpu_kernels(objective)
    return channels_last


def match_parameter_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give the optimizer's per-parameter state (restored from a checkpoint, where every tensor
    is stored contiguous) its parameter's memory format, as a fresh optimizer would have it."""
    for param, state in optimizer.state.items():
        for name, value in state.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                state[name] = torch.empty_like(param, dtype=value.dtype).copy_(value)
