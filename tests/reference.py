"""Independent float64 re-implementations of the formulas, written from the definitions, loop by loop.

Deliberately naive (per sample, numpy, argsort instead of topk) so a shared bug with the package is unlikely.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def fuse(a: np.ndarray, how: str) -> np.ndarray:
    """a: (heads, N, N) -> (N, N)."""
    return {"mean": a.mean(axis=0), "max": a.max(axis=0), "min": a.min(axis=0)}[how]


def discard(f: np.ndarray, ratio: float) -> np.ndarray:
    n = f.shape[0]
    k = math.floor(n * n * ratio)
    flat = f.reshape(-1).copy()
    order = [i for i in np.argsort(flat, kind="stable") if i != 0][:k]
    flat[order] = 0.0
    return flat.reshape(n, n)


def rollout(attentions: list[torch.Tensor], how: str = "mean", ratio: float = 0.0) -> np.ndarray:
    """-> (B, L, N, N) float64: R_l = Â_l R_{l-1}, Â = (F + I) / row sums."""
    atts = [a.detach().double().cpu().numpy() for a in attentions]
    b, _, n, _ = atts[0].shape
    out = np.zeros((b, len(atts), n, n))
    for s in range(b):
        r = np.eye(n)
        for l, a in enumerate(atts):
            f = discard(fuse(a[s], how), ratio)
            ahat = f + np.eye(n)
            for i in range(n):
                ahat[i] = ahat[i] / ahat[i].sum()
            r = ahat @ r
            out[s, l] = r
    return out


def query_rows(mats: np.ndarray, num_prefix: int, query: str) -> np.ndarray:
    """mats (B, L, N, N) -> (B, L, P) query row over patch columns."""
    if query == "cls":
        rows = mats[:, :, 0, :]
    else:
        rows = mats[:, :, num_prefix:, :].mean(axis=2)
    return rows[:, :, num_prefix:]


def raw_fused(attentions: list[torch.Tensor], how: str = "mean") -> np.ndarray:
    atts = [a.detach().double().cpu().numpy() for a in attentions]
    return np.stack([np.stack([fuse(a[s], how) for a in atts]) for s in range(atts[0].shape[0])])


def attention_from_qkv(attn_module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention of a timm `Attention` recomputed by hand in float64 from its qkv projection."""
    m = attn_module
    x = x.double()
    b, n, c = x.shape
    w = m.qkv.weight.double()
    bias = m.qkv.bias.double() if m.qkv.bias is not None else None
    qkv = torch.nn.functional.linear(x, w, bias).reshape(b, n, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(m.head_dim)
    scores = scores - scores.amax(dim=-1, keepdim=True)
    e = scores.exp()
    return e / e.sum(dim=-1, keepdim=True)
