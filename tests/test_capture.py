from __future__ import annotations

import pytest
import timm
import torch
from conftest import MODELS, input_for, make_vit

from lightning_attn import find_attention_modules, record_attention
from lightning_attn.backends.timm import NOT_TOKEN_SELF_ATTENTION

from reference import attention_from_qkv


def _no_hooks(model: torch.nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())


def test_captured_attention_equals_attention_recomputed_from_qkv():
    model = make_vit("vit")
    layers = [m for _, m in find_attention_modules(model)]
    assert all(m.fused_attn for m in layers), "the test must start from timm's default fused attention"
    inputs: list[torch.Tensor] = []
    pre = [m.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].detach())) for m in layers]
    x = input_for("vit")
    with torch.no_grad(), record_attention(model) as rec:
        model(x)
    for h in pre:
        h.remove()
    assert len(rec.attentions) == len(layers) == 3
    for layer, x_in, captured in zip(layers, inputs, rec.attentions):
        assert captured.shape == (3, 3, 17, 17)
        expected = attention_from_qkv(layer, x_in)
        torch.testing.assert_close(captured.double(), expected, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(captured.sum(-1), torch.ones(3, 3, 17))


@pytest.mark.parametrize("key", sorted(MODELS))
def test_every_family_records_one_matrix_per_layer(key):
    model = make_vit(key)
    _, _, prefix, _ = MODELS[key]
    x = input_for(key, batch=2)
    with torch.no_grad(), record_attention(model) as rec:
        model(x)
    h, w = x.shape[-2:]
    patch = model.patch_embed.patch_size[0]
    n = prefix + (h // patch) * (w // patch)
    assert [tuple(a.shape) for a in rec.attentions] == [(2, 3, n, n)] * 3
    assert rec.names == [f"blocks.{i}.attn" for i in range(3)]
    assert _no_hooks(model)


def test_flags_and_hooks_restored_and_fused_outputs_unchanged():
    model = make_vit("vit")
    layers = [m for _, m in find_attention_modules(model)]
    layers[1].fused_attn = False  # a user's own setting must survive too
    x = input_for("vit")
    with torch.no_grad():
        before = model(x)
        with record_attention(model):
            assert not any(m.fused_attn for m in layers)
            model(x)
        after = model(x)
    assert [m.fused_attn for m in layers] == [True, False, True]
    assert _no_hooks(model)
    assert torch.equal(before, after)


def test_restored_when_the_forward_raises():
    model = make_vit("vit")
    layers = [m for _, m in find_attention_modules(model)]
    with pytest.raises(RuntimeError, match="boom"):
        with record_attention(model) as rec:
            model(input_for("vit"))
            raise RuntimeError("boom")
    assert all(m.fused_attn for m in layers)
    assert _no_hooks(model)
    # the wrong input raises inside timm itself: same guarantee
    with pytest.raises(Exception):  # noqa: B017 (whatever timm raises; the point is what is restored after)
        with record_attention(model):
            model(torch.randn(1, 3, 40, 40))
    assert all(m.fused_attn for m in layers) and _no_hooks(model)
    assert len(rec.attentions) == 3


def test_nothing_recorded_outside_the_context():
    model = make_vit("vit")
    with torch.no_grad(), record_attention(model) as rec:
        model(input_for("vit"))
    model(input_for("vit"))
    assert len(rec.attentions) == 3


def test_streaming_callback_receives_layer_indices_without_storing():
    model = make_vit("vit")
    seen = []
    with (
        torch.no_grad(),
        record_attention(model, on_attention=lambda i, a: seen.append((i, a.shape)), store=False) as rec,
    ):
        model(input_for("vit", batch=1))
    assert [i for i, _ in seen] == [0, 1, 2]
    assert rec.attentions == [] and rec.num_calls == 3


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("resnet10t", {}, "ResNet is not a supported Vision Transformer"),
        ("cait_xxs24_224", dict(img_size=32, depth=1, depth_token_only=1), "CaiT mixes heads"),
        ("xcit_nano_12_p16_224", dict(depth=1), "XCiT attends over channels"),
    ],
)
def test_models_without_token_self_attention_raise(name, kwargs, match):
    model = timm.create_model(name, pretrained=False, **kwargs)
    with pytest.raises(ValueError, match=match) as err:
        find_attention_modules(model)
    assert "pass" in str(err.value)
    with pytest.raises(ValueError):
        with record_attention(model):
            pass


def test_not_token_self_attention_registry_names_real_timm_classes():
    import timm.models.cait as cait
    import timm.models.swin_transformer as swin
    import timm.models.xcit as xcit

    classes = {c.__name__ for mod in (cait, swin, xcit) for c in vars(mod).values() if isinstance(c, type)}
    assert set(NOT_TOKEN_SELF_ATTENTION) <= classes


def test_explicit_modules_must_be_attention_layers():
    model = make_vit("vit")
    with pytest.raises(ValueError, match="`modules` must be attention layers"):
        with record_attention(model, modules=[model.blocks[0].mlp]):
            pass
    with torch.no_grad(), record_attention(model, modules=[model.blocks[2].attn]) as rec:
        model(input_for("vit"))
    assert len(rec.attentions) == 1


def _mask_kwargs(mask_kind, batch):
    """The attention layer's mask arguments for `batch` inputs of 9 tokens and 3 heads, drawn from the global RNG."""
    if mask_kind == "bool":
        return {"attn_mask": (torch.rand(batch, 1, 9, 9) > 0.3) | torch.eye(9, dtype=torch.bool)}
    if mask_kind == "float":
        return {"attn_mask": torch.randn(batch, 3, 9, 9)}
    if mask_kind == "causal":
        return {"is_causal": True}
    return {}


