"""kfdeploy: Knowledge Factorization of a multi-task teacher into deployable factor modules."""

__version__ = "0.1.0"

from .errors import KfError  # noqa: E402  (light: importing kfdeploy must not pull in torch)

__all__ = ["KfError", "__version__"]
