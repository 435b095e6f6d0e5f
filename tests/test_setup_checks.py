"""Settings that can never work, and inputs the monitor cannot read, fail at setup (or at construction) with one
message naming the problem and the fix, before any training step: not at every pass of a run that logs nothing."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import timm
import torch

from lightning_attn import AttentionMonitor

import families
import lit


class _Holder(pl.LightningModule):
    """Any model in a LightningModule; a training step would mean setup let a bad setting through."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        raise AssertionError("setup should have refused the monitor's settings")

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _timm(name: str = "vit_tiny_patch16_224", **kwargs) -> torch.nn.Module:
    return timm.create_model(
        name, pretrained=False, img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3, **kwargs
    )


MODELS = {
    "timm": lambda: _timm(),
    "timm_gap": lambda: _timm("vit_base_patch16_gap_224"),
    "timm_dynamic": lambda: _timm(dynamic_img_size=True),
    "hf": lambda: families.make_hf("vit_cls"),
    "torchvision": lambda: families.make_torchvision(),
}


@pytest.mark.parametrize(
    "model, kwargs, match",
    [
        ("timm", dict(query="cls_dist"), "no distillation token: use query='auto'"),
        ("hf", dict(query="cls_dist"), "ViTForImageClassification has none: use query='auto'"),
        ("torchvision", dict(query="cls_dist"), "VisionTransformer has none: use query='auto'"),
        ("timm_gap", dict(query="cls"), "has no class token; use query='mean'"),
        ("timm_gap", dict(query="cls", probes=2), "has no class token; use query='mean'"),  # probes from the loader
        (
            "timm_dynamic",
            dict(probes=torch.randn(2, 3, 36, 36)),
            r"36x36 but VisionTransformer cuts 8x8 patches: resize them to a multiple of the patch \(e\.g\. 32x32\)",
        ),
    ],
)
def test_settings_that_can_never_work_fail_at_setup(tmp_path, model, kwargs, match):
    if model == "hf":
        pytest.importorskip("transformers")
    monitor = AttentionMonitor(**{"probes": families.images(2), "mean": (0.5,) * 3, "std": (0.5,) * 3, **kwargs})
    trainer = lit.trainer(tmp_path, [monitor], max_epochs=1)
    with pytest.raises(ValueError, match=match):
        trainer.fit(_Holder(MODELS[model]()), *lit.loaders())
    assert trainer.global_step == 0
