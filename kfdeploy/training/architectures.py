"""Backbones by name: our SimpleConv stack for sprites, or any timm architecture.

One front door, `build_backbone(config) -> (module, D)`: the module maps images
(N, C, H, W) to the pooled feature (N, D) the heads read, which is timm's
`forward_features` + global pooling (`num_classes=0`). Nothing here downloads: timm
builds every architecture with `pretrained=False`, and weights come from a local file
(`load_pretrained`). timm is imported only when a timm architecture is asked for, so the
sprites default and the runtime never pay its import.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..errors import KfError

SIMPLECONV = "simpleconv"
# Probing sizes past this is pointless for a deployable module (and slow for big nets).
_LARGEST_SIZE_PROBED = 1024


@dataclass
class BackboneConfig:
    in_channels: int = 1
    image_size: int = 64
    width: int = 32  # simpleconv: channels of the first conv; later convs double it once
    # simpleconv: the width chosen for its pooled feature. A timm net: its num_features,
    # filled in by resolve() (the architecture decides it, not us).
    feature_dim: int = 256
    # simpleconv: two constant coordinate channels (CoordConv) make position a linear
    # read-out instead of something the convs must discover; position is 2 of our 5 tasks.
    coord_channels: bool = True
    # simpleconv: BatchNorm after each conv: measured to reach >= 0.99 on shape/scale/position
    # in half the steps; in inference it folds into the convs, so it costs nothing deployed.
    batch_norm: bool = True
    # "simpleconv" or a timm model name (timm.list_models()); last, so configs written
    # before it existed load as simpleconv.
    arch: str = SIMPLECONV


class ConvBackbone(nn.Module):
    """SimpleConv64 (the beta-VAE encoder): 4 stride-2 convs, then 2 linear layers.

    With `out_dim` it is a task network's code layer (raw output, any sign); without, the
    pooled feature the heads read, after a ReLU as every timm pooled feature of a conv net.
    """

    def __init__(self, config: BackboneConfig, out_dim: int | None = None):
        super().__init__()
        if config.image_size % 16 or config.image_size <= 0:
            raise KfError(
                f"simpleconv takes image sizes that are multiples of 16 (16, 32, 64, ...), not "
                f"{config.image_size}; choose --image-size 64 or another multiple of 16"
            )
        self.config = config
        self.pooled = out_dim is None
        w = config.width
        in_ch = config.in_channels + (2 if config.coord_channels else 0)
        layers = []
        for c_in, c_out in ((in_ch, w), (w, w), (w, 2 * w), (2 * w, 2 * w)):
            layers.append(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=not config.batch_norm))
            if config.batch_norm:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.ReLU())
        self.convs = nn.Sequential(*layers)
        spatial = config.image_size // 16
        self.fc = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * w * spatial * spatial, config.feature_dim), nn.ReLU(),
            nn.Linear(config.feature_dim, out_dim or config.feature_dim),
        )
        if config.coord_channels:
            axis = torch.linspace(-1.0, 1.0, config.image_size)
            grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"))  # (2, H, W): y, x
            self.register_buffer("coords", grid[None], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(self.convs(self._with_coords(x)))
        return torch.relu(out) if self.pooled else out

    def last_layer_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the last linear layer reads: a task network's code layer folds into its head at export."""
        return self.fc[:-1](self.convs(self._with_coords(x)))

    def _with_coords(self, x: torch.Tensor) -> torch.Tensor:
        if not self.config.coord_channels:
            return x
        return torch.cat([x, self.coords.expand(x.shape[0], -1, -1, -1).to(x.dtype)], dim=1)


def _timm():
    from ..extras import require

    return require("timm", "train")


def _refuse_download(arch: str) -> None:
    """Names that make timm fetch something, or promise pretrained weights, are refused."""
    hint = "kfdeploy never downloads: fetch the weights on a machine with network and pass the local file with --pretrained FILE"
    if ":" in arch or "/" in arch:  # hf-hub:org/name, hf_hub:..., local-dir:..., URLs
        raise KfError(f"architecture {arch!r} would be fetched from a hub; {hint}, with --arch set to the plain timm name")
    base, _, tag = arch.partition(".")
    if tag:
        raise KfError(f"architecture {arch!r} names pretrained weights ({tag}); {hint}, with --arch {base}")


