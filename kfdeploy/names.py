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


def module_title(module: str) -> str:
    """How messages name a module of a bundle: "the trunk", or "task module 'shape'"."""
    return "the trunk" if module == "trunk" else f"task module {quote(module)}"


def quote(text: str, limit: int = 40) -> str:
    """Untrusted `text` (from a bundle, an archive, a graph) as a message quotes it: repr's
    escapes, so nothing reaches a terminal as a control sequence, and about `limit`
    characters of it at most, '...' marking a cut: a name may be megabytes long."""
    shown = repr(text)
    if len(shown) <= limit + 2:
        return shown
    head = text[:limit]
    while len(repr(head)) > limit + 2:  # an escape takes up to 10 characters
        head = head[:len(head) // 2]
    return repr(head) + "..."


def listing(names, limit: int = 200) -> str:
    """Names as a message lists them ("shape, scale"): escaped where `unprintable`, and cut
    after about `limit` characters ("a, b and 9998 more"), since a bundle may hold thousands."""
    names = list(names)
    shown, length = [], 0
    for name in names:
        item = printable(name)
        item = item if len(item) <= 64 else item[:64] + "..."
        if shown and length + len(item) > limit:
            return f"{', '.join(shown)} and {len(names) - len(shown)} more"
        shown.append(item)
        length += len(item) + 2
    return ", ".join(shown) or "none"
