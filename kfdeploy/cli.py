"""`kfdeploy` command line: one command, a subcommand per job."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional

from .errors import KfError
from .extras import check
from .names import quote
from .serving import REPOSITORY_QUEUE_DELAY_US, SERVE_DRAIN_TIMEOUT_S, SERVE_QUEUE_DELAY_US
from .training.data import NEW_TASK_STEPS, NEW_TASKS

EXAMPLES = {
    "teacher": "kfdeploy teacher --out runs/teacher\n  kfdeploy teacher --out runs/teacher --tasks shape,scale --steps 2000\n  kfdeploy teacher --out runs/r50 --arch resnet50 --pretrained resnet50.safetensors --image-size 128\n  kfdeploy teacher --out runs/rgb --data sprites-rgb --arch resnet34\n  kfdeploy teacher --out runs/photos --data photos/ --arch resnet18 --image-size 96   # photos/labels.csv",
    "factorize": "kfdeploy factorize --teacher runs/teacher --out runs/kf\n  kfdeploy factorize --teacher runs/teacher --out runs/kf2 --tasks shape,scale --task-width 8\n  kfdeploy factorize --teacher runs/r50 --out runs/kf-r18 --trunk-arch resnet18 --task-arch mobilenetv2_050\n  kfdeploy factorize --teacher-factory my_pkg.models:build --teacher-weights teacher.safetensors --data photos/ --out runs/kf-mine\n  torchrun --nproc_per_node 2 -m kfdeploy factorize --teacher runs/teacher --out runs/kf",
    "evaluate": "kfdeploy evaluate runs/kf\n  kfdeploy evaluate runs/kf --images 20000 --json report.json\n  kfdeploy evaluate runs/kf-mine --teacher-factory my_pkg.models:build --teacher-weights teacher.safetensors",
    "quickstart": "kfdeploy quickstart\n  kfdeploy quickstart --out runs/qs --resume",
    "export": "kfdeploy export runs/kf --out bundles/sprites\n  kfdeploy export runs/kf --out bundles/sprites --profile jetson-fp16 --archive\n  kfdeploy export runs/kf --out bundles/sprites --tasks pos_x --into",
    "add-task": "kfdeploy add-task bundles/sprites --name quadrant --data sprites\n  kfdeploy add-task bundles/sprites --name ring --data sprites --labels 1000 --steps 600\n  kfdeploy add-task bundles/photos --name weather --data more-photos/   # more-photos/labels.csv has a 'weather' column\n  kfdeploy add-task bundles/sprites --name shape --data sprites --replace",
    "transferability": "kfdeploy transferability bundles/sprites --data sprites\n  kfdeploy transferability bundles/photos --data more-photos/ --images 300 --json scores.json",
    "inspect": "kfdeploy inspect bundles/sprites\n  kfdeploy inspect bundles/sprites.tar.gz --json",
    "verify": "kfdeploy verify bundles/sprites\n  kfdeploy verify bundles/sprites.tar.gz",
    "build-engines": "kfdeploy build-engines bundles/sprites --precision fp16\n  kfdeploy build-engines bundles/sprites --with torch-tensorrt",
    "check-trt": "kfdeploy check-trt bundles/sprites",
    "quantize": "kfdeploy quantize bundles/sprites --int8\n  kfdeploy quantize bundles/sprites --int8 --method entropy --images 1024\n  kfdeploy quantize bundles/photos --int8 --calibration photos/unlabelled/\n  kfdeploy quantize bundles/sprites --int8 --tasks pos_x   # a task added later\n  kfdeploy quantize bundles/sprites --fp16",
    "demo": "kfdeploy demo runs/quickstart/bundle\n  kfdeploy demo bundles/sprites --host 0.0.0.0 --port 8080",
    "run": "kfdeploy run bundles/sprites --tasks shape,scale images/*.png\n  kfdeploy run bundles/sprites batch.npy --json --top 3",
    "triton-repo": "kfdeploy triton-repo bundles/sprites --out repo\n  kfdeploy triton-repo bundles/sprites --out repo --ensemble shape,scale --ensemble pos=pos_x,pos_y\n  kfdeploy triton-repo bundles/sprites --out repo --backend tensorrt --engine-device orin-sm87-trt10.3",
    "serve": "kfdeploy serve bundles/sprites\n  kfdeploy serve bundles/sprites --tasks shape,scale --port 8000 --grpc-port 8001\n  kfdeploy serve bundles/sprites --host 0.0.0.0 --max-queue-delay-us 2000 --model-name sprites",
}

# Sized so teacher + factorization + evaluation take about 15 minutes on 2 CPU cores.
QUICKSTART_TEACHER_STEPS = 5000
QUICKSTART_FACTORIZE_STEPS = 2000
# The most values a .npy batch given to `kfdeploy run` may hold: 512 MiB as float32, some 2,700
# RGB images at 224x224. Its header says how many it holds, and is believed only up to this.
MAX_NPY_VALUES = 1 << 27


def _add_training_args(p: argparse.ArgumentParser, steps: int) -> None:
    p.add_argument("--out", type=Path, required=True, help="run folder to create (or continue with --resume)")
    p.add_argument("--tasks", help="comma-separated subset of tasks (default: all)")
    _add_step_args(p, steps, "continue the run in --out from its last checkpoint")


def _add_step_args(p: argparse.ArgumentParser, steps: int, resume_help: str) -> None:
    p.add_argument("--steps", type=int, default=steps, help=f"optimisation steps (default {steps})")
    p.add_argument("--batch-size", type=int, default=128, help="images per step per process (default 128)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate, AdamW with cosine decay (default 2e-3)")
    p.add_argument("--minutes", type=float, help="stop early after this much training time")
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between resumable checkpoints (default 200)")
    p.add_argument("--eval-images", type=int, default=2048, metavar="N", help="held-out images scored every 250 steps and at the "
                   "end, the curves in metrics.jsonl (default 2048; fewer for a large network on a CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--feed", default="auto", choices=["auto", "inline", "prefetch", "device"],
                   help="how batches reach the device: device (sprites rendered on the GPU), prefetch (a background thread "
                   "loads the next batches), inline (made in the step); auto: device for sprites on CUDA, prefetch for "
                   "other data on CUDA, inline on a CPU. Every feed gives the same batches")
    p.add_argument("--compile", nargs="?", const="default", choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch.compile the training step (mode default; reduce-overhead adds CUDA graphs on a GPU)")
    p.add_argument("--resume", action="store_true", help=resume_help)


def _add_data_args(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--data", metavar="PATH", help=f"sprites, sprites-rgb (colour sprites, 3x128x128, plus a colour task) or a folder of "
                   f"images with labels.csv: a 'file' column and a column of class names per task, optional 'split' (default: {default})")
    p.add_argument("--image-size", type=int, metavar="N", help="input size N x N, images resized to it (default: the data's; 64 for sprites "
                   "and folders, 128 for sprites-rgb)")
    p.add_argument("--channels", type=int, choices=[1, 3], help="a folder's images as grey (1) or RGB (3) (default: RGB if any image is colour)")


def _train_config(args):
    from .training.train import TrainConfig

    if args.eval_images < 1:
        raise KfError(f"--eval-images {args.eval_images}: score at least 1 held-out image")
    return TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        checkpoint_every=args.checkpoint_every, eval_images=args.eval_images,
        time_budget_s=args.minutes * 60 if args.minutes else None,
        feed=args.feed, compile=args.compile, fuse_tasks=not getattr(args, "no_fuse_tasks", False),
        teacher_targets=getattr(args, "teacher_targets", "auto"),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kfdeploy",
        description="Knowledge Factorization: split a multi-task teacher into a shared trunk and per-task modules.",
        epilog="Start with `kfdeploy quickstart`.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, help=help_text, description=help_text,
            epilog="examples:\n  " + EXAMPLES[name], formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    p = command("teacher", "Train a multi-task teacher: on the embedded procedural sprites, or on your labelled image folder.")
    _add_training_args(p, QUICKSTART_TEACHER_STEPS)
    _add_data_args(p, "sprites")
    p.add_argument("--arch", default="simpleconv", help="architecture: simpleconv (default) or a timm model name, built without weights")
    p.add_argument("--pretrained", type=Path, metavar="FILE", help="local weights for the architecture: .safetensors or a torch/timm checkpoint (nothing is downloaded)")

    p = command("factorize", "Factorize a teacher into a common trunk plus one module per task.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--teacher", type=Path, help="teacher run folder (from `kfdeploy teacher`)")
    which.add_argument("--teacher-factory", metavar="MODULE:FUNCTION", help="your own teacher: FUNCTION() in MODULE (importable from here) returns "
                       "an nn.Module with forward_features and forward_head; needs --data")
    p.add_argument("--teacher-weights", type=Path, metavar="FILE", help="weights for the --teacher-factory module: .safetensors or a weights-only torch checkpoint")
    _add_training_args(p, QUICKSTART_FACTORIZE_STEPS)
    _add_data_args(p, "the teacher run's")
    p.add_argument("--trunk-arch", metavar="NAME", help="trunk architecture (default: the teacher's, warm-started from it): simpleconv or a timm model name")
    p.add_argument("--task-arch", default="simpleconv", metavar="NAME", help="task network architecture: simpleconv (default) or a timm model name, e.g. mobilenetv2_050")
    p.add_argument("--pretrained", type=Path, metavar="FILE", help="local weights for the trunk (.safetensors or a torch/timm checkpoint); the trunk starts from them instead of the teacher")
    p.add_argument("--task-width", type=int, default=16, help="channels of each simpleconv task network (trunk: 32)")
    p.add_argument("--beta", type=float, default=1e-3, help="InfoMin weight on each task code's KL")
    p.add_argument("--lambda-kd", type=float, default=0.1, help="soft-target distillation weight")
    p.add_argument("--lambda-feat", type=float, default=1.0, help="InfoMax weight")
    p.add_argument("--infomax-stages", type=int, default=1, metavar="N", help="align the trunk with the teacher at its last N "
                   "stages (InfoMax on each, pooled; the reference aligns 3), not only its pooled feature; needs timm "
                   "architectures for both (default 1)")
    p.add_argument("--no-fuse-tasks", action="store_true", help="run the task networks one by one instead of as one grouped "
                   "network per architecture (the same numbers, slower; for comparison)")
    p.add_argument("--teacher-targets", default="auto", choices=["auto", "once", "every-step"],
                   help="run the frozen teacher once on every training image before the steps (once), or in every step; "
                   "auto (default): once for an image folder (fixed images, no augmentation) if its outputs fit in 2 GiB")

    p = command("evaluate", "Score factor networks against the teacher; disentanglement heatmap.")
    p.add_argument("run", type=Path, help="factorized run folder")
    p.add_argument("--images", type=int, default=8192, help="held-out images (default 8192)")
    p.add_argument("--json", type=Path, help="also write the result here (always written to RUN/evaluation.json)")
    p.add_argument("--teacher-factory", metavar="MODULE:FUNCTION", help="the teacher of a run factorized with --teacher-factory (never read from the run)")
    p.add_argument("--teacher-weights", type=Path, metavar="FILE", help="its weights, as given to factorize")

    p = command("export", "Export a factorized run's trunk and task modules to ONNX, into a bundle.")
    p.add_argument("run", type=Path, help="factorized run folder")
    p.add_argument("--out", type=Path, required=True, help="bundle folder to write (an existing bundle is replaced atomically)")
    p.add_argument("--tasks", help="comma-separated subset of tasks (default: all)")
    p.add_argument("--profile", help="export profile: a name from export/ or a .toml path (default cpu-fp32; with --into the bundle's own)")
    p.add_argument("--into", action="store_true", help="add the tasks to the existing bundle at --out, keeping its trunk")
    p.add_argument("--archive", action="store_true", help="also write OUT.tar.gz for shipping")

    p = command("add-task", "Train a new task module against a bundle's frozen trunk and add it to the bundle in place.")
    p.add_argument("bundle", type=Path, help="bundle folder (changed in place, atomically)")
    p.add_argument("--name", required=True, help="the new task's name in the bundle; for a folder, its column in labels.csv")
    p.add_argument("--data", required=True, metavar="SOURCE", help=f"a folder of images with labels.csv, or sprites / sprites-rgb "
                   f"for an embedded new task ({', '.join(NEW_TASKS)})")
    p.add_argument("--labels", type=int, metavar="N", help="train on N labelled images only (default: all the data has)")
    p.add_argument("--replace", action="store_true", help="retrain a task the bundle already has")
    p.add_argument("--run", type=Path, metavar="DIR", help="keep the training run in DIR (default: a work folder beside the bundle, removed at the end)")
    _add_step_args(p, NEW_TASK_STEPS, "continue the run kept in --run from its last checkpoint")

    p = command("transferability", "Score how well a bundle's trunk will serve new tasks, before any training.")
    p.add_argument("bundle", type=Path, help="bundle folder or .tar.gz")
    p.add_argument("--data", required=True, metavar="SOURCE", help="a folder of images with labels.csv, or sprites / sprites-rgb (its new tasks)")
    p.add_argument("--tasks", help="comma-separated tasks of SOURCE (default: all)")
    p.add_argument("--images", type=int, default=500, help="labelled images to score on (default 500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the scores as JSON")

    p = command("inspect", "Summarise a bundle: tasks, classes, input, files, checksums, parity, engines.")
    p.add_argument("bundle", type=Path, help="bundle folder or .tar.gz")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")

    p = command("verify", "Check a bundle: checksums, onnx.checker, ONNX Runtime vs PyTorch on fresh inputs.")
    p.add_argument("bundle", type=Path, help="bundle folder or .tar.gz")

    p = command("build-engines", "Build TensorRT engines for every module, on this (edge) device.")
    p.add_argument("bundle", type=Path, help="bundle folder")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp16")
    p.add_argument("--with", dest="builders", action="append", choices=["tensorrt", "torch-tensorrt"],
                   help="builder(s) to use (default tensorrt; repeat for both)")

    p = command("quantize", "Add INT8 or FP16 variants of every module to a bundle, judged on held-out images.")
    p.add_argument("bundle", type=Path, help="bundle folder (changed atomically)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--int8", dest="precision", action="store_const", const="int8",
                       help="static INT8 (ONNX Runtime, QDQ, per-channel s8 weights, u8 activations): CPUs with VNNI, TensorRT")
    which.add_argument("--fp16", dest="precision", action="store_const", const="fp16",
                       help="fp16 graphs with fp32 inputs and outputs, for GPU providers")
    p.add_argument("--tasks", help="comma-separated tasks (default: all; the trunk's variant is kept when it has one)")
    p.add_argument("--calibration", type=Path, metavar="FOLDER", help="images to calibrate INT8 on (default: the run's training stream)")
    p.add_argument("--images", type=int, default=512, help="calibration images (default 512)")
    p.add_argument("--method", choices=["minmax", "entropy", "percentile"], default="minmax", help="calibration method (default minmax)")
    p.add_argument("--seed", type=int, default=0, help="which calibration images (default 0)")
    p.add_argument("--max-drop", type=float, default=1.0, metavar="POINTS",
                   help="held-out accuracy a task may lose, in points (default 1.0)")
    p.add_argument("--allow-mixed", action="store_true", help="keep a task that loses more at fp32 instead of failing")

    p = command("check-trt", "Statically check every graph against what TensorRT's ONNX parser accepts.")
    p.add_argument("bundle", type=Path, help="bundle folder or .tar.gz")

    p = command("run", "Answer images with an assembly of the bundle's trunk and the chosen tasks.")
    p.add_argument("bundle", type=Path, help="bundle folder or .tar.gz")
    p.add_argument("inputs", type=Path, nargs="+", help="image files (PNG, JPEG, ...; resized and converted to the bundle's "
                   "size and channels), or one .npy batch (N, C, H, W) taken as it is")
    p.add_argument("--tasks", help="comma-separated tasks (default: all in the bundle)")
    p.add_argument("--backend", choices=["onnxruntime", "tensorrt", "torch"], default="onnxruntime")
    p.add_argument("--precision", choices=["fp32", "int8", "fp16"], default="fp32",
                   help="module graphs to compose (default fp32; int8/fp16 once `kfdeploy quantize` made them)")
    p.add_argument("--top", type=int, default=1, help="classes to show per task (default 1)")
    p.add_argument("--json", action="store_true", help="print JSON for machines")

    p = command("demo", "Start the Gradio demo: tick tasks, watch the assembled model answer.")
    p.add_argument("bundle", type=Path, nargs="?", default=Path("runs/quickstart/bundle"), help="bundle folder (default runs/quickstart/bundle)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link")

    p = command("triton-repo", "Write a Triton Inference Server model repository: a model per module, an ensemble per task set.")
    p.add_argument("bundle", type=Path, help="bundle folder or .tar.gz")
    p.add_argument("--out", type=Path, required=True, help="repository folder (created; model folders already there are replaced, others kept)")
    p.add_argument("--tasks", help="comma-separated task modules to include (default: all)")
    p.add_argument("--ensemble", action="append", default=[], metavar="[NAME=]TASK,TASK",
                   help="an ensemble for this task set (repeat for more; default: one ensemble, --model-name, of all --tasks)")
    p.add_argument("--backend", choices=["onnxruntime", "tensorrt", "python"], default="onnxruntime",
                   help="onnxruntime_onnx models (default), tensorrt_plan from the bundle's engines, or Python-backend models running ONNX Runtime")
    p.add_argument("--model-name", default="kfdeploy", help="name of the all-task ensemble and prefix of the other models (default kfdeploy)")
    p.add_argument("--kind", choices=["cpu", "gpu"], help="instance_group kind (default cpu; gpu for --backend tensorrt)")
    p.add_argument("--instances", type=int, default=1, help="instances of each module (default 1)")
    p.add_argument("--max-queue-delay-us", type=int, default=REPOSITORY_QUEUE_DELAY_US,
                   help=f"dynamic batching queue delay of each module (default {REPOSITORY_QUEUE_DELAY_US})")
    p.add_argument("--engine-device", metavar="SIGNATURE", help="with --backend tensorrt: the device whose engines to use, e.g. orin-sm87-trt10.3 (default: this machine's)")

    p = command("serve", "Serve a bundle on Triton Inference Server (nvidia-pytriton's build); each request names its tasks.")
    p.add_argument("bundle", type=Path, help="bundle folder or .tar.gz")
    p.add_argument("--tasks", help="comma-separated tasks to serve at start (default: all; add or remove later on the control endpoint)")
    p.add_argument("--host", default="127.0.0.1", help="address for HTTP, gRPC and metrics (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=int, help="gRPC port (default: --port + 1)")
    p.add_argument("--metrics-port", type=int, help="Prometheus metrics port (default: --port + 2)")
    p.add_argument("--control-port", type=int, help="control endpoint port: add/remove tasks, stats (default: --port + 3)")
    p.add_argument("--control-host", default="127.0.0.1", help="control endpoint address (default 127.0.0.1, whatever --host is)")
    p.add_argument("--model-name", default="kfdeploy", help="the served model's name (default kfdeploy)")
    p.add_argument("--max-batch-size", type=int, help="largest batch Triton forms or accepts (default: the bundle's batch maximum)")
    p.add_argument("--max-queue-delay-us", type=int, default=SERVE_QUEUE_DELAY_US,
                   help=f"how long a request may wait for others to batch with (default {SERVE_QUEUE_DELAY_US}: batches form from what queues while a batch runs)")
    p.add_argument("--no-dynamic-batching", action="store_true", help="run each request as it comes")
    p.add_argument("--drain-timeout", type=int, default=SERVE_DRAIN_TIMEOUT_S, metavar="SECONDS",
                   help=f"on SIGTERM, how long in-flight requests may take (default {SERVE_DRAIN_TIMEOUT_S})")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads (default: the cores this process may use)")
    p.add_argument("--triton-log", type=Path, metavar="FILE", help="where Triton writes its log (default: a temporary folder, printed at start)")

    p = command("quickstart", "Teacher, factorization, evaluation and export on the embedded default, in one go.")
    p.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="folder for all runs (default runs/quickstart)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted quickstart")
    p.add_argument("--teacher-steps", type=int, default=QUICKSTART_TEACHER_STEPS, metavar="N",
                   help=f"teacher training steps (default {QUICKSTART_TEACHER_STEPS}; fewer for a quick look, at lower accuracy)")
    p.add_argument("--factorize-steps", type=int, default=QUICKSTART_FACTORIZE_STEPS, metavar="N",
                   help=f"factorization steps (default {QUICKSTART_FACTORIZE_STEPS})")
    p.add_argument("--images", type=int, default=8192, help="held-out images to evaluate on (default 8192)")
    return parser


def _task_list(text: Optional[str]) -> Optional[List[str]]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def cmd_teacher(args) -> None:
    from .training.models import BackboneConfig
    from .training.pipeline import SPRITES, default_image_size, train_teacher

    data = args.data or SPRITES
    backbone = BackboneConfig(image_size=args.image_size or default_image_size(data), arch=args.arch)
    out = train_teacher(
        args.out, _task_list(args.tasks), _train_config(args), backbone=backbone, resume=args.resume, device=args.device,
        pretrained=args.pretrained, data=data, channels=args.channels,
    )
    print(f"teacher written to {out}")


def cmd_factorize(args) -> None:
    from .training.losses import LossWeights
    from .training.pipeline import factorize, teacher_from_factory

    teacher, teacher_source = args.teacher, None
    if args.teacher_factory:
        if args.data is None:
            raise KfError("--teacher-factory needs --data: an image folder with labels.csv, sprites or sprites-rgb")
        teacher, teacher_source = teacher_from_factory(args.teacher_factory, args.teacher_weights)
    elif args.teacher_weights:
        raise KfError("--teacher-weights goes with --teacher-factory; a teacher run holds its own weights")
    weights = LossWeights(kd=args.lambda_kd, feat=args.lambda_feat, kl=args.beta)
    out = factorize(
        teacher, args.out, tasks=_task_list(args.tasks), config=_train_config(args), weights=weights,
        task_width=args.task_width, resume=args.resume, device=args.device,
        trunk_arch=args.trunk_arch, task_arch=args.task_arch, pretrained=args.pretrained,
        data=args.data, image_size=args.image_size, channels=args.channels, teacher_source=teacher_source,
        infomax_stages=args.infomax_stages,
    )
    print(f"factor networks written to {out}")


def run_evaluation(run: Path, images: int = 8192, teacher=None) -> dict:
    from .training.evaluate import DISENTANGLEMENT_PNG, EVALUATION_FILE, evaluate_run, format_table

    result = evaluate_run(run, teacher=teacher, images=images)
    print(format_table(result))
    print(f"wrote {run / EVALUATION_FILE} and {run / DISENTANGLEMENT_PNG}")
    return result


def cmd_evaluate(args) -> None:
    teacher = None
    if args.teacher_factory:
        from .training.pipeline import teacher_from_factory

        teacher, _ = teacher_from_factory(args.teacher_factory, args.teacher_weights)
    elif args.teacher_weights:
        raise KfError("--teacher-weights goes with --teacher-factory")
    result = run_evaluation(args.run, args.images, teacher)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def cmd_export(args) -> None:
    from .bundling.export import export_bundle, load_profile

    started = time.perf_counter()
    tasks = args.tasks.split(",") if args.tasks else None
    out = export_bundle(args.run, args.out, tasks=tasks, profile=load_profile(args.profile) if args.profile else None, into=args.into, archive=args.archive)
    archive = f" and {out.name}.tar.gz" if args.archive else ""
    print(f"bundle written to {out}{archive} in {time.perf_counter() - started:.1f} s")


def cmd_add_task(args) -> int:
    from .bundling.add_task import add_task

    started = time.perf_counter()
    try:
        record = add_task(args.bundle, args.name, args.data, labels=args.labels, config=_train_config(args),
                          replace_existing=args.replace, run=args.run, resume=args.resume, device=args.device)
    except KeyboardInterrupt:
        kept = f"continue with --run {args.run} --resume" if args.run else "keep the training with --run DIR to be able to --resume"
        print(f"\nkfdeploy: interrupted; the bundle is as it was ({kept})", file=sys.stderr)
        return 130
    accuracy = record["heldout_accuracy"]
    measured = f", held-out accuracy {accuracy:.4f} (ONNX Runtime)" if accuracy is not None else ""
    print(f"task {args.name!r} added to {args.bundle}: {record['classes']} classes, {_human_bytes(record['bytes'])}{measured}, "
          f"in {time.perf_counter() - started:.1f} s; running apps take it with add_task({args.name!r})")
    return 0


def cmd_transferability(args) -> None:
    from .bundling.transferability import format_report, score

    result = score(args.bundle, args.data, tasks=_task_list(args.tasks), images=args.images, seed=args.seed)
    print(format_report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def _human_bytes(count: int) -> str:
    return f"{count / 1e6:.2f} MB" if count >= 1e5 else f"{count / 1e3:.1f} kB"


def cmd_inspect(args) -> None:
    from .bundling.bundle import Bundle

    bundle = Bundle.open(args.bundle)
    m = bundle.manifest
    if args.json:
        print(json.dumps(m, indent=2))
        return
    producer = ", ".join(f"{k} {v}" for k, v in m["producer"].items())
    spec = m["input"]
    trunk = m["trunk"]
    print(f"bundle {args.bundle} ({m['format']} v{m['format_version']}, created {m.get('created', '?')})")
    print(f"producer: {producer}; profile {m.get('profile', {}).get('name', '?')}")
    print(f"input: {spec['name']} {spec['dtype']} {spec['shape']} {spec['layout']}, values in {spec['range']} (uint8: {spec['uint8']}), batch {spec['batch']['min']}..{spec['batch']['max']}")
    mean, std = bundle.normalization()
    print(f"normalization (inside the graphs): mean {[round(v, 4) for v in mean]}, std {[round(v, 4) for v in std]}; "
          f"pixels taken: {', '.join(bundle.pixel_types())}")
    print(f"examples: {len(bundle.examples) or 'none'}" + (f" ({', '.join(e['file'] for e in bundle.examples)})" if bundle.examples else ""))
    print(f"checksums: all {sum(1 for _ in bundle.entries())} files verified (sha256)")
    print(f"trunk: {trunk['file']} {_human_bytes(trunk['bytes'])} -> {trunk['output']['name']} ({trunk['output']['width']}), "
          f"fingerprint {trunk['fingerprint'][:12]}, max abs err {trunk['parity']['max_abs_err']:.1e}, sha256 {trunk['sha256'][:12]}")
    print(f"{'task':<12} {'classes':>7} {'size':>9} {'accuracy':>8} {'max abs err':>11} {'argmax':>7}  sha256        labels")
    for name, task in m["tasks"].items():
        accuracy = "-" if task["heldout_accuracy"] is None else f"{task['heldout_accuracy']:.4f}"
        labels = ", ".join(task["labels"][:4]) + (", ..." if len(task["labels"]) > 4 else "")
        print(f"{name:<12} {task['classes']:>7} {_human_bytes(task['bytes']):>9} {accuracy:>8} {task['parity']['max_abs_err']:>11.1e} "
              f"{task['parity']['argmax_agreement']:>7.4f}  {task['sha256'][:12]}  {labels}")
    print(f"precisions: {', '.join(bundle.precisions())}")
    for name, record in bundle.modules().items():
        for precision, v in record.get("variants", {}).items():
            how = v.get("method") or {}
            made = f"{how.get('calibration')} on {how.get('images')} images" if precision == "int8" and how else ""
            judged = "" if v.get("agreement") is None else (
                f", accuracy {'-' if v.get('heldout_accuracy') is None else format(v['heldout_accuracy'], '.4f')}"
                f" (fp32 {'-' if v.get('fp32_heldout_accuracy') is None else format(v['fp32_heldout_accuracy'], '.4f')}),"
                f" agreement {v['agreement']:.4f}")
            fallback = ", fp32 fallback (--allow-mixed)" if v.get("fallback") else ""
            print(f"  {name:<12} {precision} {_human_bytes(v['bytes']):>9} {v['file']}{fallback}"
                  f"{' ' + made if made else ''}{judged}")
    engines = m.get("engines", [])
    print(f"engines: {len(engines) or 'none (build them on the target with `kfdeploy build-engines`)'}")
    for engine in engines:
        device = engine["device"]
        print(f"  {engine['module']:<12} {engine['builder']} {engine['precision']} for {device.get('gpu')} (sm {device.get('compute_capability')}, TensorRT {device.get('tensorrt')}) {engine['file']}")


def cmd_verify(args) -> None:
    from .bundling.export import verify_bundle

    started = time.perf_counter()
    verify_bundle(args.bundle)
    print(f"bundle {args.bundle} verified in {time.perf_counter() - started:.1f} s")


def cmd_build_engines(args) -> None:
    from .bundling.export import build_engines

    records = build_engines(args.bundle, args.precision, args.builders or ["tensorrt"])
    print(f"{len(records)} engines recorded in {args.bundle / 'manifest.json'}")


def cmd_quantize(args) -> None:
    from .bundling.quantize import quantize_bundle

    started = time.perf_counter()
    records = quantize_bundle(args.bundle, args.precision, tasks=_task_list(args.tasks), calibration=args.calibration,
                              images=args.images, method=args.method, seed=args.seed, max_drop=args.max_drop / 100,
                              allow_mixed=args.allow_mixed)
    size = sum(r["bytes"] for r in records.values())
    print(f"{args.precision}: {len(records)} module(s) recorded in {args.bundle / 'manifest.json'} "
          f"({_human_bytes(size)}) in {time.perf_counter() - started:.1f} s")


def cmd_check_trt(args) -> int:
    from .bundling.bundle import Bundle
    from .bundling.trt_check import check_model

    bundle = Bundle.open(args.bundle)
    offenders = 0
    for module, record in bundle.modules().items():
        issues = check_model(bundle.graph(module))  # the checked bytes, never external data
        offenders += len(issues)
        print(f"{record['file']}: {'ok' if not issues else f'{len(issues)} problem(s)'}")
        for issue in issues:
            print(f"  {issue.where}: {issue.problem}")
    if offenders:
        print(f"{offenders} problem(s): TensorRT's ONNX parser would refuse these graphs")
        return 1
    print("every graph is within what TensorRT's ONNX parser accepts")
    return 0


def read_images(paths: List[Path]):
    """One .npy batch as a numpy array (taken as it is), or image files decoded (uint8, grey
    (H, W) or RGB (H, W, 3), any size) as a list for fit_images."""
    from .images import read_image

    batches = [path for path in paths if path.suffix == ".npy"]
    if batches and len(paths) > 1:
        raise KfError(f"{batches[0]} is a numpy batch, which goes alone: give one .npy batch (N, C, H, W), or image files only")
    if batches:
        return read_npy(paths[0])
    return [read_image(path) for path in paths]


def read_npy(path: Path):
    """A numeric .npy array, its header checked before anything is allocated: the numbers it
    declares (shape, dtype) must be a batch of at most MAX_NPY_VALUES numbers that the file
    really holds. Never unpickles."""
    import math

    import numpy as np
    from numpy.lib import format as npy

    readers = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}
    try:
        with open(path, "rb") as f:
            version = npy.read_magic(f)
            if version not in readers:  # 3.0 exists for structured arrays with non-Latin-1 field names only
                raise KfError(f"{path} is a .npy of format {version[0]}.{version[1]}, which holds structured arrays, "
                              "not a batch of numbers: save a uint8 or float array with numpy.save")
            shape, _, dtype = readers[version](f)  # the order of its values needs no check
            if dtype.kind not in "biuf":
                raise KfError(f"{path} holds {dtype} values, not numbers: save a uint8 or float array with numpy.save")
            values, held = math.prod(shape), path.stat().st_size - f.tell()
            if values > MAX_NPY_VALUES:
                raise KfError(f"{path} declares a {'x'.join(map(str, shape))} array, {values} values, more than the "
                              f"{MAX_NPY_VALUES} a batch may hold here: split it into smaller .npy files")
            if values * dtype.itemsize > held:
                raise KfError(f"{path} declares a {'x'.join(map(str, shape))} array of {dtype} ({values * dtype.itemsize} "
                              f"bytes) but holds {held} bytes after its header: it is truncated or not what it says")
            f.seek(0)
            return np.load(f, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:  # unreadable, not .npy, a header numpy refuses
        raise KfError(f"cannot read {path} as a numpy batch ({quote(str(exc), 200)})") from None


def fit_images(images: list, bundle) -> tuple:
    """Decoded images as one uint8 (N, C, H, W) batch at the bundle's channel count and size
    (kfdeploy.images.fit_image, the demo's way too), and a line saying what changed, or None."""
    import numpy as np

    from .images import fit_image

    fitted, changed = [], {}
    for image in images:
        array, notes = fit_image(image, bundle.channels, bundle.image_size)
        fitted.append(array)
        for note in notes:
            kind = note.split(" from ")[0]  # "resized", "colour image converted to grey", ...
            changed[kind] = changed.get(kind, 0) + 1
    height, width = bundle.image_size
    line = None
    if changed:
        line = (f"kfdeploy run: {', '.join(f'{kind} ({count} of {len(images)})' for kind, count in changed.items())}: "
                f"the bundle takes {bundle.channels}-channel {width}x{height} images")
    return np.stack(fitted), line


def cmd_run(args) -> None:
    from .bundling.bundle import Bundle
    from .runtime import load

    if args.top < 1:
        raise KfError(f"--top must be 1 or more (classes shown per task), got {args.top}")
    images = read_images(args.inputs)  # before the bundle: a bad file is refused at once
    bundle = Bundle.open(args.bundle)
    if isinstance(images, list):
        images, line = fit_images(images, bundle)
        if line:
            print(line, file=sys.stderr)
    tasks = args.tasks.split(",") if args.tasks else None
    said = []  # which providers run it: said once there are answers, so that a refusal stays one line
    model = load(bundle, tasks=tasks, backend=args.backend, precision=args.precision, log=said.append)
    top = model.top(model(images), k=args.top)
    for line in said:
        print(line, file=sys.stderr)
    names = [str(p) for p in args.inputs] if len(images) == len(args.inputs) else [f"#{i}" for i in range(len(images))]
    if args.json:
        print(json.dumps([{"input": name, **{t: [{"label": l, "probability": p} for l, p in top[t][i]] for t in top}}
                          for i, name in enumerate(names)], indent=2))
        return
    for i, name in enumerate(names):
        answers = "  ".join(f"{t}=" + ",".join(f"{l} ({p:.2f})" for l, p in top[t][i]) for t in top)
        print(f"{name}: {answers}")


def quickstart_answers(bundle_dir: Path) -> None:
    """Assemble two tasks, answer fresh sprites, add a third task live, answer again."""
    import numpy as np

    from .training.data import TASK_LABELS, TASK_NAMES, render
    from .runtime import load

    factors = np.random.default_rng().integers(0, [3, 6, 40, 32, 32], size=(4, 5))
    images = render(factors)
    model = load(bundle_dir, tasks=["shape", "scale"])
    for step in ("shape + scale", "after add_task('pos_x')"):
        top = model.top(model(images))
        print(f"assembly ({step}):")
        for i, row in enumerate(factors):
            truth = {t: TASK_LABELS[t][row[TASK_NAMES.index(t)]] for t in model.tasks}
            print("  " + "  ".join(f"{t}: {top[t][i][0][0]} (true {truth[t]})" for t in model.tasks))
        print(f"  latency for 4 images, ONNX Runtime's profiler (median of warm calls): {model.profile(images).split()}")
        if step.startswith("shape"):
            model.add_task("pos_x")


def cmd_demo(args) -> None:
    from .demo import launch

    launch(args.bundle, host=args.host, port=args.port, share=args.share)


def cmd_quickstart(args) -> None:
    from .bundling.export import export_bundle, verify_bundle
    from .training.pipeline import factorize, train_teacher
    from .training.runs import MODEL_FILE
    from .training.train import TrainConfig

    teacher_dir, kf_dir, bundle_dir = args.out / "teacher", args.out / "kf", args.out / "bundle"
    stages = [
        ("teacher", teacher_dir, lambda: train_teacher(teacher_dir, config=TrainConfig(steps=args.teacher_steps), resume=args.resume)),
        ("factorize", kf_dir, lambda: factorize(teacher_dir, kf_dir, config=TrainConfig(steps=args.factorize_steps), resume=args.resume)),
        ("evaluate", kf_dir, lambda: run_evaluation(kf_dir, args.images)),
        ("export", bundle_dir, lambda: (export_bundle(kf_dir, bundle_dir), verify_bundle(bundle_dir))),
        ("compose", bundle_dir, lambda: quickstart_answers(bundle_dir)),
    ]
    # Each stage's time as it ends and all of them at the end: the published figures are for 2
    # idle cores, and a user on a busy or other machine can compare stage by stage.
    times = {}
    started = time.perf_counter()
    for number, (name, folder, stage) in enumerate(stages, 1):
        label = f"[{number}/{len(stages)} {name}]"
        if name in ("teacher", "factorize") and args.resume and (folder / MODEL_FILE).exists():
            print(f"{label} already finished in {folder}")
            continue
        print(f"{label} -> {folder}")
        stage_started = time.perf_counter()
        stage()
        times[name] = time.perf_counter() - stage_started
        print(f"{label} done in {_duration(times[name])}")
    print(f"\nquickstart finished in {_duration(time.perf_counter() - started)} "
          f"({', '.join(f'{name} {_duration(seconds)}' for name, seconds in times.items())})")
    print(f"  teacher:        {teacher_dir}")
    print(f"  factor modules: {kf_dir} (model.safetensors, run.json)")
    print(f"  evaluation:     {kf_dir / 'evaluation.json'}, heatmap {kf_dir / 'disentanglement.png'}")
    print(f"  training logs:  {teacher_dir / 'metrics.jsonl'}, {kf_dir / 'metrics.jsonl'}")
    print(f"  bundle:         {bundle_dir} (verified; `kfdeploy inspect {bundle_dir}`)")


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 100 else f"{seconds / 60:.1f} min"


def cmd_triton_repo(args) -> None:
    from .serving.triton_repo import write_repository

    tasks = args.tasks.split(",") if args.tasks else None
    done = write_repository(args.bundle, args.out, tasks=tasks, ensembles=args.ensemble, backend=args.backend,
                            prefix=args.model_name, kind=args.kind, instances=args.instances,
                            max_queue_delay_us=args.max_queue_delay_us, engine_device=args.engine_device)
    for name, what in done.items():
        print(f"  {what:<9} {args.out / name}")
    print(f"model repository {args.out}: serve it with `tritonserver --model-repository {args.out.resolve()}`")


def cmd_serve(args) -> int:
    from .serving.serve import Server, run

    server = Server(args.bundle, tasks=args.tasks.split(",") if args.tasks else None, host=args.host, port=args.port,
                    grpc_port=args.grpc_port, metrics_port=args.metrics_port, control_port=args.control_port,
                    control_host=args.control_host, model_name=args.model_name, max_batch_size=args.max_batch_size,
                    max_queue_delay_us=args.max_queue_delay_us, dynamic_batching=not args.no_dynamic_batching,
                    drain_timeout_s=args.drain_timeout, threads=args.threads, triton_log=args.triton_log)
    return run(server)


COMMANDS = {
    "teacher": cmd_teacher, "factorize": cmd_factorize, "evaluate": cmd_evaluate, "quickstart": cmd_quickstart,
    "export": cmd_export, "inspect": cmd_inspect, "verify": cmd_verify, "build-engines": cmd_build_engines,
    "check-trt": cmd_check_trt, "quantize": cmd_quantize, "run": cmd_run, "demo": cmd_demo,
    "triton-repo": cmd_triton_repo, "serve": cmd_serve, "add-task": cmd_add_task, "transferability": cmd_transferability,
}


# The extras (setup.cfg) each command imports, checked before it starts: a missing one is a
# one-line install hint instead of a traceback from deep inside. inspect and check-trt need
# only the base install; run's backends ask for theirs when the assembly is made.
NEEDS = {
    "teacher": ("train",), "factorize": ("train",), "evaluate": ("train",), "build-engines": ("train",),
    "export": ("train", "cpu"), "add-task": ("train", "cpu"), "transferability": ("train", "cpu"), "quantize": ("train", "cpu"), "verify": ("train", "cpu"), "quickstart": ("train", "cpu"), "demo": ("demo", "cpu"),
}


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check(*NEEDS.get(args.command, ()))
        code = COMMANDS[args.command](args)
    except KfError as exc:
        print(f"kfdeploy: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\nkfdeploy: interrupted; the last checkpoint is kept, continue with --resume", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