def check_arch(arch: str) -> None:
    """Refuse an architecture name that is unknown or would need a download."""
    if arch == SIMPLECONV:
        return
    _refuse_download(arch)
    timm = _timm()
    if timm.is_model(arch):
        return
    names = timm.list_models()
    close = [n for n in timm.list_models(f"*{arch}*") if n != arch][:4]
    close += [n for n in difflib.get_close_matches(arch, names, n=6, cutoff=0.6) if n not in close]
    suggestion = ", ".join(close[:6]) if close else "none close"
    raise KfError(
        f"unknown architecture {arch!r}; close timm names: {suggestion} "
        f"(all: timm.list_models('*{arch[:6]}*')), or {SIMPLECONV!r} for the sprites default"
    )


def _create_timm(config: BackboneConfig) -> nn.Module:
    timm = _timm()
    kwargs = {}
    cfg = timm.models.get_pretrained_cfg(config.arch)
    if cfg is not None and cfg.fixed_input_size:
        kwargs["img_size"] = config.image_size  # ViT-like: position embeddings are built for one size
    # exportable=True: timm picks layer variants that trace and export to ONNX cleanly.
    return timm.create_model(
        config.arch, pretrained=False, num_classes=0, in_chans=config.in_channels, exportable=True, **kwargs,
    )


@torch.no_grad()
def _forward_problem(model: nn.Module, channels: int, size: int) -> Optional[str]:
    """Why `model` cannot take a zero image of this size, or None when it can."""
    try:
        out = model(torch.zeros(1, channels, size, size))
    except (RuntimeError, AssertionError, ValueError, IndexError) as exc:
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
    if out.ndim != 2:
        return f"its output has shape {tuple(out.shape)}, not a pooled (N, D) feature"
    return None


def _smallest_size(model: nn.Module, channels: int, start: int) -> Optional[int]:
    """The smallest size above `start` that runs (sizes are monotone for conv nets)."""
    low, high = start, _LARGEST_SIZE_PROBED
    if _forward_problem(model, channels, high) is not None:
        return None
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if _forward_problem(model, channels, mid) is None else (mid, high)
    return high


def _total_stride(model: nn.Module) -> int:
    info = getattr(model, "feature_info", None)
    try:
        return int(info[-1]["reduction"])
    except (TypeError, KeyError, IndexError):
        return 1


def build_backbone(config: BackboneConfig) -> Tuple[nn.Module, int]:
    """(module mapping images to the pooled feature, its width D), for any supported arch.

    A timm net is built with random weights and tried once on a zero image of the
    configured size: a size it cannot take, or one smaller than its total stride (its last
    stages would see nothing but padding), is refused with the smallest size that works.
    """
    if config.arch == SIMPLECONV:
        return ConvBackbone(config), config.feature_dim
    check_arch(config.arch)
    size, channels = config.image_size, config.in_channels
    if size < 1 or channels < 1:
        raise KfError(f"image size and channels must be positive, got {channels}x{size}x{size}")
    model = _create_timm(config).eval()
    stride = _total_stride(model)
    problem = _forward_problem(model, channels, size)
    if problem is None and size < stride:
        problem = f"smaller than its total stride {stride}"
    if problem is not None:
        # A fixed-size net (ViT-like) was built for this size: its floor is its patch, the stride.
        fixed = (getattr(model, "pretrained_cfg", None) or {}).get("fixed_input_size")
        smallest = stride if fixed else _smallest_size(model, channels, max(size, stride - 1))
        works = f"it takes {smallest}x{smallest} and larger" if smallest else f"no size up to {_LARGEST_SIZE_PROBED} worked"
        raise KfError(
            f"architecture {config.arch} cannot take {size}x{size} images ({problem}); {works}: "
            f"choose --image-size {smallest or 224} or another architecture"
        )
    return model.train(), int(model.num_features)


def stage_widths(backbone: nn.Module, stages: int) -> Optional[List[int]]:
    """Channels of the last `stages` stages of a timm backbone (the last is its pooled feature's),
    or None for one that cannot give its stages (simpleconv, a net without forward_intermediates)."""
    info = getattr(backbone, "feature_info", None)
    if not callable(getattr(backbone, "forward_intermediates", None)) or not isinstance(info, list) or len(info) < stages:
        return None
    return [int(entry["num_chs"]) for entry in info[-stages:]]


def pooled_stages(backbone: nn.Module, x: torch.Tensor, stages: int) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """(the pooled feature, the `stages` - 1 stages before the last, each globally average-pooled), in one pass."""
    final, maps = backbone.forward_intermediates(x, indices=stages)
    return backbone.forward_head(final), [m.mean(dim=(2, 3)) for m in maps[:-1]]


def resolve(config: BackboneConfig) -> BackboneConfig:
    """The config with `feature_dim` set to what the architecture gives (checked by building it)."""
    _, dim = build_backbone(config)
    return config if dim == config.feature_dim else replace(config, feature_dim=dim)


