"""Gradio demo: tick tasks, watch the assembled model answer.

    kfdeploy demo runs/quickstart/bundle          # http://127.0.0.1:7860

Ticking a task adds its module to the running assembly and unticking removes it; the
trunk is loaded once per backend and never again. The work happens in `Demo.answer`,
which the UI, the gradio_client API (`/predict_upload`, `/predict_sketch`,
`/predict_example`, and `/predict_sprite` for sprites bundles) and the tests share; the UI
only draws what it returns.

Any bundle: inputs are brought to its own size and channel count (kfdeploy.images.fit_image,
as `kfdeploy run` does), labels come from its manifest, and the example images it carries
can be clicked. The sprite generator appears only for bundles of the embedded sprites.
A task added to the bundle while the demo runs (`kfdeploy add-task`) is offered from the
next page load on: each load (`/tasks` in the API) reads the manifest again if it changed.

Beside the backend, a precision: fp32 and each variant `kfdeploy quantize` made of the trunk
(`/precisions` in the API, read again on each load), shown only when there is a choice. The
answer is `kfdeploy.load(bundle, tasks, precision=...)`'s, on the onnxruntime backend only
(another backend with int8 or fp16 gets a message), with each task's accuracy and agreement
as quantize recorded them. Every endpoint takes the precision last, default fp32.

An offline tool: Gradio's analytics and version check are off, whatever the environment
says, and uploads are capped in bytes (MAX_UPLOAD_BYTES) before kfdeploy.images caps them
in pixels.
"""
from __future__ import annotations

import io
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import gradio as gr  # at import, so `kfdeploy demo` can name the missing extra
import numpy as np

from .bundling.bundle import MANIFEST, VARIANT_PRECISIONS, Bundle
from .errors import KfError
from .extras import pyplot
from .images import fit_image, read_image
from .runtime import Assembly, Timings, engines_for_this_device, replacement_problem

DEFAULT_BUNDLE = Path("runs/quickstart/bundle")
# Gradio refuses bigger uploads before they reach kfdeploy. A 64x64 model needs far less; a
# 16-megapixel photo (the pixel cap of kfdeploy.images) as JPEG, or a drawing as PNG, stays under it.
MAX_UPLOAD_BYTES = 20 * 1024 * 1024


@dataclass
class Answer:
    """What one prediction shows: scores per task, the input as the model saw it, notes."""

    scores: Dict[str, Dict[str, float]] = field(default_factory=dict)
    seen: Optional[np.ndarray] = None  # uint8 (H, W) grey or (H, W, 3) RGB: what the model was given
    notes: List[str] = field(default_factory=list)
    truth: Dict[str, str] = field(default_factory=dict)
    timings: Timings = field(default_factory=Timings)  # this call's wall time
    split: Timings = field(default_factory=Timings)  # per module, profiled once per task set
    sizes: Dict[str, int] = field(default_factory=dict)
    precision: str = "fp32"
    variants: Dict[str, dict] = field(default_factory=dict)  # per task, its variant record at `precision` (not fp32)


