"""Reading and checking bundles: the format in export/BUNDLE_FORMAT.md, safe by construction.

Reading never executes code (JSON, ONNX protobuf and safetensors only) and never touches
a path outside the bundle: every file the manifest names, and every member of an archive,
is checked before use. This module imports neither torch nor onnxruntime, so an edge
device with only numpy can read a bundle.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Dict, Iterator, List, Optional, Tuple

from .atomic import atomic_write
from .errors import KfError

FORMAT = "kfdeploy-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _escape_reason(relative: str) -> Optional[str]:
    """Why a manifest or archive path would leave the bundle, or None if it stays inside."""
    if not isinstance(relative, str) or not relative:
        return "it is not a non-empty string"
    if "\\" in relative or "\x00" in relative:
        return "it contains a backslash or NUL"
    path = PurePosixPath(relative)
    if path.is_absolute() or (len(relative) > 1 and relative[1] == ":"):
        return "it is absolute"
    if ".." in path.parts:
        return "it climbs out with '..'"
    return None


def resolve_inside(root: Path, relative: str) -> Path:
    """The file `relative` names inside `root`; refuses escapes and symbolic links."""
    reason = _escape_reason(relative)
    if reason:
        raise KfError(f"bundle at {root} names the path {relative!r}, which escapes the bundle ({reason}); refusing to read it — re-export the bundle")
    current = root
    for part in PurePosixPath(relative).parts:
        current = current / part
        if current.is_symlink():
            raise KfError(f"bundle at {root}: {relative!r} goes through a symbolic link ({current.name}); refusing to follow it — re-export the bundle")
    if not current.is_file():
        raise KfError(f"bundle at {root} is missing {relative!r}; the bundle is incomplete — re-export it")
    return current


def _checksum_mismatch(relative: str, root: Path) -> KfError:
    return KfError(f"checksum mismatch for {relative} in bundle {root}: the file is corrupted or "
                   "was modified after export; re-export the bundle or restore the file")


class Bundle:
    """A bundle folder opened for reading; `manifest` is the parsed manifest.json."""

    def __init__(self, root: Path, manifest: dict):
        self.root = root
        self.manifest = manifest

    @classmethod
    def open(cls, path: Path | str, verify: bool = True) -> "Bundle":
        """Open a bundle folder or archive; with `verify`, check every checksum first."""
        path = Path(path)
        if path.is_file() and path.name.endswith(ARCHIVE_SUFFIXES):
            return cls._open_archive(path, verify)
        if not path.is_dir():
            raise KfError(f"no bundle at {path}; make one with `kfdeploy export RUN --out {path}`")
        bundle = cls(path, read_manifest(path))
        if verify:
            bundle.verify_checksums()
        return bundle

    @classmethod
    def _open_archive(cls, archive: Path, verify: bool) -> "Bundle":
        target = Path(tempfile.mkdtemp(prefix="kfdeploy-bundle-"))
        atexit.register(shutil.rmtree, target, True)  # the extraction lives as long as the process
        try:
            extract_archive(archive, target)
            return cls.open(target, verify)
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise

    def file(self, relative: str) -> Path:
        return resolve_inside(self.root, relative)

    def entries(self) -> Iterator[dict]:
        """Every file record in the manifest: trunk, its weights, tasks, engines."""
        trunk = self.manifest["trunk"]
        yield trunk
        if "weights" in trunk:
            yield trunk["weights"]
        for task in self.manifest["tasks"].values():
            yield task
            if "weights" in task:
                yield task["weights"]
        yield from self.manifest.get("engines", [])

    def verify_checksums(self) -> None:
        for entry in self.entries():
            path = self.file(entry["file"])
            if sha256_file(path) != entry["sha256"]:
                raise _checksum_mismatch(entry["file"], self.root)

    def modules(self) -> Dict[str, dict]:
        """The trunk's record, then each task's, by module name ("trunk" or the task)."""
        return {"trunk": self.manifest["trunk"], **self.manifest["tasks"]}

    def graph(self, module: str):
        """The parsed ONNX graph of one module ("trunk" or a task), self-contained or refused.

        A tensor stored as external data would be read from a path the graph names, outside
        any checksum: the format forbids it, so it is refused here, before any session.
        """
        import onnx

        record = self.manifest["trunk"] if module == "trunk" else self.task(module)
        path = self.file(record["file"])
        data = path.read_bytes()
        # The bytes parsed are the bytes checked: the file may have changed since open().
        if hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise _checksum_mismatch(record["file"], self.root)
        try:
            model = onnx.load_model_from_string(data)
        except Exception as exc:  # protobuf raises its own DecodeError, not a common base
            raise KfError(f"{record['file']} in bundle {self.root} is not a readable ONNX graph ({exc}); re-export the bundle") from None
        external = next((t.name for t in _graph_tensors(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL), None)
        if external is not None:
            raise KfError(f"{record['file']} in bundle {self.root} keeps tensor {external!r} in an external file, which "
                          "bundles do not allow (it would be read outside the checksums); re-export the bundle")
        return model

    @property
    def tasks(self) -> List[str]:
        return list(self.manifest["tasks"])

    def task(self, name: str) -> dict:
        if name not in self.manifest["tasks"]:
            raise KfError(f"unknown task {name!r} in bundle {self.root}; available: {', '.join(self.tasks) or 'none'}")
        return self.manifest["tasks"][name]

    def input_shapes(self, module: str) -> Dict[str, Tuple[tuple, tuple, tuple]]:
        """(min, opt, max) shape of each input of a module ("trunk" or a task), from the batch range:
        what a TensorRT optimization profile needs."""
        spec = self.manifest["input"]
        batch = spec["batch"]
        inputs = {"image": tuple(spec["shape"][1:])}
        if module != "trunk":
            inputs["common"] = (self.manifest["trunk"]["output"]["width"],)
        return {name: tuple((batch[k], *dims) for k in ("min", "opt", "max")) for name, dims in inputs.items()}


def _graph_tensors(graph) -> Iterator:
    """Every tensor a graph stores: initializers, and attribute tensors of nodes and subgraphs."""
    yield from graph.initializer
    yield from (sparse.values for sparse in graph.sparse_initializer)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            for subgraph in [*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs]:
                yield from _graph_tensors(subgraph)


_REQUIRED = ("format", "format_version", "producer", "input", "trunk", "tasks")


def read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if path.is_symlink() or not path.is_file():
        raise KfError(f"{root} is not a kfdeploy bundle (no {MANIFEST}); make one with `kfdeploy export RUN --out {root}`")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise KfError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes; this is not a kfdeploy manifest")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise KfError(f"{path} is not valid JSON ({exc}); the bundle is damaged — re-export it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise KfError(f"{path} is not a kfdeploy bundle manifest (format is not {FORMAT!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise KfError(f"{path} has an invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise KfError(
            f"bundle {root} has format version {version}, newer than this kfdeploy reads "
            f"(up to {FORMAT_VERSION}); upgrade kfdeploy (pip install -U kfdeploy)"
        )
    missing = [key for key in _REQUIRED if key not in manifest]
    if missing:
        raise KfError(f"{path} lacks required field(s) {', '.join(missing)}; the bundle is damaged — re-export it")
    return manifest


def extract_archive(archive: Path, target: Path) -> None:
    """Extract a bundle archive into `target`, refusing any member that could escape it."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for member in members:
                reason = _escape_reason(member.name.removeprefix("./")) if member.name not in (".", "./") else None
                if reason is None and not (member.isfile() or member.isdir()):
                    reason = "it is a link or special file, not a regular file or folder"
                if reason:
                    raise KfError(f"archive {archive} has the member {member.name!r}, which could escape the bundle ({reason}); refusing to extract it")
            # The checks above refuse everything the 'data' filter would; it stays as a second guard.
            tar.extractall(target, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise KfError(f"{archive} is not a readable .tar.gz bundle archive ({exc}); re-create it with `kfdeploy export --archive`") from None


def write_archive(bundle_dir: Path, archive: Path) -> None:
    """Pack a bundle folder into a .tar.gz whose members are all relative, regular files."""
    with atomic_write(archive) as tmp, tarfile.open(tmp, "w:gz") as tar:
        for path in sorted(bundle_dir.rglob("*")):
            if path.is_file() and not path.is_symlink():
                tar.add(path, arcname=path.relative_to(bundle_dir).as_posix(), recursive=False)

