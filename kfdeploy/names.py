"""The rule for task names, shared by every stage: a task's name becomes part of file
names in a bundle (tasks/<name>.onnx, engines/<name>...), and training data (a folder's
label columns) must already obey it, so that what trains can be exported."""
import re

TASK_NAME_RULE = "letters, digits, '_', '.' and '-', not '.' or '..'"
_TASK_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def is_task_name(name: object) -> bool:
    """Whether `name` may name a task (TASK_NAME_RULE)."""
    return isinstance(name, str) and _TASK_NAME.fullmatch(name) is not None and name not in (".", "..")
