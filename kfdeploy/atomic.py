"""Files that appear whole or not at all: the one way kfdeploy replaces a file.

    with atomic_write(path) as tmp:
        tmp.write_bytes(data)          # or onnx.save(model, tmp), tarfile.open(tmp, "w:gz"), ...

The block writes a temporary file beside `path`; when it ends, the file is flushed to disk
and renamed over `path`. Readers see the old file or the new one, never part of one: the
rename is atomic on POSIX because the temporary file is in the same folder, so on the same
file system. An exception removes the temporary file; a kill leaves at most a hidden
`.NAME.tmp-PID-XXXXXXXX.SUFFIX` beside it. The flush matters on edge devices that lose
power: without it a rename can survive a power cut that the data did not.

Imports nothing heavy, so the torch-free parts (bundle, runtime, fuse, tensorrt) use it too.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_write(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path`; once the block has written it, it replaces `path`.

    The temporary name keeps `path`'s suffix, for writers that pick the format by it
    (torch_tensorrt.save, onnx.save_model), and is unique per call, so two threads or
    processes writing the same file never write into each other's temporary file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")
    try:
        yield tmp
        descriptor = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
