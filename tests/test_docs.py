"""Every Python and shell example in the README and the documentation site runs, as written.

Sybil reads the code blocks of README.md and docs/**/*.md; each block is a test, run in page
order in a workspace of the page's own (docs/development.md says what that means for a page
author). Python blocks run in one namespace per page, as if typed into `python` started in
the workspace; shell blocks run command by command. Commands that train or measure get small
sizes (SMALL), commands that would wait for Ctrl-C are started, checked to answer and
stopped, and pip lines are checked against setup.cfg rather than run. Last, the site itself
is built with `mkdocs build --strict`.
"""
from __future__ import annotations

import configparser
import contextlib
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import unittest
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional
from unittest import mock

import numpy as np
import pytest
from sybil import Document, Example, Region
from sybil.evaluators.python import pad
from sybil.parsers.markdown import CodeBlockParser, SkipParser
from sybil.parsers.markdown.lexers import DirectiveInHTMLCommentLexer, RawFencedCodeBlockLexer

import kfdeploy
from conftest import REPO
from triton_servers import free_ports, kfdeploy_serve, need_serve_env

pytestmark = [pytest.mark.slow, pytest.mark.session_runs]  # its pages' workspaces come from the session's runs
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
# Sizes for commands that train or measure, appended to the documented command (argparse
# takes an option's last value): each page runs in seconds, the commands' code unchanged.
SMALL = {
    "quickstart": ["--teacher-steps", "4", "--factorize-steps", "4", "--images", "64"],
    "teacher": ["--steps", "4", "--batch-size", "16", "--eval-images", "64"],
    "factorize": ["--steps", "4", "--batch-size", "16", "--eval-images", "64"],
    "add-task": ["--steps", "4", "--batch-size", "16", "--eval-images", "64"],
    "evaluate": ["--images", "64"],
    "transferability": ["--images", "64"],
    "quantize": ["--images", "32"],
}
SERVE_PORTS = {"--port": 8000, "--grpc-port": 8001, "--metrics-port": 8002, "--control-port": 8003}
WORKSPACE = re.compile(r"<!-- docs-workspace:(.*?)-->")


# -- what a page's examples start from ------------------------------------------------------

def _sprites(count: int) -> np.ndarray:
    from kfdeploy.training.data import render

    return render(np.random.default_rng(0).integers(0, [3, 6, 40, 32, 32], size=(count, 5)))


def _photos(folder: Path) -> None:
    """A labelled folder of the Data page's format: noise pictures, two tasks, a split column."""
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = ["file,weather,daytime,split"]
    for i in range(36):
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
        rows.append(f"{i}.png,{('cloud', 'rain', 'sun')[i % 3]},{('day', 'night')[i % 2]},{'heldout' if i % 4 == 3 else 'train'}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")


def _pngs(folder: Path) -> None:
    from PIL import Image

    folder.mkdir()
    for i, sprite in enumerate(_sprites(4)):
        Image.fromarray(sprite[0]).save(folder / f"{i}.png")


def _copy(fixture: str) -> Callable[[Path, pytest.FixtureRequest], None]:
    return lambda target, request: shutil.copytree(request.getfixturevalue(fixture), target)


GIVEN = {
    "runs/teacher": _copy("teacher_run"),
    "runs/kf": _copy("factor_run"),
    "bundles/sprites": _copy("bundle"),
    "photos": lambda target, request: _photos(target),
    "images": lambda target, request: _pngs(target),
    "batch.npy": lambda target, request: np.save(target, _sprites(4)),
}


@dataclass
class Page:
    """A page's examples' shared state: where they run, what they started, what failed."""

    workspace: Path
    failed: Optional[str] = None
    small: List[tuple] = field(default_factory=list)  # the next block's docs-small replacements
    ports: Dict[int, int] = field(default_factory=dict)  # documented port -> the port its server got
    running: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def rewrite(self, source: str) -> str:
        for old, new in self.small:
            assert old in source, f"docs-small: {old!r} is not in the block it is meant for"
            source = source.replace(old, new)
        self.small = []
        for documented, actual in self.ports.items():
            source = re.sub(rf"\b(localhost|127\.0\.0\.1):{documented}\b", rf"\g<1>:{actual}", source)
        return source


OPENED: Dict[str, Page] = {}  # by the page's path, from its first example on


def open_page(document: Document, request) -> Page:
    if document.path not in OPENED:
        workspace = request.getfixturevalue("tmp_path_factory").mktemp(Path(document.path).stem)
        (workspace / "demos").symlink_to(REPO / "demos")  # the pages run `python demos/...` as from a checkout
        given = WORKSPACE.search(document.text)
        for name in (given.group(1).split() if given else []):
            (workspace / name).parent.mkdir(parents=True, exist_ok=True)
            GIVEN[name](workspace / name, request)
        OPENED[document.path] = Page(workspace)
    return OPENED[document.path]


