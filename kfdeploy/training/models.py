"""Networks: the multi-task teacher and the factor network, on backbones from architectures.py.

The split follows timm: `forward_features` is the trunk, `forward_head` a task. A factor
network's task i computes `head_i(CKN(x) + TSN_i(x))`; a task module is deployable on
its own as `(image, common feature) -> logits`. The trunk and the teacher are any
backbone by name (`simpleconv` for sprites, or a timm architecture); so is each task
network, whose pooled feature is projected to a Gaussian code of the trunk's width.

Any teacher works if it follows `TeacherProtocol`; `SpritesTeacher` is ours.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from typing import Callable, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple, Union, get_type_hints

import torch
from torch import nn

from .architectures import SIMPLECONV, BackboneConfig, ConvBackbone, build_backbone, pooled_stages, stage_widths
from .fusion import fuse, grouped_linear, same_architecture

__all__ = [
    "BackboneConfig", "ConvBackbone", "TeacherProtocol", "TeacherConfig", "SpritesTeacher",
    "FactorConfig", "TaskModule", "FusedTaskModules", "FactorNet", "count_parameters", "freeze",
]

MAX_INFOMAX_STAGES = 4  # stages aligned besides the pooled feature; a ResNet has 4 after its stem
LOGVAR_RANGE = (-10.0, 10.0)  # a code's log-variance is clamped: exp() of more overflows in half precision
Code = Tuple[torch.Tensor, Optional[torch.Tensor]]  # (mu, log-variance or None where not asked for)


class TeacherProtocol(Protocol):
    """What factorization needs from a teacher (yours or ours).

    - `task_classes`: task name -> number of classes, in a fixed order;
    - `feature_dim`: width of the pooled feature;
    - `forward_features(x) -> (N, feature_dim)`; `forward_head(features) -> {task: logits}`.

    Optional, for InfoMax at intermediate stages (`--infomax-stages`): `stage_dims(stages)`,
    the widths of the `stages` - 1 stages before the pooled feature (None if it has none), and
    `forward_stages(x, stages) -> (pooled feature, [each of those stages, pooled])`.
    """

    task_classes: Mapping[str, int]
    feature_dim: int

    def forward_features(self, x: torch.Tensor) -> torch.Tensor: ...

    def forward_head(self, features: torch.Tensor) -> Dict[str, torch.Tensor]: ...


def _typed(cls, values: dict, where: str):
    """`cls(**values)` for a config read back from a file (a run's, or a bundle's manifest,
    which is untrusted): no field `cls` lacks, and every int, str or bool field of that
    type (an int never a bool, and at least 1: every int here is a size), before a network
    is built from it. Nested configs come in already built."""
    if not isinstance(values, dict):
        raise TypeError(f"{where} must be an object, got {type(values).__name__}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for name, value in values.items():
        if name not in known:
            raise ValueError(f"{where} has no field {name!r}")
        hint = hints[name]
        if hint in (int, str, bool) and type(value) is not hint:
            raise TypeError(f"{where}.{name} must be {hint.__name__}, got {type(value).__name__} {value!r:.40}")
        if hint is int and value < 1:
            raise ValueError(f"{where}.{name} must be at least 1, got {value}")
    return cls(**values)


def _task_classes(values: dict) -> Dict[str, int]:
    if not isinstance(values, dict) or not all(type(n) is int and n >= 1 for n in values.values()):
        raise TypeError(f"task_classes must map task names to class counts of at least 1, got {values!r:.60}")
    return dict(values)


@dataclass
class TeacherConfig:
    task_classes: Dict[str, int]
    backbone: BackboneConfig = field(default_factory=BackboneConfig)

    @property
    def arch(self) -> str:
        return self.backbone.arch

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TeacherConfig":
        return cls(_task_classes(d["task_classes"]), _typed(BackboneConfig, d["backbone"], "backbone"))


class SpritesTeacher(nn.Module):
    """The monolithic multi-task teacher: one backbone, one linear head per task."""

    def __init__(self, config: TeacherConfig):
        super().__init__()
        self.backbone, self.feature_dim = build_backbone(config.backbone)
        # A timm net decides its own width; the config records what it is.
        self.config = replace(config, backbone=replace(config.backbone, feature_dim=self.feature_dim))
        self.task_classes = dict(config.task_classes)
        self.heads = nn.ModuleDict(
            {t: nn.Linear(self.feature_dim, n) for t, n in self.task_classes.items()}
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward_head(self, features: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {t: head(features) for t, head in self.heads.items()}

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.forward_head(self.forward_features(x))

    def stage_dims(self, stages: int) -> Optional[List[int]]:
        widths = stage_widths(self.backbone, stages)
        return None if widths is None else widths[:-1]

    def forward_stages(self, x: torch.Tensor, stages: int) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        return pooled_stages(self.backbone, x, stages)


@dataclass
class FactorConfig:
    task_classes: Dict[str, int]
    trunk: BackboneConfig = field(default_factory=BackboneConfig)
    # Task networks are narrower than the trunk (the reference pairs ResNet-18 with
    # MobileNetV2 x0.5) so that k composed tasks cost far less than k full networks.
    # task_width and task_hidden_dim shape a simpleconv task network; a timm one is as built.
    task_width: int = 16
    task_hidden_dim: int = 128
    teacher_feature_dim: int = 256
    task_arch: str = SIMPLECONV  # after the fields above, so configs written before it existed load as simpleconv
    # Widths of the teacher's stages that InfoMax also aligns the trunk with, before its pooled
    # feature (the reference aligns three stages in all); empty: the pooled feature alone.
    # Training only: a bundle's manifest leaves it out.
    teacher_stage_dims: List[int] = field(default_factory=list)

    @property
    def feature_dim(self) -> int:
        return self.trunk.feature_dim

    @property
    def trunk_arch(self) -> str:
        return self.trunk.arch

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FactorConfig":
        d = dict(d)
        d["trunk"] = _typed(BackboneConfig, d["trunk"], "model.trunk")
        d["task_classes"] = _task_classes(d["task_classes"])
        dims = d.get("teacher_stage_dims", [])
        if not isinstance(dims, list) or len(dims) > MAX_INFOMAX_STAGES or not all(type(n) is int and n >= 1 for n in dims):
            raise TypeError(f"model.teacher_stage_dims must list at most {MAX_INFOMAX_STAGES} widths of at least 1, got {dims!r:.60}")
        return _typed(cls, d, "model")

    def deployed_dict(self) -> dict:
        """The configuration a bundle records: without what only training uses (nor the key, which
        bundle readers from before it existed refuse)."""
        d = self.to_dict()
        del d["teacher_stage_dims"]
        return d


class TaskModule(nn.Module):
    """TSN_i and head_i: a small network with a Gaussian code of the trunk's width.

    The code is per sample (mu and log-variance come from the network), so a batch of
    one behaves like any other. Training samples it; inference uses mu. A timm task
    network's pooled feature goes through two linear layers, one to mu and one to the
    log-variance, so the exported (inference) graph holds only mu's.
    """

    def __init__(self, config: FactorConfig, classes: int):
        super().__init__()
        d = config.feature_dim
        self.projected = config.task_arch != SIMPLECONV
        if self.projected:
            trunk = config.trunk
            self.tsn, width = build_backbone(BackboneConfig(trunk.in_channels, trunk.image_size, arch=config.task_arch))
            self.mu, self.logvar = nn.Linear(width, d), nn.Linear(width, d)
            code_layers = (self.mu, self.logvar)
        else:
            tsn = replace(config.trunk, arch=SIMPLECONV, width=config.task_width, feature_dim=config.task_hidden_dim)
            self.tsn = ConvBackbone(tsn, out_dim=2 * d)  # one layer gives mu and log-variance
            code_layers = (self.tsn.fc[-1],)
        self.head = nn.Linear(d, classes)
        self.aux_head = nn.Linear(d, classes)  # reads the code alone; training only
        # Start with a zero code: at step 0 the factor network answers exactly as its
        # (warm-started) trunk and head do, and the code grows only where it helps.
        for layer in code_layers:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        code_layers[-1].bias.data[-d:] = -4.0  # small initial variance, so sampling starts gentle

    def code(self, x: torch.Tensor, logvar: bool = True) -> Code:
        """(mu, log-variance) of the code for images `x`; the log-variance only if asked for."""
        if self.projected:
            feature = self.tsn(x)
            return self.mu(feature), self.logvar(feature).clamp(*LOGVAR_RANGE) if logvar else None
        return split_code(self.tsn(x), logvar)

    def code_layer(self) -> Tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """mu's linear layer, as (weight, bias, what it reads from images): inference's code is
        weight @ reads(x) + bias, which export folds into the head."""
        if self.projected:
            return self.mu.weight, self.mu.bias, self.tsn
        d, layer = self.head.in_features, self.tsn.fc[-1]
        return layer.weight[:d], layer.bias[:d], self.tsn.last_layer_input

    def fuses_with(self, other: "TaskModule") -> bool:
        """Whether the two compute their codes alike (the same task network and code layers; heads may differ)."""
        return (self.projected == other.projected and same_architecture(self.tsn, other.tsn)
                and (not self.projected or self.mu.weight.shape == other.mu.weight.shape))

    def forward(self, x: torch.Tensor, common: torch.Tensor) -> torch.Tensor:
        """Inference path, the one exported: deterministic (mu), returns logits."""
        mu = self.mu(self.tsn(x)) if self.projected else self.code(x)[0]
        return self.head(common + mu)


def split_code(out: torch.Tensor, logvar: bool) -> Code:
    """A simpleconv task network's output (..., 2D): mu is its first half, the log-variance its second."""
    # Slicing, not chunk(): chunk exports as Split, whose form changed in opset 18 and
    # breaks the down-conversion to opset 17 that TensorRT 8.5 (JetPack 5) needs.
    d = out.shape[-1] // 2
    return out[..., :d], out[..., d:].clamp(*LOGVAR_RANGE) if logvar else None


class FusedTaskModules:
    """k TaskModules of one architecture computing their codes as one: their task networks
    fused into one grouped network (kfdeploy.training.fusion), their code layers one batched
    matmul. The modules keep every weight; this holds no state of its own but the fused
    network's structure, and answers exactly as the modules do one by one."""

    def __init__(self, tasks: Sequence[str], modules: Sequence["TaskModule"], network: nn.Module):
        self.tasks, self.modules, self.network = list(tasks), list(modules), network

    def codes(self, x: torch.Tensor, logvar: bool = True) -> Dict[str, Code]:
        template = self.modules[0]
        if self.network.training != template.tsn.training:  # the fused copy follows its sources' mode
            self.network.train(template.tsn.training)
        out = self.network(x)
        out = out.view(out.shape[0], len(self.modules), -1).transpose(0, 1)  # (k, N, width): task i's block is out[i]
        if template.projected:
            mu = grouped_linear(out, [m.mu for m in self.modules])
            log_variance = grouped_linear(out, [m.logvar for m in self.modules]).clamp(*LOGVAR_RANGE) if logvar else None
        else:
            mu, log_variance = split_code(out, logvar)
        return {t: (mu[i], None if log_variance is None else log_variance[i]) for i, t in enumerate(self.tasks)}


class FactorNet(nn.Module):
    """The common-knowledge trunk (CKN) plus one TaskModule per task.

    Task modules of one architecture compute their codes fused (`task_codes`, used by the
    forward and by training) unless `fuse_tasks` is False: the same numbers, fewer and larger
    kernels. Checkpoints, exports and bundles hold the modules one by one either way.
    """

    def __init__(self, config: FactorConfig):
        super().__init__()
        self.trunk, dim = build_backbone(config.trunk)
        # A timm trunk decides its own width; the config (and so every bundle) records it.
        self.config = config = replace(config, trunk=replace(config.trunk, feature_dim=dim))
        self.task_classes = dict(config.task_classes)
        self.tasks = nn.ModuleDict({t: TaskModule(config, n) for t, n in self.task_classes.items()})
        # InfoMax compares trunk features with teacher features projected to trunk width.
        self.teacher_proj = nn.Linear(config.teacher_feature_dim, config.feature_dim)
        # ... and, where asked, at earlier stages, through the reference's projection (an MLP).
        stages = len(config.teacher_stage_dims) + 1
        widths = stage_widths(self.trunk, stages) if stages > 1 else [config.feature_dim]
        if widths is None:
            raise ValueError(f"a {config.trunk_arch} trunk cannot give its stages for InfoMax at {stages} stages")
        self.stage_proj = nn.ModuleList(
            nn.Sequential(nn.Linear(t, s), nn.BatchNorm1d(s), nn.ReLU(), nn.Linear(s, s))
            for t, s in zip(config.teacher_stage_dims, widths[:-1])
        )
        self.fuse_tasks = True
        self._plans: Dict[tuple, List[Union[str, FusedTaskModules]]] = {}
        self.fusion_notes: Dict[str, str] = {}  # why tasks run unfused, by task group

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def forward_head(self, x: torch.Tensor, common: torch.Tensor, task: str) -> torch.Tensor:
        return self.tasks[task](x, common)

    def forward_stages(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """(the common feature, the trunk's earlier stages that InfoMax aligns, pooled)."""
        if not self.stage_proj:
            return self.forward_features(x), []
        return pooled_stages(self.trunk, x, len(self.stage_proj) + 1)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        common = self.forward_features(x)
        codes = self.task_codes(x, logvar=False)
        return {t: m.head(common + codes[t][0]) for t, m in self.tasks.items()}

    def task_codes(self, x: torch.Tensor, tasks: Optional[Sequence[str]] = None, logvar: bool = True) -> Dict[str, Code]:
        """Every task's code (mu, log-variance) for images `x`, task networks of one architecture fused."""
        codes: Dict[str, Code] = {}
        for entry in self._plan(tuple(self.tasks if tasks is None else tasks)):
            if isinstance(entry, FusedTaskModules):
                codes.update(entry.codes(x, logvar))
            else:
                codes[entry] = self.tasks[entry].code(x, logvar)
        return codes

    def describe_task_networks(self) -> str:
        """One line: which task networks run fused, and why any others run one by one."""
        plan = self._plan(tuple(self.tasks))
        arch = self.config.task_arch
        parts = [f"{len(e.tasks)} x {arch} ({', '.join(e.tasks)}) fused into one grouped network"
                 for e in plan if isinstance(e, FusedTaskModules)]
        alone = [e for e in plan if isinstance(e, str)]
        if alone:
            why = "fusion turned off" if not self.fuse_tasks else "; ".join(self.fusion_notes.values())
            parts.append(f"{', '.join(alone)} one by one" + (f" ({why})" if why else ""))
        return "task networks: " + "; ".join(parts)

    def _plan(self, tasks: tuple) -> List[Union[str, FusedTaskModules]]:
        """How `tasks` run: groups of equal architecture fused, the rest one by one (cached)."""
        key = (tasks, self.fuse_tasks, tuple(id(self.tasks[t]) for t in tasks))
        if key in self._plans:
            return self._plans[key]
        plan: List[Union[str, FusedTaskModules]] = []
        groups: List[List[str]] = []
        for task in tasks:
            module = self.tasks[task]
            home = next((g for g in groups if self.fuse_tasks and self.tasks[g[0]].fuses_with(module)), None)
            if home is None:
                groups.append([task])
            else:
                home.append(task)
        trunk = self.config.trunk
        for group in groups:
            network, why_not = fuse([self.tasks[t].tsn for t in group], (trunk.in_channels, trunk.image_size, trunk.image_size))
            if network is None:
                plan += group
                if len(group) > 1:
                    self.fusion_notes[", ".join(group)] = why_not
            else:
                plan.append(FusedTaskModules(group, [self.tasks[t] for t in group], network))
        self._plans[key] = plan
        return plan

    def _apply(self, fn, *args, **kwargs):
        # Fused networks were built for the modules' tensors where they were; .to() and
        # friends move those, so plans are made again where they now are.
        self._plans.clear()
        return super()._apply(fn, *args, **kwargs)

    def warm_start_from(self, teacher: nn.Module) -> bool:
        """Copy the teacher's backbone into the trunk and its heads into ours, if they fit.

        InfoMax pulls the trunk towards the teacher's features anyway; starting there saves
        most of the training budget. It applies when the teacher is ours with the trunk's
        architecture (same config); otherwise, e.g. a user's own teacher or another
        architecture, it returns False and changes nothing.
        """
        backbone = getattr(teacher, "backbone", None)
        heads = getattr(teacher, "heads", None)
        teacher_config = getattr(getattr(teacher, "config", None), "backbone", None)
        if not isinstance(backbone, nn.Module) or not isinstance(heads, nn.ModuleDict):
            return False
        if teacher_config != self.config.trunk or any(t not in heads for t in self.tasks):
            return False
        ours, theirs = self.trunk.state_dict(), backbone.state_dict()
        if {k: v.shape for k, v in ours.items()} != {k: v.shape for k, v in theirs.items()}:
            return False
        self.trunk.load_state_dict(theirs)
        for t, module in self.tasks.items():
            module.head.load_state_dict(heads[t].state_dict())
            module.aux_head.load_state_dict(heads[t].state_dict())
        return True


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def freeze(module: nn.Module) -> nn.Module:
    """Make `module` a fixed function for the rest of its life: no parameter of it requires a
    gradient and it stays in eval mode, whatever train() it or a module holding it is given,
    so BatchNorm's running statistics never move. Callers that hand a model back its mode
    (`model.train(was_training)` after an evaluation) need not know a part of it is frozen.
    The class and state-dict keys stay as they were: bundles fingerprint those weights."""
    module.requires_grad_(False)
    # nn.Module.train() reaches each child through the child's own train(), so an instance
    # attribute here holds for every holder; a partial (not a bound method) pickles and copies.
    module.train = partial(_stay_in_eval, module)
    return module.eval()


def _stay_in_eval(module: nn.Module, mode: bool = True) -> nn.Module:
    # A holder's requires_grad_(True) reaches these parameters directly, never through this
    # module; training loops call train() before they collect what to optimise, so undo it here.
    module.requires_grad_(False)
    return nn.Module.train(module, False)
