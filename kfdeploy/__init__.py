"""kfdeploy: Knowledge Factorization of a multi-task teacher into deployable factor modules."""

__version__ = "0.1.0"

from .errors import KfError  # noqa: E402  (light: importing kfdeploy must not pull in torch)

__all__ = ["KfError", "__version__", "load"]


def __getattr__(name):
    # `kfdeploy.load` without importing the runtime (or anything heavier) at package import.
    if name == "load":
        from .runtime import load

        return load
    raise AttributeError(f"module 'kfdeploy' has no attribute {name!r}")
