from __future__ import annotations

import pytest
import timm
import torch

# Small enough to run in milliseconds on 2 CPU cores; the dims override keeps every family tiny.
TINY = dict(pretrained=False, embed_dim=48, num_heads=3, depth=3)

MODELS = {
    # name: (timm model, kwargs, expected prefix tokens, expected query)
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8), 1, "cls"),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=8), 2, "cls_dist"),
    "reg4": ("vit_small_patch14_reg4_dinov2", dict(img_size=42, patch_size=14), 5, "cls"),
    "gap": ("vit_base_patch16_gap_224", dict(img_size=32, patch_size=8), 0, "mean"),
    "reg4_gap": ("vit_betwixt_patch16_reg4_gap_256", dict(img_size=32, patch_size=8), 4, "mean"),
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=42, patch_size=14), 1, "mean"),
    "beit": ("beit_base_patch16_224", dict(img_size=32, patch_size=8), 1, "mean"),
    "nonsquare": ("vit_tiny_patch16_224", dict(img_size=(32, 48), patch_size=8), 1, "cls"),
}


def make_vit(key: str = "vit", seed: int = 0, sharpen: float = 6.0, **overrides) -> torch.nn.Module:
    """A tiny timm model; `sharpen` scales the q/k projections so freshly initialised attention is far from
    uniform (else every map is flat and a wrong row or axis would go unnoticed)."""
    name, kwargs, _, _ = MODELS[key]
    torch.manual_seed(seed)
    model = timm.create_model(name, **{**TINY, **kwargs, **overrides}).eval()
    with torch.no_grad():
        for module in model.modules():
            for proj in ("qkv", "q_proj", "k_proj"):
                if isinstance(getattr(module, proj, None), torch.nn.Linear):
                    getattr(module, proj).weight.mul_(sharpen)
    return model


def input_for(key: str, batch: int = 3, seed: int = 1) -> torch.Tensor:
    img = MODELS[key][1]["img_size"]
    h, w = (img, img) if isinstance(img, int) else img
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, h, w, generator=g)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models gain nothing from intra-op threads, and on shared cores a descheduled OpenMP worker stalls every
    # small op (measured: ~15x slower with 2 threads under load). Restored after each test.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_vit() -> torch.nn.Module:
    return make_vit("vit")
