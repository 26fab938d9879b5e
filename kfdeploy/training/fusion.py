"""Horizontal fusion: k task networks of one architecture run as one grouped network.

Every task network reads the same image, so k of one architecture are one network whose
convolutions are grouped (HFTA, Wang et al., MLSys 2021): the first convolution reads the
shared image with k times the output channels, every later one has k times the groups
(depthwise stays depthwise), BatchNorm runs over k x channels (each task keeps its own
statistics: they are per channel), pooling is per channel anyway, and a linear layer on a
grouped input is one batched matmul. Channels are laid out task by task, so task i's
channels of any layer are the i-th block.

It is the same mathematics as k separate networks, and nothing about it ships: the fused
network owns no weights. Each call gathers the task networks' own parameters (torch.cat and
torch.stack, so autograd hands each network its slice of the gradient and the optimizer,
checkpoints and exports see the unfused modules) and writes BatchNorm's running statistics
back into each network's buffers. What it buys is fewer, larger kernels: one grouped
convolution instead of k small ones per layer, which is what a CPU's vector units and a GPU
(eagerly, or as one CUDA graph) want.

`fuse(networks)` builds the fused network, or returns None with the reason when an
architecture holds something it cannot prove channel-local: a layer outside the small set
it knows, or a forward that mixes channels between tasks (checked by running both forms on
a probe image). Callers then run those networks one by one, as before.
"""
from __future__ import annotations

import copy
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import DepthwiseConv2d, conv2d

# Layers without weights that act on each channel (or each element) alone: a grouped
# input passes through them unchanged in meaning.
_CHANNEL_LOCAL = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
    nn.LeakyReLU, nn.ELU, nn.Mish, nn.Dropout, nn.Dropout2d, nn.Flatten,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d,
)

# nn.Conv2d, and the same convolution taking a faster CPU path (kfdeploy.training.kernels).
_CONVOLUTIONS = (nn.Conv2d, DepthwiseConv2d)


def _is_timm_batchnorm_act(module: nn.Module) -> bool:
    """timm's BatchNorm2d + dropout + activation in one layer (its forward is BatchNorm2d's, then drop, then act)."""
    cls = type(module)
    return cls.__name__ == "BatchNormAct2d" and cls.__module__.startswith("timm.")


class _Grouped(nn.Module):
    """A layer of the fused network: computes with the k source layers' parameters."""

    def __init__(self, sources: Sequence[nn.Module]):
        super().__init__()
        # A plain list, not submodules: the sources belong to their task networks, and the
        # fused network must hold no parameters of its own (nor count theirs twice).
        self.sources: List[nn.Module] = list(sources)

    @property
    def k(self) -> int:
        return len(self.sources)

    def gathered(self, name: str, dim: int = 0) -> Optional[torch.Tensor]:
        tensors = [getattr(s, name) for s in self.sources]
        return None if tensors[0] is None else torch.cat(tensors, dim)


class GroupedConv2d(_Grouped):
    """k Conv2d of one shape as one convolution (see the module's docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.sources[0]
        groups = conv.groups
        if x.shape[1] == conv.in_channels:  # the shared input every task reads
            if groups > 1:  # each task's groups need their own copy of it
                x, groups = x.repeat(1, self.k, 1, 1), groups * self.k
        else:
            groups *= self.k
        return conv2d(x, conv, self.gathered("weight"), self.gathered("bias"), groups)


class GroupedBatchNorm2d(_Grouped):
    """k BatchNorm2d (or timm BatchNormAct2d) as one over k x channels; each source's
    running statistics are updated exactly as its own forward would."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.sources[0]
        tracking = bn.training and bn.track_running_stats
        momentum = 0.0 if bn.momentum is None else bn.momentum
        if tracking and bn.num_batches_tracked is not None:
            for source in self.sources:
                source.num_batches_tracked.add_(1)
            if bn.momentum is None:  # a cumulative average, as BatchNorm2d computes it
                momentum = 1.0 / float(bn.num_batches_tracked)
        use_batch_stats = bn.training or bn.running_mean is None
        running = bn.running_mean is not None and (not bn.training or bn.track_running_stats)
        mean = self.gathered("running_mean") if running else None
        var = self.gathered("running_var") if running else None
        out = F.batch_norm(x, mean, var, self.gathered("weight"), self.gathered("bias"), use_batch_stats, momentum, bn.eps)
        if tracking and running:
            with torch.no_grad():
                for source, mean_part, var_part in zip(self.sources, mean.chunk(self.k), var.chunk(self.k)):
                    source.running_mean.copy_(mean_part)
                    source.running_var.copy_(var_part)
        if _is_timm_batchnorm_act(bn):
            out = bn.act(bn.drop(out))
        return out


