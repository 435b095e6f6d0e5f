"""Property-based checks of the functional core over random shapes, fusions and discard ratios."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_attn import attention_rollout, fuse_heads
from lightning_attn.layout import TokenLayout
from lightning_attn.maps import query_row
from lightning_attn.metrics import normalized_entropy

shapes = st.fixed_dictionaries(
    {
        "batch": st.integers(1, 4),
        "heads": st.integers(1, 4),
        "prefix": st.integers(0, 3),
        "gh": st.integers(1, 4),
        "gw": st.integers(1, 4),
        "layers": st.integers(1, 4),
        "fusion": st.sampled_from(["mean", "max", "min"]),
        "ratio": st.floats(0.0, 0.99, allow_nan=False),
        "temperature": st.floats(0.1, 20.0),
        "seed": st.integers(0, 2**16),
    }
)


def _attention(s):
    n = s["prefix"] + s["gh"] * s["gw"]
    g = torch.Generator().manual_seed(s["seed"])
    return [
        torch.softmax(s["temperature"] * torch.randn(s["batch"], s["heads"], n, n, generator=g), dim=-1)
        for _ in range(s["layers"])
    ]


@settings(max_examples=150, deadline=None)
@given(shapes)
def test_rollout_rows_are_distributions(s):
    r = attention_rollout(_attention(s), s["fusion"], s["ratio"])
    assert torch.isfinite(r).all()
    assert (r >= 0).all() and (r <= 1 + 1e-6).all()
    torch.testing.assert_close(r.sum(-1), torch.ones(r.shape[:-1]), atol=1e-5, rtol=0)


@settings(max_examples=150, deadline=None)
@given(shapes)
def test_raw_maps_are_the_fused_query_rows(s):
    atts = _attention(s)
    query = "cls" if s["prefix"] > 0 and s["seed"] % 2 else "mean"
    layout = TokenLayout(s["prefix"], (s["gh"], s["gw"]), query)
    for a in atts:
        fused = fuse_heads(a, s["fusion"])
        row = query_row(fused, layout)
        source = fused[:, 0] if query == "cls" else fused[:, s["prefix"] :].mean(1)
        torch.testing.assert_close(row, source[:, s["prefix"] :])
        e = normalized_entropy(row.reshape(s["batch"], s["gh"], s["gw"]))
        assert torch.isfinite(e).all() and (e >= 0).all() and (e <= 1).all()
