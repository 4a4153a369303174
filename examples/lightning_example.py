"""Train a small LightningModule with ckptio's CheckpointIO plugin, then resume it from its last checkpoint.

    pip install 'ckptio[lightning]'
    python examples/lightning_example.py --dir lightning_checkpoints --steps 40
    python examples/lightning_example.py --dir lightning_checkpoints --steps 60   # resumes at step 40
    python -m ckptio verify lightning_checkpoints/last.ckpt

Checkpoints are written in the background (sealed with a digest, fsynced, renamed into place); top-k pruning never
deletes a file that is still being written; ``on_saved`` runs once a file is durable, the moment to upload it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import ckptio
import ckptio.lightning


class Regression(L.LightningModule):
    def __init__(self, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(256, 8, generator=g)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=16)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="lightning_checkpoints")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args(argv)

    def saved(checkpoint: ckptio.SavedCheckpoint) -> None:  # the writer's thread: keep it short
        print(f"durable: {os.path.basename(checkpoint.path)} ({checkpoint.size} bytes, digest {checkpoint.digest[:12]})")

    plugin = ckptio.lightning.CheckpointIO(on_saved=saved)
    checkpoints = ModelCheckpoint(dirpath=args.dir, monitor="train_loss", every_n_train_steps=10, save_top_k=2,
                                  save_last=True)
    trainer = L.Trainer(max_steps=args.steps, plugins=[plugin], callbacks=[checkpoints, plugin.callback()],
                        logger=False, enable_progress_bar=False, accelerator="cpu", default_root_dir=args.dir)
    trainer.fit(Regression(), ckpt_path="last")  # starts from scratch when there is no last.ckpt yet
    print(f"trained to step {trainer.global_step}; best: {checkpoints.best_model_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
