from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import MODELS, input_for, make_vit

from lightning_attn import attention_maps
from lightning_attn.capture import find_attention_modules
from lightning_attn.maps import METHODS
from lightning_attn.rollout import grad_rollout, relevance_propagation

import reference

GRAD = ("grad_rollout", "relevance")


def _rows(mats: np.ndarray, key: str, grid: tuple[int, int]) -> np.ndarray:
    _, _, prefix, query = MODELS[key]
    rows = reference.query_rows(mats, prefix, query)
    return rows.reshape(*rows.shape[:2], *grid)


@pytest.mark.parametrize("key", ["vit", "gap", "deit_distilled"])
def test_gradient_maps_equal_float64_reference(key):
    model = make_vit(key)
    x = input_for(key, batch=3)
    targets = [5, 17, 900]  # a different class per image: a batch-wide target would go unnoticed
    atts, grads, _ = reference.attention_gradients_float64(model, x, targets)
    for ratio in (0.0, 0.9):
        maps = attention_maps(model, x, methods=GRAD, discard_ratio=ratio, target=torch.tensor(targets))
        assert maps.query == MODELS[key][3] and maps.target.tolist() == targets
        assert maps.grad_rollout.dtype == maps.relevance.dtype == torch.float32
        expected_gr = _rows(reference.grad_rollout(atts, grads, ratio), key, maps.grid_size)
        np.testing.assert_allclose(maps.grad_rollout.numpy(), expected_gr, atol=1e-5, rtol=1e-4)
    expected_rel = _rows(reference.relevance(atts, grads), key, maps.grid_size)
    np.testing.assert_allclose(maps.relevance.numpy(), expected_rel, atol=1e-5, rtol=1e-4)
    # the maps must depend on the target, else the comparison above proves little
    other = attention_maps(model, x, methods=GRAD, target=0)
    assert not torch.allclose(other.relevance, maps.relevance, atol=1e-4)


def test_each_gradient_is_paired_with_its_own_layer():
    model = make_vit("vit")
    x = input_for("vit", batch=2)
    atts, grads, _ = reference.attention_gradients_float64(model, x)
    a = [torch.from_numpy(v) for v in atts]
    g = [torch.from_numpy(v) for v in grads]
    # backward hooks fire last layer first; zipping them with forward-order attentions pairs them wrongly
    for rule in (grad_rollout, relevance_propagation):
        assert not torch.allclose(rule(a, g), rule(a, g[::-1]), atol=1e-4)
    maps = attention_maps(model, x, methods=GRAD)
    swapped = _rows(reference.relevance(atts, grads[::-1]), "vit", maps.grid_size)
    assert not np.allclose(maps.relevance.numpy(), swapped, atol=1e-4)


def test_default_target_is_the_prediction_and_int_or_tensor_targets_work():
    model = make_vit("vit")
    x = input_for("vit", batch=3)
    maps = attention_maps(model, x, methods=("relevance",))
    assert maps.target.dtype == torch.long and maps.target.shape == (3,)
    assert torch.equal(maps.target, maps.logits.argmax(-1))
    explicit = attention_maps(model, x, methods=("relevance",), target=maps.target.int())
    torch.testing.assert_close(explicit.relevance, maps.relevance)
    assert attention_maps(model, x, methods=("grad_rollout",), target=7).target.tolist() == [7, 7, 7]
    assert attention_maps(model, x, methods=("grad_rollout",), target=torch.tensor(2)).target.tolist() == [2, 2, 2]
    assert attention_maps(model, x, target=7).target is None  # no gradient method ran


