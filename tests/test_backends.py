"""Hugging Face transformers and torchvision ViTs: every method against float64 references built from the models'
own eager attention (or a hand-written forward), outputs unchanged, configs and hooks restored."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from lightning_attn import attention_maps, backend_for, find_attention_modules, record_attention, token_layout
from lightning_attn.backends import find_vision_transformers
from lightning_attn.backends.transformers import _HANDLERS, _ORIGINAL
from lightning_attn.faithfulness import perturbation_curves

import families
import reference

pytest.importorskip("transformers")

GRAD = ("grad_rollout", "relevance")


def _rows(mats: np.ndarray, prefix: int, query: str, grid: tuple[int, int]) -> np.ndarray:
    rows = reference.query_rows(mats, prefix, query)
    return rows.reshape(*rows.shape[:2], *grid)


def _embedding(out):  # what the callable targets below read: a per-image score of the model's output
    if isinstance(out, torch.Tensor):
        return out.sum(-1) if out.dim() == 2 else out[:, 0].sum(-1)
    return out.pooler_output.sum(-1)


def _no_hooks(model: torch.nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def _configs(model: torch.nn.Module) -> list[dict]:
    from transformers import PreTrainedModel

    return [
        {**m.config.to_dict(), "impl": m.config._attn_implementation_internal}
        for m in model.modules()
        if isinstance(m, PreTrainedModel)
    ]


@pytest.mark.parametrize("key", sorted(families.HF_MODELS))
def test_hf_maps_equal_float64_reference_from_eager_attention(key):
    model = families.make_hf(key)
    _, _, prefix, query, resizable, _ = families.HF_MODELS[key]
    size = (32, 48) if resizable else (32, 32)  # non-square: the grid of the actual input
    x = families.images(3, size)
    atts, _, _ = families.hf_eager_float64(model, x)
    torch_atts = [torch.from_numpy(a) for a in atts]
    for fusion, ratio in (("mean", 0.0), ("max", 0.9)):
        maps = attention_maps(model, x, head_fusion=fusion, discard_ratio=ratio)
        assert maps.num_prefix_tokens == prefix and maps.query == query and maps.grid_size == (4, 6)
        raw = _rows(reference.raw_fused(torch_atts, fusion), prefix, query, maps.grid_size)
        roll = _rows(reference.rollout(torch_atts, fusion, ratio), prefix, query, maps.grid_size)
        np.testing.assert_allclose(maps.raw.numpy(), raw, atol=1e-5, rtol=1e-4)
        np.testing.assert_allclose(maps.rollout.numpy(), roll, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("key", ["vit_cls", "deit_teacher", "dinov2_cls", "dinov2_reg", "clip", "siglip"])
def test_hf_gradient_methods_equal_float64_reference(key):
    model = families.make_hf(key)
    _, _, prefix, query, _, has_logits = families.HF_MODELS[key]
    x = families.images(3)
    if has_logits:
        targets = [1, 4, 2]  # one class per image: a batch-wide target would go unnoticed
        score = lambda out: out.logits[torch.arange(3), torch.tensor(targets)]  # noqa: E731
        target = torch.tensor(targets)
    else:
        score = target = _embedding
    atts, grads, _ = families.hf_eager_float64(model, x, score)
    maps = attention_maps(model, x, methods=GRAD, discard_ratio=0.5, target=target)
    expected_gr = _rows(reference.grad_rollout(atts, grads, 0.5), prefix, query, maps.grid_size)
    expected_rel = _rows(reference.relevance(atts, grads), prefix, query, maps.grid_size)
    # float32 model against a float64 one: gradients through three sharpened layers agree to ~1e-5
    np.testing.assert_allclose(maps.grad_rollout.numpy(), expected_gr, atol=5e-5, rtol=1e-3)
    np.testing.assert_allclose(maps.relevance.numpy(), expected_rel, atol=5e-5, rtol=1e-3)
    assert (maps.target.tolist() == targets) if has_logits else maps.target is None
    # the maps must depend on the target, else the comparison above proves little
    other = attention_maps(model, x, methods=GRAD, target=0 if has_logits else lambda out: -_embedding(out))
    assert (other.relevance - maps.relevance).abs().max() > 1e-2 * maps.relevance.abs().max()


@pytest.mark.parametrize("key", ["vit_cls", "clip", "dinov2_reg"])
@pytest.mark.parametrize("methods", [("raw", "rollout"), ("raw", "grad_rollout")])
def test_hf_probe_pass_leaves_outputs_configs_and_hooks_as_they_were(key, methods):
    model = families.make_hf(key)
    x = families.images(2)
    backend = backend_for(model)
    before_configs = _configs(model)
    with torch.no_grad():
        before = backend.forward(x)
    target = _embedding if not families.HF_MODELS[key][5] else None
    maps = attention_maps(model, x, methods=methods, target=target)
    with torch.no_grad():
        after = backend.forward(x)
    plain = before if isinstance(before, torch.Tensor) else before[0]
    assert torch.equal(plain, after if isinstance(after, torch.Tensor) else after[0])
    if methods == ("raw", "rollout"):
        # the whole weights fit: the output is computed from them, the kernel's math to rounding
        got = maps.output if isinstance(maps.output, torch.Tensor) else maps.output[0]
        torch.testing.assert_close(got, plain, atol=1e-5, rtol=1e-5)
        # head by head, the model's own kernel runs with exactly its arguments: bitwise its output
        streamed = attention_maps(model, x, methods=methods, target=target, memory_budget=0).output
        assert torch.equal(streamed if isinstance(streamed, torch.Tensor) else streamed[0], plain)
    assert _configs(model) == before_configs and model.config._attn_implementation == "sdpa"
    assert _no_hooks(model) and not _HANDLERS and not _ORIGINAL


def test_hf_everything_restored_when_the_forward_raises():
    model = families.make_hf("clip")
    before = _configs(model)
    layers = [m for _, m in find_attention_modules(model)]
    boom = layers[1].register_forward_pre_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    for methods in (("raw",), ("grad_rollout",)):
        with pytest.raises(RuntimeError, match="boom"):
            attention_maps(model, families.images(1), methods=methods, target=_embedding)
        assert _configs(model) == before and not _HANDLERS and not _ORIGINAL
    boom.remove()
    assert _no_hooks(model)
    # and with record_attention directly
    with pytest.raises(RuntimeError, match="inside"):
        with record_attention(model):
            raise RuntimeError("inside")
    assert _configs(model) == before and _no_hooks(model)


def test_hf_layers_layouts_and_logits():
    clip = families.make_hf("clip")
    names = [n for n, _ in find_attention_modules(clip)]
    assert names == [f"vision_model.encoder.layers.{i}.self_attn" for i in range(3)]  # the text tower is not watched
    assert token_layout(families.make_hf("dinov2_reg"), (32, 32)).register_slice == slice(1, 5)
    assert token_layout(families.make_hf("deit_teacher"), (32, 32), query="cls").query == "cls"
    with pytest.raises(ValueError, match="no class token"):
        token_layout(families.make_hf("siglip"), (32, 32), query="cls")
    maps = attention_maps(families.make_hf("vit_cls"), families.images(2))
    assert maps.logits.shape == (2, 5)
    assert attention_maps(clip, families.images(2)).logits is None
    # a ViT without interpolation cannot take another size: the error says so before any forward
    import transformers

    vit = transformers.ViTModel(transformers.ViTConfig(**families.SMALL))
    backend = backend_for(vit)
    backend._params = {}  # as a model whose forward has no `interpolate_pos_encoding`
    with pytest.raises(ValueError, match="cannot interpolate"):
        backend.check_images(families.images(1, (32, 48)))


def test_models_without_logits_need_a_callable_target():
    model = families.make_hf("dinov2")
    with pytest.raises(ValueError, match="no class logits.*callable"):
        attention_maps(model, families.images(2), methods=("relevance",))
    with pytest.raises(ValueError, match=r"one score per image, shape \(2,\)"):
        attention_maps(model, families.images(2), methods=("relevance",), target=lambda out: out.pooler_output)
    maps = attention_maps(model, families.images(2), methods=("relevance",), target=_embedding)
    assert maps.relevance.shape == (2, 3, 4, 4)
    curves = perturbation_curves(model, families.images(2), maps.relevance[:, -1], target=_embedding, steps=2)
    assert curves.target is None and curves.most_first.shape == (2, 3)
    with torch.no_grad():
        np.testing.assert_allclose(
            curves.most_first[:, 0].numpy(), _embedding(model(families.images(2))).numpy(), rtol=1e-5
        )


def test_torchvision_maps_and_gradients_equal_a_float64_forward_written_by_hand():
    model = families.make_torchvision()
    x = families.images(3)
    targets = [0, 3, 4]
    atts, grads, logits = families.torchvision_float64(model, x, targets)
    torch_atts = [torch.from_numpy(a) for a in atts]
    maps = attention_maps(model, x, head_fusion="max", discard_ratio=0.5)
    assert (maps.num_prefix_tokens, maps.query, maps.grid_size) == (1, "cls", (4, 4))
    np.testing.assert_allclose(
        maps.raw.numpy(), _rows(reference.raw_fused(torch_atts, "max"), 1, "cls", (4, 4)), atol=1e-5, rtol=1e-4
    )
    np.testing.assert_allclose(
        maps.rollout.numpy(), _rows(reference.rollout(torch_atts, "max", 0.5), 1, "cls", (4, 4)), atol=1e-5, rtol=1e-4
    )
    torch.testing.assert_close(maps.logits.double(), logits, atol=1e-5, rtol=1e-5)
    grad_maps = attention_maps(model, x, methods=GRAD, target=torch.tensor(targets))
    np.testing.assert_allclose(
        grad_maps.grad_rollout.numpy(),
        _rows(reference.grad_rollout(atts, grads), 1, "cls", (4, 4)),
        atol=1e-5,
        rtol=1e-4,
    )
    np.testing.assert_allclose(
        grad_maps.relevance.numpy(), _rows(reference.relevance(atts, grads), 1, "cls", (4, 4)), atol=1e-5, rtol=1e-4
    )


def test_torchvision_outputs_bitwise_unchanged_and_no_hooks_left():
    model = families.make_torchvision()
    x = families.images(2)
    with torch.no_grad():
        before = model(x)
    maps = attention_maps(model, x)
    assert torch.equal(maps.logits, before)
    attention_maps(model, x, methods=GRAD)
    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert _no_hooks(model)
    with pytest.raises(ValueError, match="takes only 32x32"):
        attention_maps(model, families.images(1, (32, 48)))


@pytest.mark.parametrize("budget", [0, None])  # one head at a time, all at once
def test_torchvision_masks_follow_multihead_attention_conventions(budget):
    from lightning_attn.capture import record_head_attention

    torch.manual_seed(0)
    layer = torch.nn.MultiheadAttention(24, 3, batch_first=True).eval()
    x = torch.randn(2, 7, 24)
    mask = torch.rand(7, 7) > 0.7  # True = masked out, as nn.MultiheadAttention takes it
    mask.fill_diagonal_(False)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, -2:] = True
    heads = {}
    with torch.no_grad():
        _, expected = layer(
            x, x, x, attn_mask=mask, key_padding_mask=padding, need_weights=True, average_attn_weights=False
        )
        with record_head_attention(layer, [layer], lambda i, h, n, a: heads.__setitem__(h, a), budget):
            layer(x, x, x, attn_mask=mask, key_padding_mask=padding, need_weights=False)
        with record_attention(layer) as rec:
            layer(x, x, x, attn_mask=mask, key_padding_mask=padding, need_weights=False)
    torch.testing.assert_close(torch.stack([heads[h] for h in range(3)], dim=1), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(rec.attentions[0], expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("pit_ti_224", dict(img_size=64), "PiT pools tokens"),
        ("crossvit_tiny_240", dict(img_size=240), "CrossViT runs two token branches"),
        ("naflexvit_base_patch16_gap", dict(depth=1, embed_dim=48, num_heads=3), "NaFlexViT packs"),
        ("maxvit_tiny_tf_224", dict(img_size=64), "MaxViT uses block and grid window attention"),
        ("twins_svt_small", dict(depths=(1, 1, 1, 1)), "Twins uses locally grouped"),
    ],
)
def test_timm_families_that_cannot_work_fail_with_what_is_supported(name, kwargs, match):
    model = timm.create_model(name, pretrained=False, **kwargs)
    assert find_vision_transformers(model) == []
    with pytest.raises(ValueError, match=match) as err:
        backend_for(model)
    message = str(err.value)
    assert "Supported: timm VisionTransformer" in message and "transformers ViT" in message
    assert "torchvision VisionTransformer" in message and "layout=" not in message


@pytest.mark.parametrize("key", ["vit_cls", "clip"])
def test_hf_outputs_of_cpu_batches_are_joined(key, monkeypatch):
    import lightning_attn.maps as maps_module

    model = families.make_hf(key)
    x = families.images(3)
    whole = attention_maps(model, x)
    monkeypatch.setattr(maps_module, "CPU_ATTENTION_ENTRIES", 1)  # one probe per batch
    split = attention_maps(model, x)
    torch.testing.assert_close(split.rollout, whole.rollout, atol=1e-6, rtol=1e-5)
    if isinstance(whole.output, torch.Tensor):
        torch.testing.assert_close(split.output, whole.output, atol=1e-5, rtol=1e-5)
    else:  # a ModelOutput: every field joined along the batch
        assert type(split.output) is type(whole.output) and list(split.output.keys()) == list(whole.output.keys())
        for k in whole.output.keys():
            if isinstance(whole.output[k], torch.Tensor):
                torch.testing.assert_close(split.output[k], whole.output[k], atol=1e-5, rtol=1e-5)