@pytest.mark.parametrize("budget", [0, 2 * 4 * 2 * 9 * 9 * 2, None])  # one head, two heads, all three at a time
@pytest.mark.parametrize("mask_kind", [None, "bool", "float", "causal"])
def test_head_streaming_equals_the_unfused_softmax(mask_kind, budget):
    from timm.layers.attention import Attention

    from lightning_attn.capture import record_head_attention, stream_attention

    torch.manual_seed(0)
    layer = Attention(dim=48, num_heads=3, qkv_bias=True, qk_norm=True, norm_layer=torch.nn.LayerNorm).eval()
    layer.qkv.weight.data.mul_(6)
    x = torch.randn(2, 9, 48)
    kwargs = _mask_kwargs(mask_kind, batch=2)
    heads, chunks = {}, []
    with torch.no_grad():
        plain_out = layer(x, **kwargs)
        with record_head_attention(layer, [layer], lambda i, h, n, a: heads.__setitem__(h, a), memory_budget=budget):
            assert layer.fused_attn, "the fused kernel stays on"
            streamed_out = layer(x, **kwargs)
        with stream_attention(layer, [layer], lambda i, h, n, a: chunks.append((h, a.shape[1])), budget):
            layer(x, **kwargs)
        with record_attention(layer) as rec:
            unfused_out = layer(x, **kwargs)
    expected = rec.attentions[0]
    got = torch.stack([heads[h] for h in range(3)], dim=1)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert chunks == {0: [(0, 1), (1, 1), (2, 1)], None: [(0, 3)]}.get(budget, [(0, 2), (2, 1)])
    if budget == 0:  # nothing reused: the fused kernel's own output, bitwise
        assert torch.equal(streamed_out, plain_out)
    torch.testing.assert_close(streamed_out, plain_out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(unfused_out, plain_out, atol=1e-5, rtol=1e-5)
    assert not layer._forward_pre_hooks and not layer._forward_hooks


@pytest.mark.parametrize("cache", ["probe", "head"])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float", "causal"])
def test_chunks_of_probes_equal_the_unfused_softmax(mask_kind, cache):
    """With a cache size, a layer's weights come a probe (or a probe's head) at a time, each probe's own mask
    applied, in order (probes first, then heads), and the layer's output is still computed from them."""
    from timm.layers.attention import Attention

    from lightning_attn.capture import stream_chunks

    torch.manual_seed(0)
    layer = Attention(dim=48, num_heads=3, qkv_bias=True).eval()
    layer.qkv.weight.data.mul_(6)
    x = torch.randn(3, 9, 48)
    kwargs = _mask_kwargs(mask_kind, batch=3)
    cache_bytes = 4 * 9 * 9 * (3 if cache == "probe" else 1)
    got = torch.zeros(3, 3, 9, 9)
    order = []

    def on_chunk(index, chunk, weights):
        order.append((chunk.probes.start, chunk.heads.start, chunk.ends_probes, chunk.ends_call))
        got[chunk.probes, chunk.heads] = weights

    with torch.no_grad():
        plain_out = layer(x, **kwargs)
        with stream_chunks(layer, [layer], on_chunk, None, cache_bytes):
            streamed_out = layer(x, **kwargs)
        with record_attention(layer) as rec:
            layer(x, **kwargs)
    torch.testing.assert_close(got, rec.attentions[0], atol=1e-6, rtol=1e-5)
    heads = [0] if cache == "probe" else [0, 1, 2]
    expected = [(p, h, h == heads[-1], p == 2 and h == heads[-1]) for p in range(3) for h in heads]
    assert order == expected
    torch.testing.assert_close(streamed_out, plain_out, atol=1e-5, rtol=1e-5)  # the kernel's math, to rounding
    assert not layer._forward_pre_hooks and not layer._forward_hooks


@pytest.mark.parametrize("key", list(MODELS))
@pytest.mark.parametrize("budget", [0, None])
def test_streaming_equals_the_recorded_softmax_in_every_timm_family(key, budget):
    """EVA's rotary embeddings and BEiT's relative position bias included: the streamed weights are the ones the
    unfused layer computes, and the model's output is its plain forward's."""
    from lightning_attn.capture import stream_attention, supports_head_streaming

    model = make_vit(key)
    layers = [m for _, m in find_attention_modules(model)]
    assert all(supports_head_streaming(m) for m in layers)
    x = input_for(key)
    chunks: dict[int, list[torch.Tensor]] = {}
    with torch.no_grad():
        plain = model(x)
        with stream_attention(model, layers, lambda i, h, n, a: chunks.setdefault(i, []).append(a), budget):
            streamed = model(x)
        with record_attention(model) as rec:
            model(x)
    assert len(chunks) == len(rec.attentions) == len(layers)
    for i, expected in enumerate(rec.attentions):
        torch.testing.assert_close(torch.cat(chunks[i], dim=1), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(streamed, plain, atol=1e-5, rtol=1e-5)
    assert all(m.fused_attn for m in layers), "flags restored"
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in layers)


def test_stream_attention_undoes_everything_when_the_forward_raises():
    from torch.overrides import _get_current_function_mode_stack

    from lightning_attn.capture import stream_attention

    model = make_vit("eva02")
    layers = [m for _, m in find_attention_modules(model)]
    flags = [m.fused_attn for m in layers]

    def boom(*_):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        with stream_attention(model, layers, boom):
            model(input_for("eva02"))
    assert not _get_current_function_mode_stack(), "no torch function mode left behind"
    assert [m.fused_attn for m in layers] == flags
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in layers)
    with pytest.raises(ValueError, match="memory_budget"):
        with stream_attention(model, layers, boom, memory_budget=-1):
            pass
