"""AttentionMonitor in real Trainer runs of LightningModules holding Hugging Face and torchvision ViTs."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import timm
import torch

from lightning_attn import AttentionMonitor

import families
import lit

pytest.importorskip("transformers")

ALL = ("raw", "rollout", "grad_rollout", "relevance")


class LitFamily(pl.LightningModule):
    """Classification with a ViT of any family; models without class logits get a linear head of their own."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        if kind == "torchvision":
            self.model = families.make_torchvision(num_classes=3)
        else:
            self.model = families.make_hf(kind)
        self.head = None if kind in ("torchvision", "vit_cls", "deit_teacher") else torch.nn.LazyLinear(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "torchvision":
            return self.model(x)
        if self.kind == "clip":
            out = self.model.get_image_features(pixel_values=x)
            return self.head(out if isinstance(out, torch.Tensor) else out.pooler_output)
        out = self.model(pixel_values=x)
        return out.logits[:, :3] if self.head is None else self.head(out.pooler_output)

    def training_step(self, batch, _):
        return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, _):
        self.log("val_loss", torch.nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _score(out):  # explain the image embedding's sum: a stand-in for a similarity to a text embedding
    return (out if isinstance(out, torch.Tensor) else out.pooler_output).sum(-1)


def _masks() -> torch.Tensor:
    masks = torch.zeros(2, lit.IMG, lit.IMG, dtype=torch.bool)
    masks[:, 8:24, 8:24] = True
    return masks


@pytest.mark.parametrize("kind", ["vit_cls", "deit_teacher", "torchvision", "dinov2_reg", "clip"])
def test_fit_logs_every_method_diagnostic_and_faithfulness(tmp_path, kind):
    has_logits = kind in ("vit_cls", "deit_teacher", "torchvision")
    monitor = AttentionMonitor(
        torch.randn(2, 3, lit.IMG, lit.IMG),
        labels=[0, 1] if has_logits else None,
        masks=_masks(),
        methods=ALL,
        target=None if has_logits else _score,
        faithfulness=True,
        faithfulness_steps=2,
        tile_size=16,
        on_error="raise",
    )
    model = LitFamily(kind)
    grads_before = None
    trainer = lit.trainer(tmp_path, [monitor], max_epochs=1)
    trainer.fit(model, *lit.loaders())
    grads_before = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    trainer.validate(model, lit.loaders()[1], verbose=False)  # inference_mode: gradient methods still work
    for name, p in model.named_parameters():  # the class-targeted maps never write a .grad
        assert (p.grad is None) == (grads_before[name] is None)
        if p.grad is not None:
            assert torch.equal(p.grad, grads_before[name])
    acc = lit.read_events(tmp_path / "tb" / "version_0")
    tags = acc.Tags()
    for method in ALL:
        assert f"attention/{method}" in tags["images"]
        assert [e.step for e in acc.Scalars(f"attention_pointing_game/{method}")] == [0, 4]
        assert f"attention_faithfulness/most_first_auc/{method}" in tags["scalars"]
    assert "attention/heads/layer_02" in tags["images"] and "attention/filmstrip" in tags["images"]
    assert "attention_distance/layer_02" in tags["scalars"] and "attention_drift_baseline/raw/mean" in tags["scalars"]
    assert ("attention_register_share/layer_00" in tags["scalars"]) == (kind == "dinov2_reg")
    assert all(v == v for v in monitor.last_metrics.values())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_gradient_methods_on_a_model_without_logits_need_a_target_at_setup(tmp_path):
    monitor = AttentionMonitor(torch.randn(2, 3, lit.IMG, lit.IMG), methods=("raw", "relevance"))
    with pytest.raises(ValueError, match="no class logits.*callable"):
        lit.trainer(tmp_path, [monitor], max_epochs=1).fit(LitFamily("dinov2"), *lit.loaders())
    with pytest.raises(ValueError, match="`target` must be a callable"):
        AttentionMonitor(2, target=3)


def test_unsupported_timm_family_named_with_module_fails_at_setup(tmp_path):
    class LitNaFlex(lit.LitViT):
        def __init__(self):
            super().__init__()
            self.backbone = timm.create_model(
                "naflexvit_base_patch16_gap", pretrained=False, depth=1, embed_dim=48, num_heads=3
            )

    monitor = AttentionMonitor(torch.randn(2, 3, lit.IMG, lit.IMG), module="backbone")
    with pytest.raises(ValueError, match="NaFlexViT packs.*Supported: timm VisionTransformer"):
        lit.trainer(tmp_path, [monitor], max_epochs=1).fit(LitNaFlex(), *lit.loaders())


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
@pytest.mark.parametrize("kind", ["vit_cls", "torchvision"])
def test_bf16_every_method_float32_maps(tmp_path, precision, kind):
    monitor = AttentionMonitor(
        torch.randn(2, 3, lit.IMG, lit.IMG),
        labels=[0, 1],
        masks=_masks(),
        methods=ALL,
        faithfulness=True,
        faithfulness_steps=2,
        tile_size=16,
        on_error="raise",
    )
    lit.trainer(tmp_path, [monitor], max_epochs=1, precision=precision).fit(LitFamily(kind), *lit.loaders())
    values = monitor.last_metrics
    assert 0 <= values["attention_pointing_game/relevance"] <= 1
    assert all(v == v for v in values.values())


def test_ddp_with_a_hugging_face_model_writes_once(tmp_path):
    monitor = AttentionMonitor(torch.randn(2, 3, lit.IMG, lit.IMG), tile_size=16)
    trainer = lit.trainer(tmp_path, [monitor], strategy="ddp_spawn", devices=2, max_epochs=2)
    trainer.fit(LitFamily("vit_cls"), *lit.loaders())
    (log_dir,) = {p.parent for p in (tmp_path / "tb").rglob("events.out.tfevents.*")}
    acc = lit.read_events(log_dir)
    assert [e.step for e in acc.Images("attention/raw")] == [0, 2, 4]