def to_model_input(image: np.ndarray, size: int | tuple = 64, channels: int = 1,
                   sprites: bool = True) -> tuple[np.ndarray, List[str]]:
    """Any picture -> a (1, channels, H, W) uint8 image for the bundle, with notes on what changed.

    Converted and resized by kfdeploy.images.fit_image, as `kfdeploy run` does. For sprites
    bundles a mostly light picture is inverted: sprites are white on black, a drawing is
    usually dark on white.
    """
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 4:  # a sketch: strokes over a transparent canvas
        alpha = array[..., 3:4].astype(np.float32) / 255.0
        array = (array[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    array = array.astype(np.uint8)
    if array.max() == array.min():
        raise KfError("the image is blank: draw or upload a picture first")
    fitted, notes = fit_image(array, channels, (size, size) if isinstance(size, int) else tuple(size))
    if sprites and fitted.mean() > 127:
        notes.append("inverted to white on black, as the sprites are")
        fitted = 255 - fitted
    return fitted[None], notes


def _shown(x: np.ndarray) -> np.ndarray:
    """One (C, H, W) model input as a picture: (H, W) grey or (H, W, 3) RGB."""
    return x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0)


class Demo:
    """One bundle, one assembly per backend and precision, re-composed to the ticked tasks on each call."""

    def __init__(self, bundle_path: Path):
        self.bundle = Bundle.open(bundle_path)  # checksums verified here, before any session
        self.tasks = self.bundle.tasks
        self._stamp = _manifest_stamp(self.bundle.root)  # the manifest.json read
        self._refused: Optional[str] = None  # why the bundle on disk now is not taken
        self._refreshing = threading.Lock()
        self.channels, self.size = self.bundle.channels, self.bundle.image_size
        # The generator renders the five sprite factors: only bundles of the embedded sprites have them.
        self.sprites = self.bundle.manifest.get("source", {}).get("data") == "sprites"
        # Decoded once (the bytes checked again as they are read): the page shows them all.
        self.examples = [self.bundle.example(i) for i in range(len(self.bundle.examples))]
        self._assemblies: Dict[str, object] = {}
        self._splits: Dict[tuple, Timings] = {}
        self._lock = threading.Lock()

    def refresh(self) -> Optional[str]:
        """Read the bundle again if its manifest changed since it was read: a page load then
        lists the tasks added to it meanwhile (the assemblies read a task's module as it is
        ticked). A bundle whose trunk or input changed is not taken: returns why, else None."""
        if self.bundle.archive is not None:  # an extracted archive never changes
            return None
        with self._refreshing:
            stamp = _manifest_stamp(self.bundle.root)
            if stamp == self._stamp:
                return self._refused
            self._stamp = stamp
            try:
                new = Bundle.open(self.bundle.root)
                problem = replacement_problem(self.bundle, new)
            except KfError as exc:
                problem = str(exc)
            if problem:
                self._refused = (f"the bundle at {self.bundle.root} changed on disk and cannot be taken by this running "
                                 f"demo ({problem}); restart the demo to show it")
            else:
                with self._lock:  # a variant quantized again: its assemblies are made anew from the new files
                    for key in [k for k in self._assemblies if k[1] != "fp32" and replacement_problem(self.bundle, new, k[1])]:
                        del self._assemblies[key]
                        self._splits = {k: v for k, v in self._splits.items() if k[:2] != key}
                self.bundle, self.tasks, self._refused = new, new.tasks, None
            return self._refused

    def backends(self) -> List[str]:
        engines, _ = engines_for_this_device(self.bundle.manifest)
        return ["onnxruntime", "torch"] + (["tensorrt"] if engines else [])

    def precisions(self) -> List[str]:
        """fp32, then each precision the trunk has a variant of (`kfdeploy quantize`). Not
        Bundle.precisions (every module): a task added later without the variant keeps the
        precision for the others, and answers with the command that makes its own."""
        variants = self.bundle.manifest["trunk"].get("variants", {})
        return ["fp32", *(p for p in VARIANT_PRECISIONS if p in variants)]

    def assembly(self, backend: str, tasks: List[str], precision: str = "fp32"):
        """The assembly of a backend and precision with exactly `tasks` selected, by adding and removing only."""
        if precision != "fp32" and backend != "onnxruntime":
            raise KfError(f"{precision} runs on the onnxruntime backend only: choose onnxruntime as the backend, "
                          f"or fp32 for {backend}")
        if (backend, precision) not in self._assemblies:
            self._assemblies[backend, precision] = Assembly(self.bundle, backend, [], log=lambda s: None, precision=precision)
        model = self._assemblies[backend, precision]
        for task in [t for t in model.tasks if t not in tasks]:
            model.remove_task(task)
        for task in [t for t in tasks if t not in model.tasks]:
            model.add_task(task)
        return model

    def answer(self, image: np.ndarray, tasks: List[str], backend: str = "onnxruntime",
               truth: Optional[Dict[str, str]] = None, precision: str = "fp32") -> Answer:
        if not tasks:
            raise KfError("tick at least one task")
        x, notes = to_model_input(image, self.size, self.channels, self.sprites)
        with self._lock:  # one re-composition at a time; the assembly itself is thread-safe
            model = self.assembly(backend, list(tasks), precision)
            scores = model(x)
            timings = model.last_timings
            sizes = model.module_bytes()
            key = (backend, precision, frozenset(tasks))
            if key not in self._splits:  # a profile builds a session of its own: once per task set
                self._splits[key] = model.profile(x, runs=10, warmup=2)
            variants = {} if precision == "fp32" else {t: model.bundle.variant(t, precision) for t in tasks}
        labelled = {t: {label: float(p) for label, p in zip(model.labels(t), scores[t][0])} for t in tasks}
        truth = {t: label for t, label in (truth or {}).items() if t in tasks}
        return Answer(labelled, _shown(x[0]), notes, truth, timings, self._splits[key], sizes, precision, variants)

    def answer_example(self, index: int, tasks: List[str], backend: str = "onnxruntime",
                       precision: str = "fp32") -> Answer:
        """Answer the bundle's example `index`, its true labels shown where the manifest has them."""
        if not 0 <= index < len(self.examples):
            raise KfError(f"this bundle has {len(self.examples)} example(s); there is no example {index}")
        image, labels = self.examples[index]
        return self.answer(image, tasks, backend, labels, precision)

    def describe_input(self) -> str:
        height, width = self.size
        return f"{width}x{height} {'grey' if self.channels == 1 else 'RGB' if self.channels == 3 else f'{self.channels}-channel'}"

    def teacher_bytes(self) -> Optional[int]:
        parameters = self.bundle.manifest.get("source", {}).get("teacher_parameters")
        return None if parameters is None else parameters * 4


def _manifest_stamp(root: Path) -> Optional[tuple]:
    """What changes when manifest.json is rewritten (a bundle is written anew, then swapped in)."""
    try:
        stat = os.stat(Path(root) / MANIFEST)
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def sprite(shape: str, scale: int, orientation: int, pos_x: int, pos_y: int) -> tuple[np.ndarray, Dict[str, str]]:
    """Render one sprite from factor indices; returns the image and its true labels."""
    from .training.data import SHAPES, TASK_LABELS, render

    factors = [SHAPES.index(shape), int(scale), int(orientation), int(pos_x), int(pos_y)]
    truth = {t: TASK_LABELS[t][i] for t, i in zip(TASK_LABELS, factors)}
    return render(np.array([factors]))[0, 0], truth


def bricks_picture(sizes: Dict[str, int], teacher_bytes: Optional[int], precision: str = "fp32") -> np.ndarray:
    """The modules in use as stacked bricks, sized by their bytes, beside the teacher."""
    plt = pyplot("demo")
    from PIL import Image

    fig, ax = plt.subplots(figsize=(5.2, 2.6))
    left = 0.0
    colours = plt.cm.tab10.colors
    for i, (name, count) in enumerate(sizes.items()):
        width = count / 1e6
        ax.barh(1, width, left=left, color="0.55" if name == "trunk" else colours[i % 10], edgecolor="black")
        ax.text(left + width / 2, 1, f"{name}\n{width:.2f} MB", ha="center", va="center", fontsize=7)
        left += width
    if teacher_bytes:
        ax.barh(0, teacher_bytes / 1e6, color="0.85", edgecolor="black")
        ax.text(teacher_bytes / 2e6, 0, f"full teacher {teacher_bytes / 1e6:.2f} MB", ha="center", va="center", fontsize=7)
    ax.set_yticks([0, 1], ["teacher", "assembled"])
    ax.set_xlabel(f"MB ({precision} ONNX modules)")
    ax.set_title(f"Bricks in use: trunk + {len(sizes) - 1} task module(s), {sum(sizes.values()) / 1e6:.2f} MB", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return np.asarray(Image.open(buffer).convert("RGB"))


def summary_markdown(answer: Answer, teacher_bytes: Optional[int]) -> str:
    blocks = []
    if answer.truth:
        rows = ["| task | true | predicted | |", "|---|---|---|---|"]
        for task, scores in answer.scores.items():
            predicted = max(scores, key=scores.get)
            true = answer.truth.get(task)
            verdict = "" if true is None else "**right**" if predicted == true else "**wrong**"
            rows.append(f"| {task} | {true or '?'} | {predicted} | {verdict} |")
        blocks.append("\n".join(rows))
    at = "" if answer.precision == "fp32" else f" at {answer.precision}"
    blocks.append(f"**Latency**{at} {answer.timings.total_ms:.2f} ms for this call; per module (profiler, median of "
                  f"warm calls): {answer.split.split()}")
    if answer.variants:
        blocks.append(precision_markdown(answer.precision, answer.variants))
    total = sum(answer.sizes.values())
    teacher = f" (the full teacher: {teacher_bytes / 1e6:.2f} MB)" if teacher_bytes else ""
    blocks.append(f"**Size** of the assembled modules{at}: {total / 1e6:.2f} MB{teacher}")
    if answer.notes:
        blocks.append("*Input: " + "; ".join(answer.notes) + ".*")
    return "\n\n".join(blocks)


def precision_markdown(precision: str, variants: Dict[str, dict]) -> str:
    """Each task's record at `precision`, as `kfdeploy quantize` judged it: the composition at
    that precision on held-out images, against fp32's on the same images."""
    def share(value):
        return "n/a" if value is None else f"{100 * value:.1f}%"

    counts = {v.get("images") for v in variants.values()} - {None}
    on = f" on {counts.pop()} held-out images" if len(counts) == 1 else ""
    rows = [f"**{precision}** as `kfdeploy quantize` recorded it{on}:", "",
            f"| task | held-out accuracy at {precision} | at fp32 | agreement with fp32 |", "|---|---|---|---|"]
    for task, v in variants.items():
        kept = " (kept at fp32, --allow-mixed)" if v.get("fallback") == "fp32" else ""
        rows.append(f"| {task} | {share(v.get('heldout_accuracy'))}{kept} | {share(v.get('fp32_heldout_accuracy'))} "
                    f"| {share(v.get('agreement'))} |")
    return "\n".join(rows)


NO_BUNDLE = """### No bundle to show yet

The demo needs a bundle of factor modules at `{path}`. Make the default one (about 15
minutes on 2 CPU cores) and start the demo again:

```
kfdeploy quickstart
kfdeploy demo runs/quickstart/bundle
```

Or export your own factorized run: `kfdeploy export RUN --out BUNDLE`, then `kfdeploy demo BUNDLE`.
"""


PRECISION_INFO = "int8 and fp16 run on the onnxruntime backend only"


def open_demo(bundle_path: Path) -> tuple[Optional[Demo], Optional[str]]:
    """The Demo of a bundle, or why there is none: missing, damaged, malformed (every KfError)."""
    try:
        return Demo(bundle_path), None
    except KfError as exc:
        return None, str(exc)


def build_app(bundle_path: Path = DEFAULT_BUNDLE, opened: Optional[tuple] = None):
    """The Blocks app; a bundle that is missing or cannot be used shows why, never a traceback."""
    demo, problem = opened or open_demo(bundle_path)

    # analytics_enabled=False also stops Gradio's version check and hub telemetry; the
    # GRADIO_ANALYTICS_ENABLED variable would only be read when this argument is None.
    with gr.Blocks(title="kfdeploy: Knowledge Factorization, assembled live", analytics_enabled=False) as app:
        gr.Markdown("# Knowledge Factorization, assembled live\nOne shared **trunk** plus the **task modules** you tick: "
                    "each task answers as `head(trunk(x) + task_network(x))`. Ticking adds a module; the trunk stays loaded.")
        if demo is None:
            if not Path(bundle_path).exists():
                gr.Markdown(NO_BUNDLE.format(path=bundle_path), elem_id="no-bundle")
            else:
                gr.Markdown(f"### This bundle cannot be used\n\n{problem}\n\nRe-export it with `kfdeploy export RUN --out {bundle_path}`.",
                            elem_id="bad-bundle")
            return app

        with gr.Row():
            with gr.Column(scale=1):
                tasks = gr.CheckboxGroup(demo.tasks, value=demo.tasks[:2], label="Tasks (bricks) to assemble", elem_id="tasks")
                offered = demo.precisions()
                with gr.Row():
                    backend = gr.Radio(demo.backends(), value="onnxruntime", label="Backend", elem_id="backend")
                    # Only where the bundle has variants: a choice of one is clutter.
                    precision = gr.Radio(offered, value="fp32", label="Precision", info=PRECISION_INFO,
                                         visible=len(offered) > 1, elem_id="precision")
                with gr.Tabs():
                    if demo.sprites:
                        from .training.data import SHAPES

                        with gr.Tab("Generate a sprite", elem_id="tab-sprite"):
                            shape = gr.Radio(list(SHAPES), value="heart", label="shape")
                            scale = gr.Slider(0, 5, value=5, step=1, label="scale (0.5 ... 1.0)")
                            orientation = gr.Slider(0, 39, value=0, step=1, label="orientation (x 9°)")
                            pos_x = gr.Slider(0, 31, value=8, step=1, label="pos_x")
                            pos_y = gr.Slider(0, 31, value=20, step=1, label="pos_y")
                            generate = gr.Button("Generate and predict", variant="primary", elem_id="generate")
                    if demo.examples:
                        with gr.Tab("Examples", elem_id="tab-examples"):
                            gallery = gr.Gallery(
                                [(image, _caption(labels)) for image, labels in demo.examples],
                                label="Held-out images stored in the bundle: click one", columns=3, allow_preview=False,
                                interactive=False, elem_id="examples")
                            # The API's door to the examples (a click's index is not something a client can send).
                            example_index = gr.Number(0, precision=0, visible=False)
                            predict_example = gr.Button("Predict the example", visible=False)
                    with gr.Tab("Draw"):
                        sketch = gr.Sketchpad(type="numpy", image_mode="RGBA", label="Draw", canvas_size=(256, 256))
                        predict_sketch = gr.Button("Predict the drawing", elem_id="predict-sketch")
                    with gr.Tab("Upload"):
                        # No file_types filter: a wrong file gets our message, not a generic rejection.
                        upload = gr.File(label="An image file (PNG, JPEG, ...)", type="filepath")
                        predict_upload = gr.Button("Predict the upload", elem_id="predict-upload")
            with gr.Column(scale=1):
                status = gr.Markdown(elem_id="status")
                seen = gr.Image(label=f"What the model sees ({demo.describe_input()})", height=160, elem_id="seen")
                labels = {t: gr.Label(num_top_classes=3, label=t, visible=t in demo.tasks[:2], elem_id=f"label-{t}") for t in demo.tasks}
                # Tasks added to the bundle since the page was built have no Label above: their
                # scores are drawn here, one Label each, as they are answered.
                added_scores = gr.State({})

                @gr.render(inputs=added_scores)
                def added_labels(scores):
                    for task, (title, confidences) in scores.items():
                        gr.Label(confidences, num_top_classes=3, label=title, elem_id=f"label-{task}")
                summary = gr.Markdown(elem_id="summary")
                bricks = gr.Image(label="Bricks in use", elem_id="bricks")
        # The last picture answered and its true labels: ticking a task answers it again.
        last = gr.State(None)

        outputs = [status, seen, *labels.values(), summary, bricks, last, added_scores]

        def show(answer_or_error, picture=None) -> list:
            if isinstance(answer_or_error, str):
                return [f"⚠️ {answer_or_error}", gr.update(), *[gr.update() for _ in labels], gr.update(), gr.update(), gr.update(),
                        gr.update()]
            answer: Answer = answer_or_error

            def title(task):  # the answer panel names the precision that answered
                return task if answer.precision == "fp32" else f"{task} · {answer.precision}"

            label_updates = [gr.update(value=answer.scores.get(t), visible=t in answer.scores, label=title(t)) for t in labels]
            added = {t: (title(t), scores) for t, scores in answer.scores.items() if t not in labels}
            return ["", answer.seen, *label_updates, summary_markdown(answer, demo.teacher_bytes()),
                    bricks_picture(answer.sizes, demo.teacher_bytes(), answer.precision),
                    picture if picture is not None else gr.update(), added]

        def on_load():
            problem = demo.refresh()
            return gr.update(choices=demo.tasks), f"⚠️ {problem}" if problem else gr.update()

        def on_precisions(chosen="fp32"):
            demo.refresh()  # as on_load: a bundle quantized since the last load offers its variants
            offered = demo.precisions()
            update = {"value": "fp32"} if chosen not in offered else {}
            return gr.update(choices=offered, visible=len(offered) > 1, **update)

        def answered(image, ticked, backend_name, truth=None, precision_name="fp32") -> list:
            try:
                return show(demo.answer(image, ticked, backend_name, truth, precision_name), (image, truth))
            except KfError as exc:
                return show(str(exc))

        def guarded(work):
            try:
                return work()
            except KfError as exc:
                return show(str(exc))

        # Every endpoint takes the precision last, with a default: callers of before still work.
        def on_sketch(value, ticked, backend_name, precision_name="fp32"):
            def work():
                composite = None if value is None else value.get("composite")
                if composite is None:
                    raise KfError("the canvas is empty: draw something first")
                return answered(composite, ticked, backend_name, None, precision_name)
            return guarded(work)

        def on_upload(path, ticked, backend_name, precision_name="fp32"):
            def work():
                if not path:
                    raise KfError("choose an image file to upload first")
                return answered(read_image(path), ticked, backend_name, None, precision_name)
            return guarded(work)

        def on_example(index, ticked, backend_name, precision_name="fp32"):
            def work():
                image, truth = demo.examples[int(index)] if 0 <= int(index) < len(demo.examples) else (None, None)
                if image is None:
                    raise KfError(f"this bundle has {len(demo.examples)} example(s); there is no example {index}")
                return answered(image, ticked, backend_name, truth, precision_name)
            return guarded(work)

        def on_tasks(picture, ticked, backend_name, precision_name, *sprite_values):
            if picture is not None:
                return answered(picture[0], ticked, backend_name, picture[1], precision_name)
            if demo.sprites:  # nothing answered yet: the sprite on the sliders
                image, truth = sprite(*sprite_values)
                return answered(image, ticked, backend_name, truth, precision_name)
            return [gr.update() for _ in outputs]

        sprite_inputs = []
        if demo.sprites:
            sprite_inputs = [shape, scale, orientation, pos_x, pos_y]

            def on_sprite(shape_name, scale_i, orientation_i, x_i, y_i, ticked, backend_name, precision_name="fp32"):
                image, truth = sprite(shape_name, scale_i, orientation_i, x_i, y_i)
                return answered(image, ticked, backend_name, truth, precision_name)

            generate.click(on_sprite, [*sprite_inputs, tasks, backend, precision], outputs, api_name="predict_sprite")
        if demo.examples:
            def on_click(ticked, backend_name, precision_name, event: gr.SelectData):
                return on_example(event.index, ticked, backend_name, precision_name)

            gallery.select(on_click, [tasks, backend, precision], outputs, api_name=False)
            predict_example.click(on_example, [example_index, tasks, backend, precision], outputs, api_name="predict_example")
        # Ticking a task, or choosing another backend or precision, answers the last picture again.
        for control in (tasks, backend, precision):
            control.change(on_tasks, [last, tasks, backend, precision, *sprite_inputs], outputs, api_name=False)
        predict_sketch.click(on_sketch, [sketch, tasks, backend, precision], outputs, api_name="predict_sketch")
        predict_upload.click(on_upload, [upload, tasks, backend, precision], outputs, api_name="predict_upload")
        # Every page load: the tasks the bundle has now (its manifest read again if it changed),
        # then the precisions its trunk has now.
        app.load(on_load, None, [tasks, status], api_name="tasks", show_progress="hidden").then(
            on_precisions, [precision], [precision], api_name="precisions", show_progress="hidden")
    return app


def _caption(labels: Dict[str, str]) -> str:
    return ", ".join(f"{task} {label}" for task, label in labels.items()) or "labels unknown"


def launch(bundle_path: Path = DEFAULT_BUNDLE, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           block: bool = True):
    opened = open_demo(bundle_path)
    if opened[1] is not None:  # the page explains it too; whoever started the server sees it here
        print(f"kfdeploy demo: {opened[1]}", file=sys.stderr)
    app = build_app(bundle_path, opened)
    app.queue(default_concurrency_limit=4)
    # quiet: Gradio's own start-up lines tell a command-line user to set `share=True` in `launch()`
    app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True, quiet=True,
               max_file_size=MAX_UPLOAD_BYTES)
    public = f" and {app.share_url}" if app.share_url else ""
    print(f"kfdeploy demo: {bundle_path} on {app.local_url}{public} (Ctrl-C stops it; --host, --port and --share for more)",
          flush=True)
    if block:
        app.block_thread()
    return app