@contextlib.contextmanager
def in_workspace(page: Page):
    """cwd and sys.path[0] in the workspace, as for `python` started there."""
    before_cwd, before_path = os.getcwd(), list(sys.path)
    os.chdir(page.workspace)
    sys.path.insert(0, str(page.workspace))
    try:
        yield
    finally:
        os.chdir(before_cwd)
        sys.path[:] = before_path


# -- commands -------------------------------------------------------------------------------

@contextlib.contextmanager
def apps_that_would_block(argv: List[str]):
    """A demo command on a free port (appended to `argv`): the Gradio app it launches and
    would serve until Ctrl-C is collected instead, then checked to answer and closed."""
    import gradio

    argv += ["--port", str(free_ports(1)[0])]
    launched = []
    with mock.patch.object(gradio.Blocks, "block_thread", lambda app: launched.append(app)):
        yield
    try:
        assert launched, "the command launched no app"
        for app in launched:
            with urllib.request.urlopen(app.local_url, timeout=60) as response:
                assert response.status == 200, app.local_url
    finally:
        for app in launched:
            app.close()


def kfdeploy_command(page: Page, args: List[str]) -> None:
    from kfdeploy.cli import main

    args = [*args, *SMALL.get(args[0], [])]
    if args[0] == "serve":
        return serve(page, args[1:])
    with apps_that_would_block(args) if args[0] == "demo" else contextlib.nullcontext():
        try:
            code = main(args)
        except SystemExit as exc:  # argparse refusing the documented command
            code = exc.code
    assert code == 0, f"`kfdeploy {shlex.join(args)}` exited with {code}"


def serve(page: Page, args: List[str]) -> None:
    """`kfdeploy serve` in the serving environment, on free ports, running until the page ends."""
    need_serve_env()
    documented = dict(SERVE_PORTS)
    rest = []
    pairs = iter(args[1:])
    for arg in pairs:
        if arg in documented:
            documented[arg] = int(next(pairs))
        else:
            rest.append(arg)
    running = page.running.enter_context(kfdeploy_serve(page.workspace / args[0], page.workspace, *rest))
    actual = {"--port": running["http"], "--grpc-port": running["grpc"], "--metrics-port": running["metrics"],
              "--control-port": running["control"]}
    page.ports.update({documented[flag]: int(address.rsplit(":", 1)[1]) for flag, address in actual.items()})


def script(page: Page, args: List[str]) -> None:
    """`python SCRIPT ARGS`, in this process (it is kfdeploy code either way, and torch is imported once)."""
    path = page.workspace / args[0]
    argv = [str(path), *args[1:]]
    with apps_that_would_block(argv) if args[0] == "demos/app.py" else contextlib.nullcontext(), mock.patch.object(sys, "argv", argv):
        try:
            runpy.run_path(str(path), run_name="__main__")
        except SystemExit as exc:
            assert exc.code in (0, None), f"`python {shlex.join(args)}` exited with {exc.code}"


def curl(page: Page, args: List[str]) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    argv = ["curl", "--fail", "--silent", "--show-error", *args]  # an HTTP error fails the example
    done = subprocess.run(argv, cwd=page.workspace, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"`{shlex.join(argv)}` exited with {done.returncode}: {done.stderr[-2000:]}"
    print(done.stdout)


def extras() -> set:
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    return set(config["options.extras_require"])


def check_pip(args: List[str]) -> None:
    """pip lines are checked, not run (the suite runs inside what the README's own install
    made): the extras they name exist, and a wheel they name is the one `pip wheel` makes."""
    assert args[0] in ("install", "wheel"), f"pip {args[0]}: the docs test checks pip install and pip wheel only"
    words = [a for a in args[1:] if not a.startswith("-")]
    if "-w" in args:
        words.remove(args[args.index("-w") + 1])
    assert words, f"pip {shlex.join(args)} installs nothing"
    for word in words:
        target, _, named = word.partition("[")
        wanted = set(filter(None, named.rstrip("]").split(",")))
        assert wanted <= extras(), f"pip {shlex.join(args)}: no extra {sorted(wanted - extras())} in setup.cfg"
        if target.endswith(".whl"):
            assert Path(target).name == f"kfdeploy-{kfdeploy.__version__}-py3-none-any.whl", target
        else:
            assert target == ".", f"pip {shlex.join(args)}: the pages install from the checkout (.)"


def ci_test_command() -> str:
    lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line.strip() and not line.startswith("#")]
    return lines[-1]


