from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import input_for, make_vit

from lightning_attn import attention_rollout, discard_weakest, fuse_heads, record_attention, residual_transition
from lightning_attn.rollout import grad_rollout, relevance_propagation

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


def _random_gradients(b=3, h=4, n=9, layers=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, n, generator=g) for _ in range(layers)]


@pytest.mark.parametrize("discard_ratio", [0.0, 0.5, 0.9])
def test_grad_rollout_equals_float64_reference_on_random_inputs(discard_ratio):
    atts, grads = _random_attention(), _random_gradients()
    got = grad_rollout(atts, grads, discard_ratio)
    expected = reference.grad_rollout(
        [a.double().numpy() for a in atts], [g.double().numpy() for g in grads], discard_ratio
    )
    assert got.dtype == torch.float32 and got.shape == (3, 4, 9, 9)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.sum(-1), torch.ones(3, 4, 9))


def test_relevance_equals_float64_reference_and_clamps_per_head():
    atts, grads = _random_attention(), _random_gradients()
    got = relevance_propagation(atts, grads)
    expected = reference.relevance([a.double().numpy() for a in atts], [g.double().numpy() for g in grads])
    assert got.dtype == torch.float32 and got.shape == (3, 4, 9, 9)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5, rtol=1e-4)
    # one layer, two heads whose products cancel: a mean-then-clamp rule would give 0, Chefer's rule does not
    a = torch.full((1, 2, 2, 2), 0.5)
    g = torch.tensor([1.0, -1.0]).reshape(1, 2, 1, 1).expand(1, 2, 2, 2)
    # heads: max(0, 0.5) = 0.5 and max(0, -0.5) = 0, mean 0.25; R = I + 0.25 * ones @ I
    torch.testing.assert_close(relevance_propagation([a], [g])[0, 0], torch.eye(2) + 0.25)
    # while grad_rollout (vit-explain) cuts after the mean: nothing left but the residual
    torch.testing.assert_close(grad_rollout([a], [g])[0, 0], torch.eye(2))


def test_gradient_rules_upcast_bfloat16():
    atts = [a.bfloat16() for a in _random_attention()]
    grads = [g.bfloat16() for g in _random_gradients()]
    for rule, ref in ((relevance_propagation, reference.relevance), (grad_rollout, reference.grad_rollout)):
        got = rule(atts, grads)
        assert got.dtype == torch.float32
        expected = ref([a.double().numpy() for a in atts], [g.double().numpy() for g in grads])
        np.testing.assert_allclose(got.numpy(), expected, atol=1e-5, rtol=1e-4)
