"""Which extra brings each optional import, and the one-line hint when it is missing.

The base install is what an edge device needs to read a bundle (numpy, onnx); the rest
are extras in setup.cfg. ONNX Runtime is an extra too because it comes in two builds that
install the same `onnxruntime` module and overwrite each other: `cpu` (onnxruntime) or
`gpu` (onnxruntime-gpu), exactly one.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Optional

from .errors import KfError

# extra -> the modules kfdeploy imports from it (what setup.cfg's extras install)
EXTRAS = {
    "cpu": ("onnxruntime",),
    "train": ("torch", "safetensors", "tqdm", "matplotlib", "onnxscript", "timm", "PIL"),
    "demo": ("gradio", "PIL", "matplotlib"),
}
# Names users know, where the module's name is not it.
LABELS = {"onnxruntime": "ONNX Runtime", "torch": "PyTorch", "gradio": "Gradio", "PIL": "Pillow"}
PACKAGES = {"PIL": "pillow"}


def install_hint(module: str, extra: Optional[str]) -> str:
    top = module.split(".")[0]
    what = f"'kfdeploy[{extra}]'" if extra else PACKAGES.get(top, top)
    hint = f"{LABELS.get(top, top)} is not installed: pip install {what}"
    if extra == "cpu":
        hint += " (or 'kfdeploy[gpu]' on a CUDA machine)"
    return hint


def require(module: str, extra: Optional[str]):
    """Import `module`, or raise KfError with the install line of the extra that provides it
    (of the package itself when extra is None: a small need no extra is worth making for).

    Only the module itself being absent is renamed: an installed package that fails to
    import (a missing dependency of its own, a broken library) keeps its real error.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != module.split(".")[0]:
            raise
        raise KfError(install_hint(module, extra)) from None


def check(*extras: str) -> None:
    """Raise KfError for the first module of these extras that is not installed (nothing is imported)."""
    for extra in extras:
        for module in EXTRAS[extra]:
            if importlib.util.find_spec(module) is None:
                raise KfError(install_hint(module, extra))


def pyplot(extra: str):
    """matplotlib's pyplot on its file backend: kfdeploy draws to PNG files and image arrays,
    never to a window, and a machine without a display must not fail over one."""
    matplotlib = require("matplotlib", extra)
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")
