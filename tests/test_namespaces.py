"""The standalone `pytorch_lightning` package, which many projects still import, gets everything `lightning.pytorch`
does: the callback in its Trainer, its loggers recognised by what they can do, checkpoints and resume."""

from __future__ import annotations

import pytest
import timm
import torch

from lightning_attn import AttentionMonitor

import lit

PL = pytest.importorskip("pytorch_lightning")


class LitPL(PL.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            img_size=lit.IMG,
            patch_size=8,
            depth=2,
            embed_dim=48,
            num_heads=3,
            num_classes=3,
        )

    def training_step(self, batch, _):
        return torch.nn.functional.cross_entropy(self.model(batch[0]), batch[1])

    def validation_step(self, batch, _):
        self.log("val_loss", torch.nn.functional.cross_entropy(self.model(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(tmp_path, callbacks, **kwargs):
    loggers = [PL.loggers.TensorBoardLogger(tmp_path, name="tb"), PL.loggers.CSVLogger(tmp_path, name="csv")]
    options = dict(
        max_epochs=2,
        limit_train_batches=4,
        limit_val_batches=2,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        default_root_dir=tmp_path,
        logger=loggers,
    )
    return PL.Trainer(callbacks=callbacks, **{**options, **kwargs})


def test_pytorch_lightning_trainer_and_loggers_get_everything(tmp_path):
    monitor = AttentionMonitor(2, tile_size=16, on_error="raise")  # loader probes too
    trainer = _trainer(tmp_path, [monitor], enable_checkpointing=False)
    with __import__("warnings").catch_warnings():
        __import__("warnings").filterwarnings("error", message=".*no logger.*")
        trainer.fit(LitPL(), *lit.loaders())
    acc = lit.read_events(trainer.loggers[0].log_dir)
    assert [e.step for e in acc.Images("attention/raw")] == [0, 4, 8]
    assert [e.step for e in acc.Scalars("attention_entropy/raw/layer_00")] == [0, 4, 8]
    header = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "attention_entropy/raw/layer_00" in header
    assert sorted(p.name for p in (tmp_path / "csv" / "version_0" / "attention").glob("*raw_step*")) != []


def test_pytorch_lightning_resume_and_missing_validation_data(tmp_path):
    ckpt = PL.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = AttentionMonitor(torch.randn(2, 3, lit.IMG, lit.IMG), tile_size=16)
    _trainer(tmp_path, [first, ckpt]).fit(LitPL(), *lit.loaders())
    second = AttentionMonitor(
        torch.randn(2, 3, lit.IMG, lit.IMG, generator=torch.Generator().manual_seed(0)), tile_size=16
    )
    second_probes_same = AttentionMonitor(first.probes.clone(), tile_size=16)
    _trainer(tmp_path, [second_probes_same, PL.callbacks.ModelCheckpoint(dirpath=tmp_path / "c2")], max_epochs=3).fit(
        LitPL(), *lit.loaders(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    assert [s for s, _ in second_probes_same.runner.history] == [0, 4, 8, 12]
    del second
    with pytest.raises(ValueError, match="has none"):  # pytorch_lightning's own exception class is recognised
        _trainer(tmp_path / "n", [AttentionMonitor(4)]).fit(LitPL(), lit.loaders()[0])
