"""The training loop shared by the teacher and the factorization, nanoGPT-style.

One process, or many under torchrun (DistributedDataParallel: nccl on GPU, gloo on CPU).
Each step's batch is a pure function of (seed, rank, step), so `--resume` continues the
exact stream, the learning-rate schedule and the Adam moments where they stopped.

On a GPU nothing in a step waits for the host: batches come from a feed (kfdeploy.training.feed:
sprites rendered on the device, other data prefetched by a thread) and the losses are
summed on the device, read back once per log line rather than once per loss per step.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from .data import BatchSource
from .feed import open_feed
from .kernels import match_parameter_layouts, prepare_for_training
from .runs import METRICS_FILE, MODEL_FILE, load_checkpoint, save_checkpoint, save_tensors_atomic


@dataclass
class TrainConfig:
    steps: int = 3000
    batch_size: int = 128  # per process
    lr: float = 2e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.02
    weight_decay: float = 0.0
    eval_every: int = 250
    eval_images: int = 2048  # held-out images scored at each evaluation (the curves in metrics.jsonl)
    checkpoint_every: int = 200
    log_every: int = 25
    seed: int = 0
    time_budget_s: Optional[float] = None  # stop early (and still finish cleanly) past this
    # How the steps run, not what they compute (a resumed run takes the ones asked now):
    feed: str = "auto"  # how batches reach the device: kfdeploy.training.feed (auto, inline, prefetch, device)
    compile: Optional[str] = None  # a torch.compile mode for the step ("reduce-overhead": CUDA graphs too), None: eager
    # Task networks of one architecture run as one grouped network (kfdeploy.training.fusion):
    # the same numbers in fewer, larger kernels. False runs them one by one, as a check.
    fuse_tasks: bool = True
    # Where factorization's teacher outputs come from (kfdeploy.training.teacher_targets): "once"
    # per training image before the steps, or "every-step"; "auto": once for image folders.
    teacher_targets: str = "auto"

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay: a function of the step alone, so resumable."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps))
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine)


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: Optional[str] = None) -> Distributed:
    """Join the torchrun job if there is one; pick CUDA when present unless told otherwise."""
    use_cuda = torch.cuda.is_available() if device in (None, "auto") else device.startswith("cuda")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        rank = dist.get_rank()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    else:
        rank, local_rank = 0, 0
    if use_cuda:
        torch.cuda.set_device(local_rank)
        return Distributed(rank, world_size, torch.device("cuda", local_rank))
    return Distributed(rank, world_size, torch.device("cpu"))


def weights_digest(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


@torch.no_grad()
def accuracy(
    model: nn.Module, images: torch.Tensor, labels: Dict[str, torch.Tensor],
    predict: Optional[Callable[[torch.Tensor], Dict[str, torch.Tensor]]] = None, batch_size: int = 1024,
) -> Dict[str, float]:
    """Per-task top-1 accuracy; `predict` (default: the model's forward) gives {task: logits}."""
    predict = predict or model
    was_training = model.training
    model.eval()
    correct = {t: 0 for t in labels}
    device = next(model.parameters()).device
    for start in range(0, len(images), batch_size):
        logits = predict(images[start : start + batch_size].to(device))
        for t in labels:
            correct[t] += (logits[t].argmax(1).cpu() == labels[t][start : start + batch_size]).sum().item()
    model.train(was_training)
    return {t: c / len(images) for t, c in correct.items()}


class MetricsLog:
    """Appends JSON lines to the run's metrics.jsonl (main process only)."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """The optimizer of every training here. One fused kernel updates every parameter instead of
    a kernel per tensor and operation: on CUDA fewer launches; on 2 CPU cores the paper's
    factorization step (~900 parameter tensors, 22M values) spent 0.18 s a step in the default's
    per-tensor loop against 0.04 s fused."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def train(
    run_dir: Path,
    objective: nn.Module,
    source: BatchSource,
    config: TrainConfig,
    evaluate: Callable[[nn.Module], Dict[str, float]],
    env: Distributed,
    resume: bool = False,
    desc: str = "train",
    setup_s: float = 0.0,
) -> dict:
    """Optimise `objective.model` and write run_dir/model.safetensors; returns the final state.

    `setup_s`: seconds already spent preparing this training (precomputed teacher targets),
    counted in its time and its time budget."""
    run_dir = Path(run_dir)
    model: nn.Module = objective.model
    objective.to(env.device).train()
    channels_last = prepare_for_training(objective, env.device)
    params = [p for p in model.parameters() if p.requires_grad]
    cuda = env.device.type == "cuda"
    optimizer = adamw(params, lr=config.lr, weight_decay=config.weight_decay)
    if cuda:
        torch.backends.cudnn.benchmark = True  # every step has the same shapes: pick the fastest kernels once
    state = {"step": 0, "train_time_s": 0.0}
    if resume:
        restored = load_checkpoint(run_dir, model, optimizer)
        if restored is not None:
            state = restored
            match_parameter_layouts(optimizer)
            if env.is_main:
                print(f"resuming {run_dir} at step {state['step']}")
    wrapped = objective
    if env.world_size > 1:
        wrapped = nn.parallel.DistributedDataParallel(
            objective, device_ids=[env.device.index] if env.device.type == "cuda" else None,
        )
    if config.compile is not None:
        if config.compile not in COMPILE_MODES:
            raise ValueError(f"compile mode must be one of {COMPILE_MODES}, not {config.compile!r}")
        wrapped = torch.compile(wrapped, mode=config.compile)
    cuda_graphs = config.compile == "reduce-overhead" and cuda
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    log = MetricsLog(run_dir, env.is_main)
    progress = tqdm(
        total=config.steps, initial=state["step"], desc=desc, disable=not env.is_main,
        dynamic_ncols=True, mininterval=1.0,
    )
    started = time.perf_counter() - state["train_time_s"] - setup_s
    # Losses summed over the log interval on the device, in float64: the same sums as adding
    # each step's .item() on the host, without making the host wait for every step.
    running: Optional[torch.Tensor] = None
    names: list = []
    batches = open_feed(config.feed, source, env.device, config.batch_size, env.rank, start=state["step"], stop=config.steps)

    def elapsed() -> float:
        return time.perf_counter() - started

    def checkpoint() -> None:
        state["train_time_s"] = elapsed()
        if env.is_main:
            save_checkpoint(run_dir, model, optimizer, state)

    if setup_s:
        # To 0.1 ms, both alike: a small folder's targets take milliseconds, which 2 decimals would write as 0.0
        log.write({"step": state["step"], "time_s": round(elapsed(), 4), "event": "set up", "setup_s": round(setup_s, 4)})

    try:
        while state["step"] < config.steps:
            step = state["step"]
            if config.time_budget_s is not None and elapsed() > config.time_budget_s:
                if env.is_main:
                    print(f"time budget of {config.time_budget_s:.0f}s reached at step {step}")
                break
            for group in optimizer.param_groups:
                group["lr"] = config.lr_at(step)
            images, labels = batches.batch(step)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            if cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are done with
            with autocast:
                loss, parts = wrapped(images, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            state["step"] = step + 1
            values = torch.stack([loss.detach(), *(v.detach() for v in parts.values())]).double()
            if running is None:
                names, running = ["loss", *parts], torch.zeros_like(values)
            running += values
            progress.update(1)
            if state["step"] % config.log_every == 0:
                means = {k: v / config.log_every for k, v in zip(names, running.tolist())}
                running.zero_()
                progress.set_postfix(loss=f"{means['loss']:.3f}", refresh=False)
                log.write({"step": state["step"], "time_s": round(elapsed(), 2), "lr": config.lr_at(step), **means})
            if state["step"] % config.eval_every == 0 and state["step"] < config.steps:
                if env.is_main:
                    log.write({"step": state["step"], "time_s": round(elapsed(), 2), "heldout_accuracy": evaluate(model)})
            if state["step"] % config.checkpoint_every == 0:
                checkpoint()
    except KeyboardInterrupt:
        checkpoint()
        progress.close()
        raise
    finally:
        batches.close()
    progress.close()
    if env.world_size > 1:
        # Gradients are all-reduced, so parameters agree; BatchNorm running statistics are
        # per rank since the last forward. Take rank 0's, as DDP does at every forward.
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
    checkpoint()
    digests = [weights_digest(model)]
    if env.world_size > 1:
        gathered = [None] * env.world_size
        dist.all_gather_object(gathered, digests[0])
        digests = gathered
    if env.is_main:
        final = {"step": state["step"], "time_s": round(elapsed(), 2), "event": "finished", "rank_weight_digests": digests}
        final["heldout_accuracy"] = evaluate(model)
        log.write(final)
        save_tensors_atomic(run_dir / MODEL_FILE, model.state_dict())
    return {**state, "rank_weight_digests": digests}

