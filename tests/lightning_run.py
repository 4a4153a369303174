"""A tiny LightningModule for tests/test_lightning.py, and the runs that need their own processes.

``python tests/lightning_run.py ddp DIR STEPS`` trains with DDP on 2 CPU processes (gloo) and ckptio's plugin,
resuming from ``last`` when DIR holds one; ``python tests/lightning_run.py kill DIR`` commits one checkpoint, then
starts a second whose write stops halfway, prints ``HALFWAY`` and waits to be killed.
"""

from __future__ import annotations

import os
import sys
import threading

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint


class Tiny(L.LightningModule):
    """A linear regression with Adam, 32 samples in batches of 4: 8 steps an epoch, deterministic."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Linear(4, 1)
        self.started_at: int | None = None

    def on_train_start(self) -> None:
        self.started_at = self.trainer.global_step

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        # A loss that never ties, so that top-k picks the same files on every run.
        self.log("score", float(self.global_step % 5) + 0.01 * self.global_step)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(32, 4, generator=g)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


def trainer(directory: str, max_steps: int, plugin: object, *callbacks: object, **kwargs: object) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, plugins=[plugin], callbacks=list(callbacks), logger=False,
                     enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                     default_root_dir=directory, **kwargs)


def _ddp(directory: str, steps: int) -> None:
    import ckptio.lightning

    checkpoints = ModelCheckpoint(dirpath=directory, monitor="score", every_n_train_steps=2, save_top_k=2,
                                  save_last=True)
    run = trainer(directory, steps, ckptio.lightning.CheckpointIO(), checkpoints, strategy="ddp", devices=2)
    model = Tiny()
    resume = "last" if os.path.exists(os.path.join(directory, "last.ckpt")) else None
    run.fit(model, ckpt_path=resume)
    print(f"rank {run.global_rank} started at {model.started_at} ended at {run.global_step}", flush=True)


def _kill(directory: str) -> None:
    import ckptio.fileio
    import ckptio.lightning

    plugin = ckptio.lightning.CheckpointIO()
    state = {"weights": torch.arange(1 << 18, dtype=torch.float32), "step": 1}
    plugin.save_checkpoint(state, os.path.join(directory, "first.ckpt"))
    plugin.wait()
    halfway = threading.Event()
    write = ckptio.fileio.formats.write_torch

    def stop_halfway(snapshot: object, stream: object) -> None:
        class Half:
            written = 0

            def write(self, data: object) -> int:
                n = stream.write(data)  # type: ignore[attr-defined]
                self.written += n
                if self.written > (1 << 19):
                    halfway.set()
                    threading.Event().wait()  # until the test kills this process
                return n

            def flush(self) -> None:
                pass

        write(snapshot, Half())  # type: ignore[arg-type]

    ckptio.fileio.formats.write_torch = stop_halfway  # type: ignore[assignment]
    plugin.save_checkpoint({**state, "step": 2}, os.path.join(directory, "second.ckpt"))
    halfway.wait()
    print("HALFWAY", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    if sys.argv[1] == "ddp":
        _ddp(sys.argv[2], int(sys.argv[3]))
    else:
        _kill(sys.argv[2])