class GroupedLinear(_Grouped):
    """k Linear of one shape: on the shared input one matmul with k x the outputs, on a
    grouped input (N, k x in) one batched matmul."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = self.sources[0]
        if x.shape[-1] == linear.in_features:
            return F.linear(x, self.gathered("weight"), self.gathered("bias"))
        return grouped_linear(x.view(x.shape[0], self.k, -1).transpose(0, 1), self.sources).transpose(0, 1).flatten(1)


def grouped_linear(x: torch.Tensor, layers: Sequence[nn.Linear]) -> torch.Tensor:
    """(k, N, in) through k Linear layers, layer i on x[i]: (k, N, out), one batched matmul."""
    weight = torch.stack([layer.weight for layer in layers]).transpose(1, 2)
    if layers[0].bias is None:
        return torch.bmm(x, weight)
    return torch.baddbmm(torch.stack([layer.bias for layer in layers]).unsqueeze(1), x, weight)


def _signature(network: nn.Module) -> tuple:
    """What must be equal for networks to fuse: their layers' types and every parameter's and buffer's shape."""
    return (
        tuple((name, type(m)) for name, m in network.named_modules()),
        tuple((name, tuple(p.shape)) for name, p in network.named_parameters()),
        tuple((name, tuple(b.shape)) for name, b in network.named_buffers()),
    )


def same_architecture(a: nn.Module, b: nn.Module) -> bool:
    return _signature(a) == _signature(b)


def _grouped_layer(layers: Sequence[nn.Module]) -> Optional[nn.Module]:
    """The fused twin of k equal layers that hold weights, or None for a layer that holds none."""
    first = layers[0]
    if type(first) in _CONVOLUTIONS:
        return GroupedConv2d(layers)
    if type(first) is nn.BatchNorm2d or _is_timm_batchnorm_act(first):
        return GroupedBatchNorm2d(layers)
    if type(first) is nn.Linear:
        return GroupedLinear(layers)
    return None


def _leaf_problem(name: str, module: nn.Module) -> Optional[str]:
    if module.__class__ in (*_CONVOLUTIONS, nn.BatchNorm2d, nn.Linear) or _is_timm_batchnorm_act(module):
        return None
    if next(module.children(), None) is not None:
        if next(module.parameters(recurse=False), None) is not None:
            return f"{name or 'the network'} ({type(module).__name__}) holds weights of its own beside its layers"
        return None  # a container: its layers are checked one by one, its forward by the probe
    if isinstance(module, _CHANNEL_LOCAL):
        return None
    return f"layer {name} ({type(module).__name__}) is not one fusion knows to act per channel"


def fuse(networks: Sequence[nn.Module], probe_shape: Tuple[int, ...]) -> Tuple[Optional[nn.Module], str]:
    """(the fused network of `networks`, "") or (None, why they cannot fuse).

    The fused network maps images (N, C, H, W) to (N, k x D), task i's output being the
    i-th block of D. `probe_shape` (C, H, W) is an input the networks take: both forms run
    on it once, and a fused form that answers otherwise (a forward that mixes channels) is
    refused. The networks must stay where they are (device, dtype) while the fused one is
    used: it holds their layers, not copies.
    """
    if len(networks) < 2:
        return None, "one network needs no fusion"
    template = networks[0]
    if not all(same_architecture(template, n) for n in networks[1:]):
        return None, "the networks differ in architecture or shape"
    named = [dict(n.named_modules()) for n in networks]
    for name, module in named[0].items():
        problem = _leaf_problem(name, module)
        if problem:
            return None, problem
    for name, buffer in template.named_buffers():
        owner = named[0][name.rpartition(".")[0]]
        if isinstance(owner, nn.BatchNorm2d):
            continue
        if not all(torch.equal(buffer, dict(n.named_buffers())[name]) for n in networks[1:]):
            return None, f"buffer {name} differs between the networks (a fused network shares it)"
    fused = copy.deepcopy(template)  # its structure and forward code; its weights are dropped below
    for name in [n for n, m in named[0].items() if _grouped_layer([m]) is not None]:
        parent_name, _, attribute = name.rpartition(".")
        parent = fused.get_submodule(parent_name) if parent_name else fused
        setattr(parent, attribute, _grouped_layer([layers[name] for layers in named]))
    problem = _probe(networks, fused, probe_shape)
    return (None, problem) if problem else (fused, "")


@torch.no_grad()
def _probe(networks: Sequence[nn.Module], fused: nn.Module, shape: Tuple[int, ...]) -> Optional[str]:
    """Why the fused network does not answer as the separate ones on a random image, or None."""
    parameter = next(networks[0].parameters())
    modes = {m: m.training for n in networks for m in n.modules()}
    fused_modes = {m: m.training for m in fused.modules()}
    try:
        for n in networks:
            n.eval()
        fused.eval()
        generator = torch.Generator().manual_seed(0)
        x = torch.rand((2, *shape), generator=generator).to(parameter.device, parameter.dtype)
        expected = torch.cat([n(x) for n in networks], dim=1)
        try:
            got = fused(x)
        except (RuntimeError, ValueError, IndexError) as exc:
            return f"the fused network fails on a probe image ({(str(exc).splitlines() or [''])[0][:120]})"
        if got.shape != expected.shape:
            return f"the fused network gives {tuple(got.shape)} where the networks give {tuple(expected.shape)}"
        scale = expected.abs().max().clamp_min(1e-6)
        if not torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * float(scale)):
            return "the fused network answers otherwise than the networks (their forward mixes channels)"
        return None
    finally:
        for module, mode in (modes | fused_modes).items():
            module.training = mode
