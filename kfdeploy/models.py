"""Networks: the conv backbone, the multi-task teacher, and the factor network.

The split follows timm: `forward_features` is the trunk, `forward_head` a task. A factor
network's task i computes `head_i(CKN(x) + TSN_i(x))`; a task module is deployable on
its own as `(image, common feature) -> logits`.

Any teacher works if it follows `TeacherProtocol`; `SpritesTeacher` is ours.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Dict, Mapping, Protocol, Tuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class BackboneConfig:
    in_channels: int = 1
    image_size: int = 64
    width: int = 32  # channels of the first conv; later convs double it once
    feature_dim: int = 256
    # Two constant coordinate channels (CoordConv) make position a linear read-out
    # instead of something the convs must discover; position is 2 of our 5 tasks.
    coord_channels: bool = True
    # BatchNorm after each conv: measured to reach >= 0.99 on shape/scale/position in
    # half the steps; in inference it folds into the convs, so it costs nothing deployed.
    batch_norm: bool = True


class ConvBackbone(nn.Module):
    """SimpleConv64 (the beta-VAE encoder): 4 stride-2 convs, then 2 linear layers.

    The output is the pooled feature the heads read: (N, feature_dim).
    """

    def __init__(self, config: BackboneConfig, out_dim: int | None = None):
        super().__init__()
        if config.image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16, got {config.image_size}")
        self.config = config
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
        if self.config.coord_channels:
            x = torch.cat([x, self.coords.expand(x.shape[0], -1, -1, -1).to(x.dtype)], dim=1)
        return self.fc(self.convs(x))


class TeacherProtocol(Protocol):
    """What factorization needs from a teacher (yours or ours).

    - `task_classes`: task name -> number of classes, in a fixed order;
    - `feature_dim`: width of the pooled feature;
    - `forward_features(x) -> (N, feature_dim)`; `forward_head(features) -> {task: logits}`.
    """

    task_classes: Mapping[str, int]
    feature_dim: int

    def forward_features(self, x: torch.Tensor) -> torch.Tensor: ...

    def forward_head(self, features: torch.Tensor) -> Dict[str, torch.Tensor]: ...


@dataclass
class TeacherConfig:
    task_classes: Dict[str, int]
    backbone: BackboneConfig = field(default_factory=BackboneConfig)

    @classmethod
    def from_dict(cls, d: dict) -> "TeacherConfig":
        return cls(dict(d["task_classes"]), BackboneConfig(**d["backbone"]))


class SpritesTeacher(nn.Module):
    """The monolithic multi-task teacher: one backbone, one linear head per task."""

    def __init__(self, config: TeacherConfig):
        super().__init__()
        self.config = config
        self.task_classes = dict(config.task_classes)
        self.feature_dim = config.backbone.feature_dim
        self.backbone = ConvBackbone(config.backbone)
        self.heads = nn.ModuleDict(
            {t: nn.Linear(self.feature_dim, n) for t, n in self.task_classes.items()}
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # ReLU so the feature matches what the factor network's trunk is warm-started from.
        return F.relu(self.backbone(x))

    def forward_head(self, features: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {t: head(features) for t, head in self.heads.items()}

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.forward_head(self.forward_features(x))


@dataclass
class FactorConfig:
    task_classes: Dict[str, int]
    trunk: BackboneConfig = field(default_factory=BackboneConfig)
    # Task networks are narrower than the trunk (the reference pairs ResNet-18 with
    # MobileNetV2 x0.5) so that k composed tasks cost far less than k full networks.
    task_width: int = 16
    task_hidden_dim: int = 128
    teacher_feature_dim: int = 256

    @property
    def feature_dim(self) -> int:
        return self.trunk.feature_dim

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FactorConfig":
        d = dict(d)
        d["trunk"] = BackboneConfig(**d["trunk"])
        d["task_classes"] = dict(d["task_classes"])
        return cls(**d)


class TaskModule(nn.Module):
    """TSN_i and head_i: a small network with a Gaussian code of the trunk's width.

    The code is per sample (mu and log-variance come from the network), so a batch of
    one behaves like any other. Training samples it; inference uses mu.
    """

    def __init__(self, config: FactorConfig, classes: int):
        super().__init__()
        d = config.feature_dim
        tsn = replace(config.trunk, width=config.task_width, feature_dim=config.task_hidden_dim)
        self.tsn = ConvBackbone(tsn, out_dim=2 * d)
        self.head = nn.Linear(d, classes)
        self.aux_head = nn.Linear(d, classes)  # reads the code alone; training only
        # Start with a zero code: at step 0 the factor network answers exactly as its
        # (warm-started) trunk and head do, and the code grows only where it helps.
        last = self.tsn.fc[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        last.bias.data[d:] = -4.0  # small initial variance, so sampling starts gentle

    def code(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        out = self.tsn(x)
        # Slicing, not chunk(): chunk exports as Split, whose form changed in opset 18 and
        # breaks the down-conversion to opset 17 that TensorRT 8.5 (JetPack 5) needs.
        d = out.shape[1] // 2
        return out[:, :d], out[:, d:].clamp(-10.0, 10.0)

    def forward(self, x: torch.Tensor, common: torch.Tensor) -> torch.Tensor:
        """Inference path, the one exported: deterministic (mu), returns logits."""
        mu, _ = self.code(x)
        return self.head(common + mu)


class FactorNet(nn.Module):
    """The common-knowledge trunk (CKN) plus one TaskModule per task."""

    def __init__(self, config: FactorConfig):
        super().__init__()
        self.config = config
        self.task_classes = dict(config.task_classes)
        self.trunk = ConvBackbone(config.trunk)
        self.tasks = nn.ModuleDict({t: TaskModule(config, n) for t, n in self.task_classes.items()})
        # InfoMax compares trunk features with teacher features projected to trunk width.
        self.teacher_proj = nn.Linear(config.teacher_feature_dim, config.feature_dim)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.trunk(x))

    def forward_head(self, x: torch.Tensor, common: torch.Tensor, task: str) -> torch.Tensor:
        return self.tasks[task](x, common)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        common = self.forward_features(x)
        return {t: m(x, common) for t, m in self.tasks.items()}

    def warm_start_from(self, teacher: nn.Module) -> bool:
        """Copy the teacher's backbone into the trunk and its heads into ours, if they fit.

        InfoMax pulls the trunk towards the teacher's features anyway; starting there saves
        most of the training budget. Returns False (and changes nothing) when the teacher's
        architecture differs, e.g. a user's own teacher.
        """
        backbone = getattr(teacher, "backbone", None)
        heads = getattr(teacher, "heads", None)
        if not isinstance(backbone, ConvBackbone) or not isinstance(heads, nn.ModuleDict):
            return False
        if backbone.config != self.config.trunk or any(t not in heads for t in self.tasks):
            return False
        self.trunk.load_state_dict(backbone.state_dict())
        for t, module in self.tasks.items():
            module.head.load_state_dict(heads[t].state_dict())
            module.aux_head.load_state_dict(heads[t].state_dict())
        return True


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
