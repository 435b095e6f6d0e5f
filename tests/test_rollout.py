from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_attn import attention_rollout, discard_weakest, fuse_heads, record_attention, residual_transition

from conftest import input_for, make_vit
import reference


def _random_attention(b=3, h=4, n=9, layers=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.softmax(3 * torch.randn(b, h, n, n, generator=g), dim=-1) for _ in range(layers)]


@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard_ratio", [0.0, 0.5, 0.9])
def test_rollout_equals_float64_reference_on_random_attention(head_fusion, discard_ratio):
    atts = _random_attention()
    got = attention_rollout(atts, head_fusion, discard_ratio)
    expected = reference.rollout(atts, head_fusion, discard_ratio)
    assert got.dtype == torch.float32 and got.shape == (3, 4, 9, 9)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard_ratio", [0.0, 0.9])
def test_rollout_equals_reference_on_a_real_vit(head_fusion, discard_ratio):
    model = make_vit("vit")
    with torch.no_grad(), record_attention(model) as rec:
        model(input_for("vit", batch=4))
    got = attention_rollout(rec.attentions, head_fusion, discard_ratio)
    np.testing.assert_allclose(got.numpy(), reference.rollout(rec.attentions, head_fusion, discard_ratio), atol=1e-5)


def test_discard_touches_every_sample_and_never_entry_00():
    fused = fuse_heads(_random_attention(b=4, layers=1)[0])
    fused[:, 0, 0] = 0.0  # the smallest entry of all, still kept
    out = discard_weakest(fused, 0.5)
    k = (9 * 9) // 2
    for s in range(4):
        zeroed = (out[s] == 0) & (fused[s] != 0)
        assert int(zeroed.sum()) == k, f"sample {s}: discard must apply to every batch element"
    assert torch.equal(out[:, 0, 0], fused[:, 0, 0])
    assert torch.equal(discard_weakest(fused, 0.0), fused)


def test_residual_transition_normalises_rows_not_columns():
    # rows that no longer sum to 1, as after a discard: that is where the axis matters
    f = torch.tensor([[[0.9, 0.1], [0.2, 0.0]]])
    a = residual_transition(f)
    torch.testing.assert_close(a, torch.tensor([[[1.9 / 2, 0.1 / 2], [0.2 / 1.2, 1.0 / 1.2]]]))
    # the copied code's `a / a.sum(dim=-1)` divides column j by row j's sum: different, and its rows don't sum to 1
    wrong = (f + torch.eye(2)) / (f + torch.eye(2)).sum(dim=-1)
    assert not torch.allclose(wrong, a)


def test_rollout_rows_sum_to_one_and_bad_arguments_raise():
    r = attention_rollout(_random_attention(), "max", 0.3)
    torch.testing.assert_close(r.sum(-1), torch.ones(3, 4, 9))
    with pytest.raises(ValueError, match="head_fusion"):
        attention_rollout(_random_attention(), "median")
    with pytest.raises(ValueError, match=r"discard_ratio.*\[0, 1\)"):
        attention_rollout(_random_attention(), "mean", 1.0)
    with pytest.raises(ValueError, match="empty"):
        attention_rollout([])
    with pytest.raises(ValueError, match=r"\(B, heads, N, N\)"):
        fuse_heads(torch.rand(2, 3, 4))


def test_bfloat16_attention_is_upcast():
    atts = [a.bfloat16() for a in _random_attention()]
    r = attention_rollout(atts)
    assert r.dtype == torch.float32
    np.testing.assert_allclose(r.numpy(), reference.rollout(atts), atol=1e-5)
