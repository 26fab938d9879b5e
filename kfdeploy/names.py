"""The rule for task names, shared by every stage: a task's name becomes part of file
names in a bundle (tasks/<name>.onnx, engines/<name>...), and training data (a folder's
label columns) must already obey it, so that what trains can be exported. Likewise for
any text a bundle carries (class names become its labels)."""
import re
import unicodedata

# The trunk module's name, and the tensors every task graph reads: a task so named would
# shadow the trunk or collide with its own inputs when graphs are composed.
RESERVED = ("trunk", "image", "common")
TASK_NAME_RULE = "1 to 64 letters, digits, '_', '.' and '-', not '.' or '..', nor trunk, image or common"
# 64: file names made from a task name (engines/<name>.<device>.<precision>.plan) stay far
# below the 255 bytes a file name may have.
_TASK_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def is_task_name(name: object) -> bool:
    """Whether `name` may name a task (TASK_NAME_RULE)."""
    return isinstance(name, str) and _TASK_NAME.fullmatch(name) is not None and name not in (".", "..", *RESERVED)


def unprintable(text: str) -> bool:
    """Whether `text` holds control characters (escape sequences would reach the terminal of
    whoever inspects a bundle) or lone surrogates (which no terminal encoding can print)."""
    return not text.isprintable() and any(unicodedata.category(c) in ("Cc", "Cs") for c in text)


def printable(text: str) -> str:
    """`text` as a bundle may carry it: itself, or escaped where it is `unprintable` (a path
    on disk may hold a tab, or bytes that are not UTF-8)."""
    return ascii(text)[1:-1] if unprintable(text) else text
