"""The documentation site builds with `mkdocs build --strict`."""
import os
import subprocess
import sys

from conftest import REPO


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
