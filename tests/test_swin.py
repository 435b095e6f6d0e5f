"""Swin and Swin V2 (windowed, hierarchical attention): maps against float64 references recomputed by hand from
each window attention's inputs, locality of the first block, restoration, and a real Trainer run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_attn import attention_maps, backend_for, token_layout
from lightning_attn.layout import WindowGrid

import lit
import swin


def _images(img: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, img, img, generator=torch.Generator().manual_seed(seed))


BUILD = {"timm": swin.make_timm, "torchvision": lambda kind, img: swin.make_torchvision(kind), "hf": swin.make_hf}
BLOCKS = {"timm": swin.timm_blocks, "torchvision": swin.torchvision_blocks, "hf": swin.hf_blocks}


# 72: an 18x18 grid and a 9x9 second stage, padded to whole windows
@pytest.mark.parametrize(
    "stack, kind, img",
    [("timm", "swin", 64), ("timm", "swin", 72), ("timm", "swinv2", 72), ("torchvision", "swin", 72)]
    + [("torchvision", "swinv2", 64), ("hf", "swin", 72), ("hf", "swinv2", 64)],
)
def test_maps_equal_float64_reference(stack, kind, img):
    model = BUILD[stack](kind, img=img)
    x = _images(img)
    maps = attention_maps(model, x, methods=("raw", "rollout", "grad_rollout", "relevance"))
    plain = attention_maps(model, x)  # no gradient: Hugging Face Swin streams its heads from the kernel's q and k
    blocks, logits = BLOCKS[stack](model, x)
    assert [(b.h, b.w) for b in blocks] == [(img // 4,) * 2] * 2 + [(img // 8,) * 2] * 2
    assert any((b.index < 0).any() for b in blocks) == (img == 72)
    fine = maps.grid_size
    raw, roll = swin.reference_maps(blocks, fine, x.shape[0])
    np.testing.assert_allclose(maps.raw.flatten(2).double().numpy(), raw, atol=2e-6)
    np.testing.assert_allclose(maps.rollout.flatten(2).double().numpy(), roll, atol=2e-6)
    np.testing.assert_allclose(plain.raw.flatten(2).double().numpy(), raw, atol=2e-6)
    np.testing.assert_allclose(plain.rollout.flatten(2).double().numpy(), roll, atol=2e-6)
    targets = logits.argmax(-1).tolist()
    assert maps.target.tolist() == targets
    grads = swin.gradients(model, x, targets, stack)
    gr, rel = swin.reference_gradient_maps(blocks, grads, fine, x.shape[0])
    np.testing.assert_allclose(maps.grad_rollout.flatten(2).double().numpy(), gr, atol=1e-5)
    np.testing.assert_allclose(maps.relevance.flatten(2).double().numpy(), rel, atol=1e-5, rtol=1e-4)
    for method in ("raw", "rollout", "grad_rollout"):  # distributions over the finest patches
        torch.testing.assert_close(maps[method].sum((-2, -1)), torch.ones(2, 4), atol=1e-5, rtol=0)
    # the whole-image matrices on the patch grid (matrix pictures, the report's heads view) of a shifted block
    dense = attention_maps(model, x, methods=("raw",), keep_matrices=(3,), keep_head_matrices=(3,))
    block = blocks[3]
    for s in range(x.shape[0]):
        weights, p, q = swin._lifted(block, fine, s)
        heads = [p @ swin.stage_matrix(weights[:, h], block.index, block.h * block.w) @ q for h in range(2)]
        np.testing.assert_allclose(dense.head_matrices[3][s].double().numpy(), np.stack(heads), atol=2e-6)
        np.testing.assert_allclose(dense.matrices[3][s].double().numpy(), np.mean(heads, axis=0), atol=2e-6)


def test_timm_layout_describes_each_block():
    layout = token_layout(swin.make_timm("swin", img=72), (72, 72))
    assert layout.grid_size == (18, 18) and layout.query == "mean" and layout.num_prefix_tokens == 0
    assert layout.windows == (
        WindowGrid((18, 18), (4, 4), (0, 0), 1, True),
        WindowGrid((18, 18), (4, 4), (2, 2), 1, True),
        WindowGrid((9, 9), (4, 4), (0, 0), 2, True),
        WindowGrid((9, 9), (4, 4), (2, 2), 2, True),
    )
    with pytest.raises(ValueError, match="no class token"):
        token_layout(swin.make_timm("swin"), (64, 64), query="cls")


@pytest.mark.parametrize("stack", ["timm", "torchvision", "hf"])
def test_first_block_is_local(stack):
    model = BUILD[stack]("swin", img=64)
    x = _images(64, batch=1)
    changed = x.clone()
    changed[:, :, 16:32, 32:48] = torch.randn(1, 3, 16, 16)  # first-stage window (1, 2): tokens 4..7 x 8..11
    before = attention_maps(model, x, methods=("raw",)).raw[0, 0]
    after = attention_maps(model, changed, methods=("raw",)).raw[0, 0]
    moved = (after - before).abs() > 1e-7
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[4:8, 8:12] = True
    assert moved[inside].any() and not moved[~inside].any()


def _flags(model: torch.nn.Module) -> list:
    return [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")] + [
        m.config._attn_implementation_internal for m in model.modules() if hasattr(m, "config")
    ]


def _logits(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("stack", ["timm", "torchvision", "hf"])
def test_flags_hooks_and_training_unchanged(stack):
    model = BUILD[stack]("swin", img=64)
    flags = _flags(model)
    x, y = _images(64, batch=4), torch.tensor([0, 1, 2, 3])

    def train(monitored: bool) -> list[torch.Tensor]:
        m = BUILD[stack]("swin", img=64)
        m.train()
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for _ in range(2):
            if monitored:
                attention_maps(m, x[:2], methods=("raw", "rollout", "grad_rollout"), attention_distance=True)
            loss = torch.nn.functional.cross_entropy(_logits(m(x)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert m.training and all(mod.training for mod in m.modules())
        return [p.detach().clone() for p in m.parameters()]

    for plain, watched in zip(train(False), train(True)):
        assert torch.equal(plain, watched)
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with pytest.raises(RuntimeError, match="boom"):  # the forward raises inside the recording
        head.register_forward_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("boom")))
        attention_maps(model, x, methods=("raw", "relevance"))
    head._forward_hooks.clear()
    attention_maps(model, x, methods=("raw", "relevance"))
    attention_maps(model, x)
    assert flags == _flags(model)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not torch.overrides._get_current_function_mode_stack()
    assert backend_for(model).name == f"{stack.replace('hf', 'transformers')}_swin"


ALL = ("raw", "rollout", "grad_rollout", "relevance")


class LitSwin(lit.LitViT):
    def __init__(self, stack: str):
        super().__init__()
        self.stack = stack
        self.model = STACKS[stack](lit.IMG).train()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _logits(self.model(x) if self.stack != "hf" else self.model(pixel_values=x))


STACKS = {
    "timm": lambda img: swin.make_timm("swin", img=img, num_classes=3),
    "torchvision": lambda img: swin.make_torchvision("swinv2", num_classes=3),
    "hf": lambda img: swin.make_hf("swin", img=img, num_labels=3),
}


@pytest.mark.parametrize("stack", sorted(STACKS))
def test_fit_logs_grids_and_curves(tmp_path, stack):
    from lightning_attn import AttentionMonitor

    masks = torch.zeros(2, lit.IMG, lit.IMG, dtype=torch.bool)
    masks[:, 8:24, 8:24] = True
    monitor = AttentionMonitor(
        torch.randn(2, 3, lit.IMG, lit.IMG),
        labels=[0, 1],
        masks=masks,
        methods=ALL,
        faithfulness=True,
        faithfulness_steps=2,
        tile_size=16,
        matrix_layers=(0, -1),
        on_error="raise",
    )
    model = LitSwin(stack)
    lit.trainer(tmp_path, [monitor], max_epochs=2).fit(model, *lit.loaders())
    acc = lit.read_events(tmp_path / "tb" / "version_0")
    tags = acc.Tags()
    for method in ALL:
        assert [e.step for e in acc.Images(f"attention/{method}")] == [0, 4, 8]
        assert f"attention_faithfulness/most_first_auc/{method}" in tags["scalars"]
        assert f"attention_entropy/{method}/layer_03" in tags["scalars"]
    for tag in ("attention/matrix", "attention/heads/layer_03", "attention/filmstrip"):
        assert tag in tags["images"]
    # the first stage has one head, the second two: head distances only for the heads a block has
    assert "attention_head_distance/layer_03/head_01" in tags["scalars"]
    assert "attention_head_distance/layer_00/head_01" not in tags["scalars"]
    assert "attention_drift_baseline/rollout/mean" in tags["scalars"]
    assert all(v == v for v in monitor.last_metrics.values())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_the_docs_picture_script_draws_every_block():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from swin_windows import picture

    image = picture(tile=24)
    # a header strip, 2 probe rows; image + 4 raw maps + rollout + 4 matrices = 10 columns of 24-pixel tiles
    assert image.dtype == np.uint8 and image.shape[2] == 3 and image.shape[1] > 10 * 24