# --- local weights -----------------------------------------------------------------------

_DOWNLOAD_WORDS = ("imagenet", "true", "yes", "1", "default", "timm", "pretrained")
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".tar")


def _asks_for_download(text: str) -> bool:
    """'imagenet', a URL, a hub name or a timm tag name ('resnet18.a1_in1k'): not a file."""
    return (
        # A scheme: https://, hf-hub:, hf_hub: (Path() turns "https://" into "https:/").
        text.lower() in _DOWNLOAD_WORDS or re.match(r"[A-Za-z][\w+.-]+:", text) is not None
        or (re.fullmatch(r"[A-Za-z0-9_]+\.[A-Za-z0-9_]+", text) is not None and not text.endswith(_WEIGHT_SUFFIXES))
    )


def read_weights(path: Path, flag: str = "--pretrained") -> Dict[str, torch.Tensor]:
    """The tensors of a local weights file (safetensors, or a torch checkpoint loaded weights-only)."""
    text = str(path)
    if not path.is_file():
        if _asks_for_download(text):
            raise KfError(
                f"{flag} {text!r} would need a download, and kfdeploy never downloads: fetch the "
                "weights on a machine with network (e.g. timm's model.safetensors from the Hugging Face Hub) "
                "and pass the local file"
            )
        raise KfError(f"{flag} {path}: no such file; pass a local .safetensors file or a torch/timm checkpoint")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise KfError(f"{flag} {path} is not a readable safetensors file ({exc})") from None
    import pickle

    try:
        # weights_only: a checkpoint is data; code inside one is refused, never run.
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise KfError(f"{flag} {path} is not a weights-only torch checkpoint or safetensors file ({first})") from None
    if isinstance(checkpoint, dict):
        # timm's train.py writes {"state_dict": ..., "state_dict_ema": ...}; others use "model".
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    tensors = {k: v for k, v in checkpoint.items() if torch.is_tensor(v)} if isinstance(checkpoint, dict) else {}
    if not tensors:
        raise KfError(f"{flag} {path} holds no tensors (not a state dict or a checkpoint with one)")
    return {k.removeprefix("module."): v for k, v in tensors.items()}  # DataParallel/DDP prefix


def _few(names, count: int = 3) -> str:
    names = sorted(names)
    return ", ".join(names[:count]) + (f" (+{len(names) - count} more)" if len(names) > count else "")


def weights_mismatch(expected: Dict[str, torch.Tensor], tensors: Dict[str, torch.Tensor]) -> Optional[str]:
    """How `tensors` fail to fit a module's state dict `expected` (a few keys named), or None."""
    # BatchNorm counters are bookkeeping, absent from many exported checkpoints.
    missing = [k for k in expected if k not in tensors and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in tensors if k not in expected]
    wrong = [f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in tensors and tensors[k].shape != v.shape]
    parts = [f"missing {_few(missing)}" if missing else "", f"unexpected {_few(unexpected)}" if unexpected else "",
             f"wrong shape {_few(wrong, 2)}" if wrong else ""]
    return "; ".join(p for p in parts if p) or None


def load_pretrained(module: nn.Module, path: Path, config: BackboneConfig) -> Dict[str, str]:
    """Load local weights into a backbone built by build_backbone; returns what was adapted.

    The classifier of an ImageNet checkpoint is dropped (the backbone has none), and a
    first conv made for 3 channels is adapted to `in_channels` as timm does for its own
    pretrained weights. Any other mismatch is refused, naming a few keys.
    """
    path = Path(path)
    tensors = read_weights(path)
    notes: Dict[str, str] = {}
    expected = module.state_dict()
    if config.arch != SIMPLECONV:
        cfg = getattr(module, "pretrained_cfg", {}) or {}
        classifiers = cfg.get("classifier") or ()
        for prefix in (classifiers,) if isinstance(classifiers, str) else classifiers:
            dropped = [k for k in tensors if k.startswith(prefix + ".")]
            for k in dropped:
                del tensors[k]
            if dropped:
                notes["classifier"] = f"dropped {prefix}"
        first = f"{cfg.get('first_conv')}.weight"
        if first in tensors and first in expected and tensors[first].ndim == 4 and tensors[first].shape[1] != expected[first].shape[1]:
            tensors[first] = _timm().models.adapt_input_conv(config.in_channels, tensors[first].float())
            notes["first_conv"] = f"{first} adapted to {config.in_channels} channel(s)"
    mismatch = weights_mismatch(expected, tensors)
    if mismatch:
        raise KfError(f"--pretrained {path} does not fit {config.arch}: {mismatch}")
    module.load_state_dict(tensors, strict=False)
    return notes
