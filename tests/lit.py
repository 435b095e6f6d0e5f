"""A tiny LightningModule and data for real Trainer runs in the tests (a second or two each on 2 CPU cores)."""

from __future__ import annotations

import lightning.pytorch as pl
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

IMG = 32


class LitViT(pl.LightningModule):
    def __init__(self, depth: int = 2, num_classes: int = 3, lr: float = 0.05, drop: float = 0.0, **kwargs):
        super().__init__()
        self.model = timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            img_size=IMG,
            patch_size=8,
            depth=depth,
            embed_dim=48,
            num_heads=3,
            num_classes=num_classes,
            drop_rate=drop,
            attn_drop_rate=drop,
            **kwargs,
        )
        self.lr = lr
        self.train_losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        loss = torch.nn.functional.cross_entropy(self(batch[0]), batch[1])
        self.train_losses.append(loss.detach().float().item())
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", torch.nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class LitViTHparams(LitViT):
    """Saves its init arguments, as LightningCLI users' modules do (the CLI then adds `_class_path`)."""

    def __init__(self, depth: int = 2, lr: float = 0.05):
        super().__init__(depth=depth, lr=lr)
        self.save_hyperparameters()


class LitViTDeeper(LitViT):
    """Another architecture: a checkpoint of LitViT does not fit it."""

    def __init__(self, **kwargs):
        super().__init__(depth=3, **kwargs)


def dataset(n: int = 32, num_classes: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, IMG, IMG, generator=g), torch.randint(0, num_classes, (n,), generator=g))


def loaders(n: int = 32, batch_size: int = 8) -> tuple[DataLoader, DataLoader]:
    return (
        DataLoader(dataset(n, seed=0), batch_size=batch_size, shuffle=True),
        DataLoader(dataset(16, seed=1), batch_size=batch_size),
    )


def trainer(tmp_path, callbacks, logger=True, **kwargs) -> pl.Trainer:
    if logger is True:
        logger = pl.loggers.TensorBoardLogger(tmp_path, name="tb")
    options = dict(
        max_epochs=2,
        limit_train_batches=4,
        limit_val_batches=2,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
        default_root_dir=tmp_path,
    )
    return pl.Trainer(callbacks=callbacks, logger=logger, **{**options, **kwargs})


def read_events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc
