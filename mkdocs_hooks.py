"""mkdocs hooks: the command-line reference and the pictures, taken from their sources at build time.

- A page per `kfdeploy` command, `cli/<command>.md`, holding that command's `--help` as the
  parser prints it, and `cli/index.md` listing them: written from `kfdeploy.cli.build_parser()`
  on every build, so the reference cannot drift from the code. The nav's `cli/index.md`
  entry becomes a section with every command's page.
- The pictures the pages show live where the benchmarks and tests write them
  (`benchmarks/results/*.png`, `demos/screenshot.png`); they are served from `assets/<path>`
  rather than copied into docs/, where a copy would go stale.
"""
from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

from mkdocs.structure.files import File

REPO = Path(__file__).resolve().parent
PICTURES = ["benchmarks/results/*.png", "demos/*.png"]
CLI_INDEX = "cli/index.md"
HELP_WIDTH = "80"  # argparse wraps help to $COLUMNS: fixed, so the pages do not depend on the terminal that built them


def _commands() -> dict[str, argparse.ArgumentParser]:
    from kfdeploy.cli import build_parser

    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {"": parser, **subparsers.choices}


@contextlib.contextmanager
def _columns():
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_WIDTH
    try:
        yield
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before


def _page(name: str, parser: argparse.ArgumentParser) -> str:
    title = f"kfdeploy {name}".strip()
    with _columns():
        help_text = parser.format_help()
    return f"# `{title}`\n\n{parser.description or ''}\n\n```text\n{help_text}```\n"


def _index(commands: dict) -> str:
    rows = "\n".join(f"| [`kfdeploy {name}`]({name}.md) | {parser.description} |" for name, parser in commands.items() if name)
    with _columns():
        overview = commands[""].format_help()
    return (f"# Command line\n\nEvery page here is the command's own `--help`, written from the parser at build time.\n\n"
            f"| command | what it does |\n|---|---|\n{rows}\n\n```text\n{overview}```\n")


def on_config(config):
    names = [name for name in _commands() if name]
    section = [CLI_INDEX, *({f"kfdeploy {name}": f"cli/{name}.md"} for name in names)]
    config.nav = [{key: section} if value == CLI_INDEX else {key: value}
                  for item in config.nav for key, value in item.items()]
    return config


def on_files(files, config):
    commands = _commands()
    files.append(File.generated(config, CLI_INDEX, content=_index(commands)))
    for name, parser in commands.items():
        if name:
            files.append(File.generated(config, f"cli/{name}.md", content=_page(name, parser)))
    for pattern in PICTURES:
        for picture in sorted(REPO.glob(pattern)):
            files.append(File.generated(config, f"assets/{picture.relative_to(REPO).as_posix()}", abs_src_path=str(picture)))
    return files