def run_command(page: Page, argv: List[str], line: str) -> None:
    name, args = argv[0], argv[1:]
    if name == "kfdeploy":
        kfdeploy_command(page, args)
    elif name == "python" and args[:2] == ["-m", "kfdeploy"]:
        kfdeploy_command(page, args[2:])
    elif name == "python" and args[:2] == ["-m", "pytest"]:
        # this very suite: the README gives it, .ci/run runs it verbatim
        assert line == ci_test_command(), f"the README's test command {line!r} is not .ci/run's last line {ci_test_command()!r}"
    elif name == "python":
        script(page, args)
    elif name == "pip":
        check_pip(args)
    elif name == "curl":
        curl(page, args)
    else:
        raise AssertionError(f"tests/test_docs.py cannot run `{name}`: teach it how, or mark the block "
                             '<!-- skip: next "why" --> (docs/development.md)')


def commands(source: str, workspace: Path):
    """(argv, line) for each command of a shell block: `\\` continuations joined, comments
    dropped, `&&` split, $PWD and globs expanded as a shell would."""
    for line in source.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        argv: List[str] = []
        for word in [*words, "&&"]:
            if word != "&&":
                word = word.replace("$PWD", str(workspace))
                matches = sorted(str(p.relative_to(workspace)) for p in workspace.glob(word)) if any(c in word for c in "*?[") else []
                argv.extend(matches or [word])
            elif argv:
                yield argv, line.strip()
                argv = []


# -- evaluators -----------------------------------------------------------------------------

def run_shell(example: Example) -> None:
    page = OPENED[example.path]
    for argv, line in commands(page.rewrite(example.parsed), page.workspace):
        run_command(page, argv, line)


def run_python(example: Example) -> None:
    page = OPENED[example.path]
    source = pad(page.rewrite(example.parsed), example.line + example.parsed.line_offset)
    exec(compile(source, example.path, "exec", dont_inherit=True), example.namespace)


def write_file(example: Example) -> None:
    """A Python block titled with a path is a file the page asks the reader to write."""
    target = OPENED[example.path].workspace / example.region.lexemes["path"]
    compile(example.parsed, str(target), "exec")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(example.parsed)


def set_small(example: Example) -> None:
    OPENED[example.path].small = list(zip(*[iter(shlex.split(example.parsed))] * 2))


class FileBlockParser:
    lexer = RawFencedCodeBlockLexer(info_pattern=re.compile(r'python title="(?P<path>[^"]+)"$\n', re.MULTILINE))

    def __call__(self, document: Document):
        for region in self.lexer(document):
            yield Region(region.start, region.end, region.lexemes["source"], write_file, region.lexemes)


class SmallParser:
    lexer = DirectiveInHTMLCommentLexer(directive="docs-small", arguments=".*?")

    def __call__(self, document: Document):
        for region in self.lexer(document):
            yield Region(region.start, region.end, region.lexemes["arguments"], set_small)


PARSERS = [CodeBlockParser("python", run_python), CodeBlockParser("bash", run_shell), FileBlockParser(), SmallParser(),
           SkipParser()]
CODE = (run_python, run_shell, write_file)


def examples():
    """A pytest param per code block: (document, [the directives before it..., the block], last of its page)."""
    params = []
    for path in PAGES:
        document = Document.parse(str(path), *PARSERS)
        pending: List[Example] = []
        blocks = []
        for example in document:
            pending.append(example)
            if example.region.evaluator in CODE:
                blocks.append((pending, f"{path.relative_to(REPO)}:{example.line}"))
                pending = []
        params += [pytest.param(document, chain, i == len(blocks) - 1, id=name) for i, (chain, name) in enumerate(blocks)]
    return params


@pytest.mark.parametrize("document, chain, last", examples())
def test_example(document, chain, last, request):
    page = open_page(document, request)
    try:
        if page.failed:
            pytest.skip(f"an earlier example on this page failed ({page.failed})")
        with in_workspace(page):
            for example in chain:
                example.evaluate()
    except unittest.SkipTest as skip:  # a skip directive's: its reason, and where
        pytest.skip(f"{request.node.callspec.id}: {skip}")
    except pytest.skip.Exception:
        raise
    except BaseException:
        page.failed = request.node.callspec.id
        raise
    finally:
        if last:
            page.running.close()


def test_the_site_builds_with_no_broken_links(tmp_path):
    """`mkdocs build --strict`: a broken link or anchor, a nav entry without a page or a page
    outside the nav fails it; the command-line pages are made from the parser as it builds."""
    from kfdeploy.cli import COMMANDS

    site = tmp_path / "site"
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(REPO / "mkdocs.yml"),
                            "--site-dir", str(site)], capture_output=True, text=True, timeout=300, cwd=REPO,
                           env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert built.returncode == 0, built.stderr[-3000:]
    for command in COMMANDS:
        page = (site / "cli" / command / "index.html").read_text()
        assert f"usage: kfdeploy {command}" in page and "examples:" in page, command
    assert (site / "assets" / "demos" / "screenshot.png").read_bytes() == (REPO / "demos" / "screenshot.png").read_bytes()