def test_raw_and_rollout_from_the_gradient_pass_equal_the_streaming_pass():
    model = make_vit("vit")
    x = input_for("vit", batch=3)
    kw = dict(head_fusion="max", discard_ratio=0.5, keep_matrices=[0, 2])
    streamed = attention_maps(model, x, **kw)
    both = attention_maps(model, x, methods=METHODS, **kw)
    torch.testing.assert_close(both.raw, streamed.raw, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(both.rollout, streamed.rollout, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(both.matrices[2], streamed.matrices[2], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(both.logits, streamed.logits, atol=1e-5, rtol=1e-5)
    assert all(both[m].shape == (3, 3, 4, 4) for m in METHODS)
    assert streamed.grad_rollout is None
    with pytest.raises(KeyError, match="relevance"):
        streamed["relevance"]


def test_parameter_grads_hooks_flags_and_modes_are_left_as_they_were():
    model = make_vit("vit", drop_rate=0.1, attn_drop_rate=0.1)
    model.train()
    model.blocks[1].eval()
    params = list(model.parameters())
    for i, p in enumerate(params):
        p.grad = torch.full_like(p, float(i)) if i % 2 else None
    requires = [p.requires_grad for p in params]
    maps = attention_maps(model, input_for("vit"), methods=METHODS)
    assert all(
        (p.grad is None) if i % 2 == 0 else torch.equal(p.grad, torch.full_like(p, float(i)))
        for i, p in enumerate(params)
    )
    assert [p.requires_grad for p in params] == requires
    assert model.training and model.blocks[0].training and not model.blocks[1].training
    assert all(m.fused_attn for _, m in find_attention_modules(model))
    assert all(not (m._forward_hooks or m._backward_hooks or m._forward_pre_hooks) for m in model.modules())
    # eval mode during the pass: no dropout, so the maps are those of the model in eval
    torch.testing.assert_close(maps.relevance, attention_maps(model.eval(), input_for("vit"), methods=GRAD).relevance)


def test_works_under_no_grad_inference_mode_and_with_frozen_parameters():
    model = make_vit("vit")
    x = input_for("vit", batch=2)
    expected = attention_maps(model, x, methods=GRAD)
    with torch.no_grad():
        got = attention_maps(model, x, methods=GRAD)
    torch.testing.assert_close(got.relevance, expected.relevance)
    with torch.inference_mode():  # trainer.validate(): images and everything made here are inference tensors
        got = attention_maps(model, x.clone(), methods=GRAD)
    torch.testing.assert_close(got.grad_rollout, expected.grad_rollout)
    torch.testing.assert_close(got.relevance, expected.relevance)
    model.requires_grad_(False)
    got = attention_maps(model, x, methods=GRAD)
    torch.testing.assert_close(got.relevance, expected.relevance)
    assert not any(p.requires_grad for p in model.parameters())


def test_gradient_maps_under_bf16_autocast_are_float32_and_finite():
    model = make_vit("vit")
    x = input_for("vit")
    exact = attention_maps(model, x, methods=GRAD)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = attention_maps(model, x, methods=GRAD, target=exact.target)
    assert low.relevance.dtype == low.grad_rollout.dtype == torch.float32
    assert torch.isfinite(low.relevance).all() and torch.isfinite(low.grad_rollout).all()
    torch.testing.assert_close(low.grad_rollout, exact.grad_rollout, atol=0.05, rtol=0.2)


def test_bad_targets_and_headless_models_raise():
    model = make_vit("vit")
    x = input_for("vit", batch=2)
    with pytest.raises(ValueError, match=r"class indices in \[0, 1000\)"):
        attention_maps(model, x, methods=GRAD, target=1000)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        attention_maps(model, x, methods=GRAD, target=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="integer tensor"):
        attention_maps(model, x, methods=GRAD, target=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="sequence of names"):
        attention_maps(model, x, methods="relevance")
    # the out-of-range target raised inside the recording: still nothing left behind
    assert all(m.fused_attn for _, m in find_attention_modules(model))
    with pytest.raises(ValueError, match="no classification head"):
        attention_maps(make_vit("vit", num_classes=0), x, methods=GRAD)
    headless = make_vit("vit", num_classes=0, global_pool="")
    headless.num_classes = None  # a wrapper that does not say: caught by the shape of its output
    with pytest.raises(ValueError, match=r"needs \(B, num_classes\) class logits"):
        attention_maps(headless, x, methods=GRAD)
    assert all(not m._forward_hooks for m in model.modules())


def test_gradient_pure_functions_check_their_inputs():
    a = [torch.softmax(torch.randn(1, 2, 4, 4), -1) for _ in range(2)]
    with pytest.raises(ValueError, match="one gradient per layer"):
        relevance_propagation(a, a[:1])
    with pytest.raises(ValueError, match="layer 1: gradient shape"):
        grad_rollout(a, [a[0], a[1][:, :1]])
    with pytest.raises(ValueError, match="empty"):
        grad_rollout([], [])
    with pytest.raises(ValueError, match="discard_ratio"):
        grad_rollout(a, a, discard_ratio=1.0)
