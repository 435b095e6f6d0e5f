from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
from conftest import TINY, make_vit
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_attn.backends import register_slice
from lightning_attn.capture import record_attention
from lightning_attn.diagnostics import (
    artifact_mask,
    artifact_tokens,
    attention_drift,
    head_query_rows,
    mean_attention_distance,
    register_share,
)
from lightning_attn.layout import TokenLayout
from lightning_attn.maps import query_row


def one_hot(b, l, gh, gw, at):
    maps = torch.zeros(b, l, gh, gw)
    maps[..., at[0], at[1]] = 1.0
    return maps


# --- drift --------------------------------------------------------------------------------------------------------


def jsd_bits(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence from its entropy form, H(m) - (H(p) + H(q)) / 2, in bits, loop by loop."""

    def entropy(x):
        return -sum(v * math.log2(v) for v in x if v > 0)

    p, q = p / p.sum(), q / q.sum()
    m = [(a + b) / 2 for a, b in zip(p, q)]
    return entropy(m) - (entropy(p) + entropy(q)) / 2


def test_drift_zero_for_identical_maps():
    maps = torch.rand(3, 4, 5, 6)
    drift = attention_drift(maps, maps.clone())
    assert drift.shape == (4,) and drift.dtype == torch.float32
    torch.testing.assert_close(drift, torch.zeros(4), atol=1e-6, rtol=0)


def test_drift_ignores_total_mass():
    maps = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(attention_drift(maps, maps * 0.01), torch.zeros(3), atol=1e-6, rtol=0)


def test_drift_one_for_disjoint_one_hot_maps():
    drift = attention_drift(one_hot(2, 3, 4, 4, (0, 0)), one_hot(2, 3, 4, 4, (3, 1)))
    torch.testing.assert_close(drift, torch.ones(3))


def test_drift_half_overlap_by_hand():
    # p = (1/2, 1/2, 0), q = (0, 1/2, 1/2): m = (1/4, 1/2, 1/4); each KL = 1/2 log2 2 + 1/2 log2 1 = 1/2 bit.
    p = torch.tensor([1.0, 1.0, 0.0]).view(1, 1, 1, 3)
    q = torch.tensor([0.0, 1.0, 1.0]).view(1, 1, 1, 3)
    torch.testing.assert_close(attention_drift(p, q), torch.tensor([0.5]))


def test_drift_matches_reference_and_averages_probes():
    g = torch.Generator().manual_seed(0)
    maps, ref = torch.rand(4, 3, 3, 5, generator=g) ** 4, torch.rand(4, 3, 3, 5, generator=g) ** 4
    maps[1, 2, 0] = 0.0  # zeros in one map only
    flat_maps, flat_ref = maps.double().flatten(-2).numpy(), ref.double().flatten(-2).numpy()
    expected = [np.mean([jsd_bits(flat_maps[b, l], flat_ref[b, l]) for b in range(4)]) for l in range(3)]
    torch.testing.assert_close(attention_drift(maps, ref), torch.tensor(expected, dtype=torch.float32))


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 4), st.integers(1, 5))
def test_drift_symmetric_and_bounded(seed, gh, gw):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(2, 3, gh, gw, generator=g) * (torch.rand(2, 3, gh, gw, generator=g) > 0.5)
    b = torch.rand(2, 3, gh, gw, generator=g)
    forward, backward = attention_drift(a, b), attention_drift(b, a)
    torch.testing.assert_close(forward, backward)
    assert ((forward >= 0) & (forward <= 1)).all() and torch.isfinite(forward).all()


def test_drift_all_zero_map_counts_as_uniform():
    zero, flat = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    torch.testing.assert_close(attention_drift(zero, flat), torch.zeros(1))


@pytest.mark.parametrize(
    ("maps", "reference", "match"),
    [
        (torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 5), r"`maps` \(2, 3, 4, 4\) and `reference` \(2, 3, 4, 5\)"),
        (torch.rand(3, 4, 4), torch.rand(3, 4, 4), r"`maps` must be \(B, L, gh, gw\)"),
        (torch.rand(1, 3, 4, 4), torch.rand(3, 4, 4), r"`reference` must be \(B, L, gh, gw\)"),
    ],
)
def test_drift_bad_shapes(maps, reference, match):
    with pytest.raises(ValueError, match=match):
        attention_drift(maps, reference)


# --- artifact tokens ----------------------------------------------------------------------------------------------


def test_artifact_one_hot_counts_one_taking_everything():
    count, share = artifact_tokens(one_hot(3, 2, 4, 4, (2, 1)))
    assert count.shape == share.shape == (2,) and count.dtype == share.dtype == torch.float32
    torch.testing.assert_close(count, torch.ones(2))
    torch.testing.assert_close(share, torch.ones(2))


def test_artifact_uniform_counts_none():
    count, share = artifact_tokens(torch.full((2, 3, 4, 5), 0.05))
    assert count.tolist() == [0.0] * 3 and share.tolist() == [0.0] * 3


def test_artifact_two_hot_patches_at_twenty_times_the_median():
    maps = torch.ones(2, 1, 4, 4)
    maps[:, 0, 0, 3] = maps[:, 0, 2, 2] = 20.0
    count, share = artifact_tokens(maps)
    # 14 patches of 1 and two of 20: the median share is 1/54, each hot one takes 20/54 > 10 x 1/54.
    torch.testing.assert_close(count, torch.tensor([2.0]))
    torch.testing.assert_close(share, torch.tensor([40 / 54]))
    assert artifact_mask(maps)[0, 0].nonzero().tolist() == [[0, 3], [2, 2]]


def test_artifact_threshold_is_strict_and_relative_to_the_median():
    maps = torch.ones(1, 1, 3, 3)
    maps[0, 0, 1, 1] = 10.0  # exactly 10 x the median: not outsized
    assert artifact_tokens(maps)[0].tolist() == [0.0]
    assert artifact_tokens(maps, threshold=9.5)[0].tolist() == [1.0]
    assert artifact_tokens(maps * 1e-6, threshold=9.5)[0].tolist() == [1.0]  # scale does not matter


def test_artifact_counts_average_over_probes():
    maps = torch.ones(2, 1, 4, 4)
    maps[0, 0, 0, 0] = 50.0  # probe 0: one hot patch taking 50/65; probe 1: uniform
    count, share = artifact_tokens(maps)
    torch.testing.assert_close(count, torch.tensor([0.5]))
    torch.testing.assert_close(share, torch.tensor([0.5 * 50 / 65]))


def test_artifact_median_floor_ignores_float_dust():
    # Most patches get nothing (median 0): the three real spots count, patches at 1e-9 of the mass do not.
    p = torch.zeros(1, 1, 4, 4)
    p[0, 0, 0, :3] = 1.0
    p[0, 0, 3, :3] = 1e-9
    count, share = artifact_tokens(p)
    assert count.tolist() == [3.0]
    torch.testing.assert_close(share, torch.tensor([3 / (3 + 3e-9)]))
    # The floor is 1e-3 / P of the mass, so with t = 10 a patch needs more than 1e-2 / P = 1/1600 to count.
    p[0, 0, 3, 0] = 3 / 1600 * 1.1
    p[0, 0, 3, 1] = 3 / 1600 * 0.9
    assert artifact_mask(p)[0, 0, 3].tolist() == [True, False, False, False]


@pytest.mark.parametrize("bad", [1.0, 0.5, -3, "10", True])
def test_artifact_bad_threshold(bad):
    with pytest.raises(ValueError, match="`threshold` must be a number > 1"):
        artifact_tokens(torch.rand(1, 1, 2, 2), threshold=bad)


# --- registers ----------------------------------------------------------------------------------------------------


def test_register_share_by_hand():
    rows = torch.tensor(
        [
            [[0.1, 0.2, 0.3, 0.4, 0.0], [0.0, 0.0, 0.0, 0.5, 0.5]],
            [[0.5, 0.25, 0.25, 0.0, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2]],
        ]
    )  # B=2, L=2, N=5: [cls][reg][reg][patch][patch]
    share = register_share(rows, slice(1, 3))
    assert share.shape == (2,) and share.dtype == torch.float32
    torch.testing.assert_close(share, torch.tensor([(0.5 + 0.5) / 2, (0.0 + 0.4) / 2]))


def test_register_share_renormalises_rows():
    rows = torch.tensor([[[2.0, 6.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])
    torch.testing.assert_close(register_share(rows, slice(1, 2)), torch.tensor([0.75, 0.0]))


@pytest.mark.parametrize(
    ("sl", "match"),
    [
        (slice(3, 3), "does not pick a contiguous run"),
        (slice(1, 9), "does not pick a contiguous run"),
        (slice(0, 4, 2), "does not pick a contiguous run"),
        (None, "returns None for models without registers"),
    ],
)
def test_register_share_bad_slice(sl, match):
    with pytest.raises(ValueError, match=match):
        register_share(torch.rand(2, 3, 5), sl)
    with pytest.raises(ValueError, match=r"\(B, L, N\)"):
        register_share(torch.rand(3, 5), slice(1, 2))


def tiny(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **{**TINY, **kwargs}).eval()


REGISTER_MODELS = {
    # timm model, kwargs, expected slice
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8), None),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=8), None),
    "gap": ("vit_base_patch16_gap_224", dict(img_size=32, patch_size=8), None),
    "cls_reg4": ("vit_small_patch14_reg4_dinov2", dict(img_size=28, patch_size=14), slice(1, 5)),
    "reg4_gap": ("vit_betwixt_patch16_reg4_gap_256", dict(img_size=32, patch_size=8), slice(0, 4)),
    "eva_cls_reg4": ("vit_small_patch16_dinov3", dict(img_size=32), slice(1, 5)),
    "eva_reg1_gap": ("vit_medium_patch16_rope_reg1_gap_256", dict(img_size=32), slice(0, 1)),
}


@pytest.mark.parametrize("key", list(REGISTER_MODELS))
def test_register_slice_on_timm_models(key):
    name, kwargs, expected = REGISTER_MODELS[key]
    model = tiny(name, **kwargs)
    assert register_slice(model) == expected
    if expected is None:
        return
    # Mark the registers and see where timm's own _pos_embed puts them.
    with torch.no_grad():
        model.reg_token.fill_(1e4)
        if model.cls_token is not None:
            model.cls_token.fill_(-1e4)
        size = kwargs["img_size"]
        tokens = model._pos_embed(model.patch_embed(torch.randn(1, 3, size, size)))
    tokens = tokens[0] if isinstance(tokens, tuple) else tokens  # Eva returns (tokens, rotary embedding)
    marked = (tokens[0, :, 0] > 5e3).nonzero().flatten().tolist()
    assert marked == list(range(tokens.shape[1]))[expected]


def test_layouts_with_more_registers_than_prefix_tokens_are_refused():
    with pytest.raises(ValueError, match=r"`num_registers` must be in \[0, num_prefix_tokens=2\], got 4"):
        TokenLayout(2, (2, 2), "cls", num_registers=4)
    assert TokenLayout(5, (2, 2), "cls", num_registers=4).register_slice == slice(1, 5)


# --- mean attention distance --------------------------------------------------------------------------------------


def mean_pairwise_distance(gh, gw, ph, pw):
    """Mean over all ordered pairs (i, j) of patches, self-pairs included, of the centre distance in pixels."""
    centres = [((r + 0.5) * ph, (c + 0.5) * pw) for r in range(gh) for c in range(gw)]
    total = 0.0
    for yi, xi in centres:
        for yj, xj in centres:
            total += math.hypot(yi - yj, xi - xj)
    return total / len(centres) ** 2


@pytest.mark.parametrize(
    ("grid", "patch", "prefix"),
    [((3, 3), 16, 1), ((2, 5), (8, 12), 5), ((4, 1), 14, 0), ((1, 1), 16, 2)],
)
def test_distance_uniform_attention_is_mean_pairwise_distance(grid, patch, prefix):
    n = prefix + grid[0] * grid[1]
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    attention = torch.full((2, 3, n, n), 1.0 / n)
    distance = mean_attention_distance(attention, grid, prefix, patch)
    assert distance.shape == (2, 3) and distance.dtype == torch.float32
    expected = mean_pairwise_distance(*grid, ph, pw)
    torch.testing.assert_close(distance, torch.full((2, 3), expected, dtype=torch.float32))


def test_distance_identity_attention_is_zero():
    attention = torch.eye(1 + 12).expand(2, 4, 13, 13)
    torch.testing.assert_close(mean_attention_distance(attention, (3, 4), 1, 16), torch.zeros(2, 4))


def test_distance_prefix_keys_dropped_and_heads_apart():
    # Grid 1x3 (patches a, b, c; 10 px wide), 1 prefix token. Head 0: every query puts 0.5 on the prefix and
    # 0.5 on patch a -> weights renormalise to 1 on a: distances 0, 10, 20 -> mean 10. Head 1: each patch
    # attends to its right neighbour (c to itself): 10, 10, 0 -> mean 20/3.
    a = torch.zeros(1, 2, 4, 4)
    a[0, 0, :, 0] = 0.5
    a[0, 0, :, 1] = 0.5
    a[0, 1, 0, 0] = 1.0
    a[0, 1, 1, 2] = a[0, 1, 2, 3] = a[0, 1, 3, 3] = 1.0
    torch.testing.assert_close(mean_attention_distance(a, (1, 3), 1, 10), torch.tensor([[10.0, 20 / 3]]))


def test_distance_skips_queries_with_no_patch_attention():
    a = torch.zeros(1, 1, 3, 3)  # [cls] + 1x2 patches 16 px apart
    a[0, 0, 1, 2] = 1.0  # patch 0 looks at patch 1: 16 px
    a[0, 0, 2, 0] = 1.0  # patch 1 looks only at the class token: no position, left out
    torch.testing.assert_close(mean_attention_distance(a, (1, 2), 1, 16), torch.tensor([[16.0]]))


def test_distance_of_a_real_model_lies_within_the_grid():
    model = make_vit("vit")
    with torch.no_grad(), record_attention(model) as rec:
        model(torch.randn(2, 3, 32, 32))
    for attention in rec.attentions:
        d = mean_attention_distance(attention, (4, 4), 1, 8)
        assert d.shape == (2, 3) and (d >= 0).all() and (d <= math.hypot(24, 24)).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(grid_size=(2, 2)), r"N = 1 prefix \+ 2x2 patches = 5, got \(1, 2, 10, 10\)"),
        (dict(attention=torch.rand(2, 10, 10)), r"`attention` must be \(B, heads, N, N\)"),
        (dict(grid_size=(3, 0)), "`grid_size` must be a positive int"),
        (dict(patch_size=(16, 16, 3)), "`patch_size` must be a positive int or a pair"),
        (dict(num_prefix_tokens=-1), "`num_prefix_tokens` must be a non-negative int"),
    ],
)
def test_distance_bad_arguments(kwargs, match):
    args = dict(attention=torch.rand(1, 2, 10, 10), grid_size=(3, 3), num_prefix_tokens=1, patch_size=16) | kwargs
    with pytest.raises(ValueError, match=match):
        mean_attention_distance(**args)


# --- per-head maps ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("query", ["cls", "mean"])
@pytest.mark.parametrize("prefix", [1, 2, 5])
def test_head_query_rows_match_manual_slicing(query, prefix):
    layout = TokenLayout(num_prefix_tokens=prefix, grid_size=(2, 3), query=query)
    attention = torch.rand(2, 4, layout.num_tokens, layout.num_tokens).softmax(-1)
    rows = head_query_rows(attention, layout)
    assert rows.shape == (2, 4, 2, 3) and rows.dtype == torch.float32
    for b in range(2):
        for h in range(4):
            a = attention[b, h]
            row = a[0] if query == "cls" else a[prefix:].mean(dim=0)
            torch.testing.assert_close(rows[b, h], row[prefix:].view(2, 3))


def test_head_query_rows_average_to_the_mean_fused_map():
    layout = TokenLayout(num_prefix_tokens=1, grid_size=(3, 3), query="cls")
    attention = torch.rand(2, 3, 10, 10)
    fused = query_row(attention.mean(dim=1), layout).view(2, 3, 3)
    torch.testing.assert_close(head_query_rows(attention, layout).mean(dim=1), fused)


def test_head_query_rows_bad_shape():
    layout = TokenLayout(num_prefix_tokens=1, grid_size=(2, 2), query="cls")
    with pytest.raises(ValueError, match=r"layout's N = 1 prefix \+ 2x2 patches = 5, got \(1, 2, 6, 6\)"):
        head_query_rows(torch.rand(1, 2, 6, 6), layout)
