"""The README's examples run as written, and the commands of every docs page use flags that exist."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import ckptio
import ckptio.dcp

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_a_python_quick_start() -> None:
    assert _python_blocks()


def _lightning_model() -> object:
    """The ``model`` the README's Lightning example leaves to the reader: 16 batches an epoch, so that its
    ``max_epochs=10`` passes ``every_n_train_steps=100`` once and writes a checkpoint."""
    lightning = pytest.importorskip("lightning")

    class Regression(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(4, 1)

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=0.01)

        def train_dataloader(self) -> torch.utils.data.DataLoader:
            x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)),
                                               batch_size=4)

    return Regression()


@pytest.mark.parametrize("block", _python_blocks())
def test_readme_python_example_runs(block: str, tmp_path: Path) -> None:
    namespace: dict[str, object] = {}
    if "ckptio.lightning" in block:
        namespace["model"] = _lightning_model()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(block, str(README), "exec"), namespace)
    finally:
        os.chdir(cwd)
    assert (tmp_path / "checkpoints").is_dir()
    if "ckptio.lightning" in block:  # the plugin wrote, sealed and renamed the files into place
        assert ckptio.verify(tmp_path / "checkpoints" / "last.ckpt").ok
    if "ckptio.dcp" in block:
        assert ckptio.dcp.verify_directory(tmp_path / "checkpoints" / "checkpoint_epoch_1_batch_100").ok


def _bash_commands(text: str) -> list[str]:
    """Each command of the ```bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def _documents() -> list[Path]:
    return [README, *sorted((README.parent / "docs").glob("*.md"))]


def _arguments(command: str, program: str) -> list[str] | None:
    """The arguments after ``program`` in ``command`` (shell bits such as ``&`` and ``"$@"`` left out)."""
    words = command.split()
    if program not in words:
        return None
    return [word for word in words[words.index(program) + 1:] if word != "&" and not word.startswith('"$')]


@pytest.mark.parametrize("page", _documents(), ids=lambda page: page.name)
def test_every_documented_trainer_command_uses_flags_the_trainer_has(page: Path) -> None:
    from craft_train import cli

    parser = cli._parser()
    wrong = []
    for command in _bash_commands(page.read_text()):
        if "craft_train.detect" in command:
            continue
        args = _arguments(command, "craft_train")
        if args is None and (README.parent / "train_with_your_data_improved.py").is_file():
            args = _arguments(command, "train_with_your_data_improved.py")
        if args is None:
            continue
        try:
            parser.parse_args(cli._underscores_to_dashes(args))
        except SystemExit:
            wrong.append(command)
    assert not wrong, f"{page.name}: commands the trainer's parser refuses: {wrong}"


@pytest.mark.parametrize("page", _documents(), ids=lambda page: page.name)
def test_every_documented_ckptio_command_parses(page: Path) -> None:
    from ckptio import cli

    parser = cli._parser()
    wrong = []
    for command in _bash_commands(page.read_text()):
        args = _arguments(command, "ckptio")
        if args is None and (README.parent / "manage_batch_checkpoints.py").is_file():
            args = _arguments(command, "manage_batch_checkpoints.py")
        if args is None:
            continue
        try:
            parsed = parser.parse_args(cli._guide_spelling(args))
        except SystemExit:
            parsed = None
        if parsed is None or parsed.command is None:
            wrong.append(command)
    assert not wrong, f"{page.name}: commands python -m ckptio refuses: {wrong}"


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


def test_the_trainer_reference_names_every_flag_of_the_trainer() -> None:
    from craft_train import cli

    reference = (README.parent / "docs" / "trainer.md").read_text()
    flags = [action.option_strings[0] for action in cli._parser()._actions if action.option_strings]
    missing = [flag for flag in flags if flag != "-h" and not re.search(re.escape(flag) + r"(?![\w-])", reference)]
    assert not missing, f"docs/trainer.md does not name {missing}"
