"""Settings that can never work, and inputs the monitor cannot read, fail at setup (or at construction) with one
message naming the problem and the fix, before any training step: not at every pass of a run that logs nothing."""

from __future__ import annotations

import re

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


def _bad_image(tmp_path, kind: str):
    from PIL import Image

    path = tmp_path / f"{kind}.png"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("a caption, not an image")
    elif kind == "truncated":
        Image.new("RGB", (32, 32), (200, 10, 10)).save(path)
        path.write_bytes(path.read_bytes()[:40])
    else:  # "bomb": more pixels than PIL opens (its limit lowered, as a huge file would exceed the real one)
        Image.new("RGB", (32, 32)).save(path)
    return path


@pytest.mark.parametrize(
    "kind, match",
    [
        ("empty", "is not an image file PIL can open"),
        ("text", "is not an image file PIL can open"),
        ("truncated", "is not an image file PIL can open"),
        ("bomb", r"has more pixels than PIL opens by default .*raise `PIL\.Image\.MAX_IMAGE_PIXELS`"),
    ],
)
def test_unreadable_probe_images_name_the_file_in_the_callback_and_the_command(
    tmp_path, monkeypatch, capsys, kind, match
):
    from PIL import Image

    from lightning_attn.cli import main

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 32 * 32 // 4)  # 4x over it: DecompressionBombError
    path = _bad_image(tmp_path, kind)
    monitor = AttentionMonitor([path], mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(ValueError, match=f"{kind}.png.*{match}"):
        lit.trainer(tmp_path, [monitor], max_epochs=1).fit(_Holder(_timm()), *lit.loaders())
    assert main(["render", "timm:vit_tiny_patch16_224", str(path), "-o", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"{kind}.png" in err and "Traceback" not in err
    assert re.search(match, err)


def test_a_transform_that_returns_no_tensor_fails_at_setup(tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 40), (10, 200, 10)).save(tmp_path / "ok.png")
    monitor = AttentionMonitor([tmp_path / "ok.png"], transform=lambda image: image.resize((32, 32)))
    with pytest.raises(ValueError, match=r"`transform` returned Image, not a \(C, H, W\) tensor: end it with"):
        lit.trainer(tmp_path, [monitor], max_epochs=1).fit(_Holder(_timm()), *lit.loaders())


class _Wrapper(torch.nn.Module):
    """A backbone that holds the ViT one level down, as lightly's `MaskedVisionTransformerTIMM` does."""

    def __init__(self) -> None:
        super().__init__()
        self.vit = _timm()

    def forward(self, x):
        return self.vit(x)


@pytest.mark.parametrize(
    "model, kwargs, match",
    [
        (
            lambda: _Wrapper(),
            dict(module="model"),
            r"`module='model'` is a _Wrapper, which holds the ViT at \['model\.vit'\]: pass `module='model\.vit'`",
        ),
        (
            lambda: _timm(),
            dict(probes=2, batch_to_probes=lambda batch: "images"),
            r"`batch_to_probes` must return images \(a \(B, C, H, W\) tensor\) or \(images, labels\), got str",
        ),
    ],
)
def test_messages_point_the_right_way_at_setup(tmp_path, model, kwargs, match):
    monitor = AttentionMonitor(**{"probes": families.images(2), "mean": (0.5,) * 3, "std": (0.5,) * 3, **kwargs})
    with pytest.raises(ValueError, match=match):
        lit.trainer(tmp_path, [monitor], max_epochs=1).fit(_Holder(model()), *lit.loaders())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(writer=object()), r"`writer` must be None .* got <object object"),
        (dict(labels=torch.tensor([[0], [1]])), r"`labels` must be 1-D.*got shape \(2, 1\): pass `labels\.view\(-1\)`"),
    ],
)
def test_messages_point_the_right_way_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttentionMonitor(families.images(2), **kwargs)


def test_a_target_beyond_the_classes_names_the_option(tmp_path, capsys):
    from PIL import Image

    from lightning_attn.cli import main

    Image.new("RGB", (40, 40), (10, 200, 10)).save(tmp_path / "ok.png")
    args = ["render", "timm:vit_tiny_patch16_224", str(tmp_path / "ok.png"), "-o", str(tmp_path), "--target", "99999"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "`--target 99999` is out of range: timm:vit_tiny_patch16_224 has 1000 classes (0..999)" in err
    assert "`labels`" not in err and len(err.strip().splitlines()) == 1
