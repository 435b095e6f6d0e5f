from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from conftest import MODELS, input_for, make_vit

from lightning_attn import attention_maps, record_attention, token_layout
from lightning_attn.capture import find_attention_modules

import reference


def _reference_maps(model, x, head_fusion, discard_ratio, prefix, query):
    with torch.no_grad(), record_attention(model) as rec:
        logits = model(x)
    h, w = x.shape[-2:]
    patch = model.patch_embed.patch_size
    grid = (h // patch[0], w // patch[1])
    raw = reference.query_rows(reference.raw_fused(rec.attentions, head_fusion), prefix, query)
    roll = reference.query_rows(reference.rollout(rec.attentions, head_fusion, discard_ratio), prefix, query)
    b, l = raw.shape[:2]
    return raw.reshape(b, l, *grid), roll.reshape(b, l, *grid), logits


@pytest.mark.parametrize("key", sorted(MODELS))
@pytest.mark.parametrize("head_fusion, discard_ratio", [("mean", 0.0), ("max", 0.9), ("min", 0.9), ("mean", 0.9)])
def test_maps_equal_float64_reference(key, head_fusion, discard_ratio):
    model = make_vit(key)
    _, _, prefix, query = MODELS[key]
    x = input_for(key, batch=3)
    maps = attention_maps(model, x, head_fusion=head_fusion, discard_ratio=discard_ratio)
    raw, roll, logits = _reference_maps(model, x, head_fusion, discard_ratio, prefix, query)
    assert maps.num_prefix_tokens == prefix and maps.query == query
    assert maps.grid_size == raw.shape[-2:]
    assert maps.raw.dtype == maps.rollout.dtype == torch.float32
    np.testing.assert_allclose(maps.raw.numpy(), raw, atol=1e-6)
    np.testing.assert_allclose(maps.rollout.numpy(), roll, atol=1e-5)
    torch.testing.assert_close(maps.output, logits)
    # dinov2-style timm models come without a head (num_classes=0): features, not class logits
    if model.num_classes == 0:
        assert maps.logits is None
    else:
        torch.testing.assert_close(maps.logits, logits)


def test_query_rule_follows_the_head():
    # the class token only speaks for the image when the head reads it
    assert token_layout(make_vit("vit"), (32, 32)).query == "cls"
    assert token_layout(make_vit("vit", global_pool="avg"), (32, 32)).query == "mean"
    assert token_layout(make_vit("eva02"), (42, 42)).query == "mean"
    assert token_layout(make_vit("gap"), (32, 32)).num_prefix_tokens == 0
    assert token_layout(make_vit("vit", global_pool="avg"), (32, 32), query="cls").query == "cls"
    with pytest.raises(ValueError, match="no class token"):
        token_layout(make_vit("gap"), (32, 32), query="cls")
    with pytest.raises(ValueError, match="`query`"):
        token_layout(make_vit("vit"), (32, 32), query="first")


def test_raw_maps_are_the_unnormalised_weights_and_batch_elements_independent():
    model = make_vit("vit")
    x = input_for("vit", batch=4)
    maps = attention_maps(model, x)
    # class-token row over patches: sums to 1 minus what went to the class token itself
    assert (maps.raw.sum(dim=(-2, -1)) <= 1 + 1e-6).all() and (maps.raw >= 0).all()
    single = attention_maps(model, x[2:3])
    torch.testing.assert_close(single.rollout[0], maps.rollout[2], atol=1e-6, rtol=1e-5)


def test_dynamic_image_size_uses_the_grid_of_the_actual_input():
    model = make_vit("vit", dynamic_img_size=True)
    maps = attention_maps(model, torch.randn(2, 3, 48, 64))
    assert maps.grid_size == (6, 8) and maps.raw.shape == (2, 3, 6, 8)


def test_aggregates_over_layers():
    maps = attention_maps(make_vit("vit"), input_for("vit"))
    agg = maps.aggregates
    torch.testing.assert_close(agg["mean"], maps.raw.mean(1))
    assert torch.equal(agg["max"], maps.raw.max(1).values) and torch.equal(agg["min"], maps.raw.min(1).values)
    assert maps.aggregate("max", "rollout").shape == (3, 4, 4)
    with pytest.raises(ValueError, match="reduction"):
        maps.aggregate("median")


def test_keep_matrices_and_methods_subset():
    model = make_vit("vit")
    x = input_for("vit")
    maps = attention_maps(model, x, methods=("raw",), keep_matrices=[0, 2])
    assert maps.rollout is None and set(maps.matrices) == {0, 2}
    with torch.no_grad(), record_attention(model) as rec:
        model(x)
    torch.testing.assert_close(maps.matrices[2], rec.attentions[2].mean(1))
    with pytest.raises(KeyError, match="rollout"):
        maps["rollout"]
    with pytest.raises(ValueError, match="keep_matrices"):
        attention_maps(model, x, keep_matrices=[3])
    with pytest.raises(ValueError, match="methods"):
        attention_maps(model, x, methods=("gradcam",))
    with pytest.raises(ValueError, match="methods"):
        attention_maps(model, x, methods=())


def test_default_methods_need_no_backward_pass():
    # the gradient methods cost a backward and keep every layer's matrices: only on request
    maps = attention_maps(make_vit("vit"), input_for("vit"))
    assert maps.raw is not None and maps.rollout is not None
    assert maps.grad_rollout is None and maps.relevance is None and maps.target is None


def test_model_state_restored_and_no_hooks_left():
    model = make_vit("vit", drop_rate=0.1)
    model.train()
    model.blocks[1].eval()  # a user's frozen submodule keeps its own mode
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attention_maps(model, input_for("vit"))
    assert model.training and not model.blocks[1].training and model.blocks[0].training
    assert all(m.fused_attn for _, m in find_attention_modules(model))
    assert all(not m._forward_hooks for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_maps_under_bf16_autocast_are_float32_and_close():
    model = make_vit("vit")
    x = input_for("vit")
    exact = attention_maps(model, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = attention_maps(model, x)
    assert low.raw.dtype == torch.float32 and low.rollout.dtype == torch.float32
    torch.testing.assert_close(low.rollout, exact.rollout, atol=0.05, rtol=0.1)


def test_bf16_parameters_take_float32_images():
    model = make_vit("vit").to(torch.bfloat16)
    maps = attention_maps(model, input_for("vit"))
    assert maps.raw.dtype == torch.float32 and torch.isfinite(maps.rollout).all()


def test_clear_errors_for_wrong_input():
    model = make_vit("vit")
    with pytest.raises(ValueError, match="1 channels but VisionTransformer expects 3"):
        attention_maps(model, torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        attention_maps(model, torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="not a supported Vision Transformer"):
        attention_maps(timm.create_model("resnet10t", pretrained=False), torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="head_fusion"):
        attention_maps(model, input_for("vit"), head_fusion="avg")


@pytest.mark.parametrize("key", ["reg4", "gap", "nonsquare"])
def test_per_layer_extras_equal_the_recorded_attention(key):
    from lightning_attn.diagnostics import head_query_rows, mean_attention_distance

    model = make_vit(key)
    _, _, prefix, query = MODELS[key]
    x = input_for(key, batch=2)
    maps = attention_maps(model, x, head_layers=[2], attention_distance=True)
    with torch.no_grad(), record_attention(model) as rec:
        model(x)
    layout = token_layout(model, tuple(x.shape[-2:]))
    torch.testing.assert_close(maps.head_maps[2], head_query_rows(rec.attentions[2], layout))
    kept = attention_maps(model, x, keep_head_matrices=[1], memory_budget=0)  # one head at a time, joined
    torch.testing.assert_close(kept.head_matrices[1], rec.attentions[1], atol=1e-6, rtol=1e-5)
    assert set(kept.head_matrices) == {1}
    # per-head rows average to the mean-fused raw map
    torch.testing.assert_close(maps.head_maps[2].mean(1), maps.raw[:, 2])
    expected = torch.stack(
        [mean_attention_distance(a, maps.grid_size, prefix, model.patch_embed.patch_size) for a in rec.attentions], 1
    )
    torch.testing.assert_close(maps.attention_distance, expected)
    assert maps.prefix_attention.shape == (2, 3, prefix)
    full = reference.raw_fused(rec.attentions)  # (B, L, N, N) float64
    rows = full[:, :, 0] if query == "cls" else full[:, :, prefix:].mean(axis=2)
    np.testing.assert_allclose(maps.prefix_attention.numpy(), rows[..., :prefix], atol=1e-6)
    with pytest.raises(ValueError, match="head_layers"):
        attention_maps(model, x, head_layers=[3])


def test_kept_rows_do_not_pin_the_full_matrices():
    # a view of row 0 would keep the whole (B, N, N) matrix alive per layer: memory growing with depth
    from lightning_attn.layout import TokenLayout, query_row

    m = torch.rand(2, 17, 17)
    for query in ("cls", "mean"):
        row = query_row(m, TokenLayout(1, (4, 4), query))
        assert row.untyped_storage().nbytes() == 2 * 16 * 4


def test_plain_vit_maps_keep_the_fused_kernel():
    model = make_vit("vit")
    seen = []
    layer = model.blocks[0].attn
    handle = layer.register_forward_pre_hook(lambda m, args: seen.append(m.fused_attn))
    maps = attention_maps(model, input_for("vit"), keep_matrices=[0])
    handle.remove()
    assert seen == [True]
    with torch.no_grad(), record_attention(model) as rec:
        model(input_for("vit"))
    torch.testing.assert_close(maps.matrices[0], rec.attentions[0].mean(1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("key", ["eva02", "vit"])
def test_float32_maps_under_autocast_on_both_capture_paths(key):
    model = make_vit(key, num_classes=5)  # eva02_tiny is built headless by default
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maps = attention_maps(model, input_for(key), methods=("raw", "rollout", "relevance"))
    assert maps.raw.dtype == maps.rollout.dtype == maps.relevance.dtype == torch.float32


@pytest.mark.parametrize("key", ["vit", "eva02", "beit", "deit_distilled"])
@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("cache_probes", [None, 2, 1, "head"])
def test_every_memory_budget_gives_the_same_maps(key, head_fusion, cache_probes, monkeypatch):
    """Whole softmax at once, two heads at a time, one at a time, and on a CPU in chunks of two probes, one probe,
    one probe's single head: the same maps (to 1e-6), and the same maps as the recorded (unfused, in-graph) path
    the gradient methods take."""
    import lightning_attn.maps as maps_module

    model = make_vit(key)
    x = input_for(key, batch=3)
    n = token_layout(model, tuple(x.shape[-2:])).num_tokens
    heads = model.blocks[0].attn.num_heads
    if cache_probes is not None:  # the bytes of one chunk's weights
        size = 4 * n * n if cache_probes == "head" else cache_probes * 4 * heads * n * n
        monkeypatch.setattr(maps_module, "CPU_CHUNK_BYTES", size)
    chunks = []
    original = maps_module._Reducer.chunk
    spy = lambda self, i, c, a: (chunks.append(c), original(self, i, c, a))  # noqa: E731
    monkeypatch.setattr(maps_module._Reducer, "chunk", spy)
    two_heads = 2 * 4 * x.shape[0] * n * n * 2
    kw = dict(
        head_fusion=head_fusion,
        discard_ratio=0.5,
        head_layers=(0, 2),
        attention_distance=True,
        keep_matrices=(1,),
        keep_head_matrices=(2,),
    )
    score = lambda output: output.flatten(1).sum(-1)  # noqa: E731 (some tiny models have no class head)
    recorded = attention_maps(model, x, methods=("raw", "rollout", "grad_rollout"), target=score, **kw)
    for budget in (None, two_heads, 0):
        chunks.clear()
        got = attention_maps(model, x, memory_budget=budget, **kw)
        probe_steps = {c.probes.stop - c.probes.start for c in chunks}
        expected_probes = {None: {3}, 2: {2, 1}, 1: {1}, "head": {1}}[cache_probes]
        assert probe_steps == expected_probes, "the chunks of probes asked for"
        if cache_probes == "head":
            assert {c.heads.stop - c.heads.start for c in chunks} == {1}
        for name in ("raw", "rollout", "attention_distance", "prefix_attention"):
            torch.testing.assert_close(getattr(got, name), getattr(recorded, name), atol=1e-6, rtol=1e-5)
        for index in (0, 2):
            torch.testing.assert_close(got.head_maps[index], recorded.head_maps[index], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got.matrices[1], recorded.matrices[1], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got.head_matrices[2], recorded.head_matrices[2], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got.logits, recorded.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("key", ["vit", "deit_distilled"])
def test_probes_split_into_cpu_batches_give_the_same_maps(key, monkeypatch):
    """On a CPU the probes go through in batches that keep a layer's attention small; the joined maps, outputs,
    targets and per-layer extras equal one batch's."""
    import lightning_attn.maps as maps_module

    model = make_vit(key)
    x = input_for(key, batch=5)
    labels = torch.tensor([0, 1, 2, 1, 0])
    kw = dict(
        methods=("raw", "rollout", "grad_rollout", "relevance"),
        head_layers=(0, 2),
        keep_matrices=(1,),
        attention_distance=True,
        target=labels,
        keep_head_matrices=(1,),
    )
    whole = attention_maps(model, x, **kw)
    n = token_layout(model, tuple(x.shape[-2:])).num_tokens
    monkeypatch.setattr(maps_module, "CPU_ATTENTION_ENTRIES", 2 * 3 * n * n)  # two probes per batch (3 heads)
    calls = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda images: calls.append(len(images)) or forward(images))
    split = attention_maps(model, x, **kw)
    assert calls == [2, 2, 1]  # one forward per batch (the gradient pass also gives raw and rollout)
    for name in (
        "raw",
        "rollout",
        "grad_rollout",
        "relevance",
        "prefix_attention",
        "attention_distance",
        "logits",
        "output",
    ):
        torch.testing.assert_close(getattr(split, name), getattr(whole, name), atol=1e-6, rtol=1e-5)
    assert torch.equal(split.target, labels)
    for index in (0, 2):
        torch.testing.assert_close(split.head_maps[index], whole.head_maps[index], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(split.matrices[1], whole.matrices[1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(split.head_matrices[1], whole.head_matrices[1], atol=1e-6, rtol=1e-5)
    # a callable target scores each batch's own output: class 1's logit explains what class index 1 does
    by_callable = attention_maps(model, x, methods=("relevance",), target=lambda output: output[:, 1])
    by_index = attention_maps(model, x, methods=("relevance",), target=1)
    torch.testing.assert_close(by_callable.relevance, by_index.relevance, atol=1e-6, rtol=1e-5)
    assert by_callable.target is None and by_index.target.tolist() == [1] * 5
