"""The README's examples run as written."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_a_python_quick_start() -> None:
    assert _python_blocks()


@pytest.mark.parametrize("block", _python_blocks())
def test_readme_python_example_runs(block: str, tmp_path: Path) -> None:
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(block, str(README), "exec"), {})
    finally:
        os.chdir(cwd)
    assert (tmp_path / "checkpoints").is_dir()


def test_the_readme_says_to_activate_the_environment_right_after_the_two_commands() -> None:
    section = README.read_text().split("## The two commands", 1)[1].split("\n## ", 1)[0]
    assert ". .venv/bin/activate" in section


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_demo_trains_into_its_own_directory_and_prints_the_next_commands() -> None:
    recipe = subprocess.run(["make", "-n", "demo"], cwd=README.parent, capture_output=True, text=True, check=True)
    training = [line for line in recipe.stdout.splitlines() if "-m craft_train --demo" in line]
    assert training and all("--save-dir checkpoints_demo" in line for line in training), recipe.stdout
    assert "checkpoints_improved" not in "".join(training)
    assert ". .venv/bin/activate" in recipe.stdout and "--resume auto" in recipe.stdout


def test_every_docs_link_in_the_readme_names_a_file_that_exists() -> None:
    links = re.findall(r"\]\(((?:docs|benchmarks)/[^)#\s]+)", README.read_text())
    assert any(link.startswith("docs/") for link in links)
    missing = [link for link in links if not (README.parent / link).is_file()]
    assert not missing, f"README links to missing files: {missing}"


def test_every_relative_link_between_docs_pages_resolves() -> None:
    missing = []
    for page in (README.parent / "docs").glob("*.md"):
        for link in re.findall(r"\]\(([^)#\s:]+)", page.read_text()):
            if not (page.parent / link).exists():
                missing.append(f"{page.name} -> {link}")
    assert not missing, f"broken links in docs/: {missing}"
