"""Independent float64 re-implementations of the formulas, written from the definitions, loop by loop.

Deliberately naive (per sample, numpy, argsort instead of topk) so a shared bug with the package is unlikely.
"""

from __future__ import annotations

import copy
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
    elif query == "cls_dist":  # distilled DeiT: the mean of the class and distillation rows
        rows = (mats[:, :, 0, :] + mats[:, :, 1, :]) / 2
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


def grad_rollout(attentions: list[np.ndarray], gradients: list[np.ndarray], ratio: float = 0.0) -> np.ndarray:
    """-> (B, L, N, N): G = max(0, mean_h(A * dA)), discard, Â = (G + I) / row sums, R_l = Â_l R_{l-1}."""
    b, _, n, _ = attentions[0].shape
    out = np.zeros((b, len(attentions), n, n))
    for s in range(b):
        r = np.eye(n)
        for l, (a, g) in enumerate(zip(attentions, gradients)):
            weighted = (a[s] * g[s]).mean(axis=0)
            weighted[weighted < 0] = 0.0
            ahat = discard(weighted, ratio) + np.eye(n)
            for i in range(n):
                ahat[i] = ahat[i] / ahat[i].sum()
            r = ahat @ r
            out[s, l] = r
    return out


def relevance(attentions: list[np.ndarray], gradients: list[np.ndarray]) -> np.ndarray:
    """-> (B, L, N, N): Ā = mean_h(max(0, dA * A)), R_l = R_{l-1} + Ā_l R_{l-1}, R_{-1} = I."""
    b, _, n, _ = attentions[0].shape
    out = np.zeros((b, len(attentions), n, n))
    for s in range(b):
        r = np.eye(n)
        for l, (a, g) in enumerate(zip(attentions, gradients)):
            heads = g[s] * a[s]
            heads[heads < 0] = 0.0
            r = r + heads.mean(axis=0) @ r
            out[s, l] = r
    return out


def attention_gradients_float64(
    model: torch.nn.Module, images: torch.Tensor, target: list[int] | None = None
) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
    """Every layer's softmax attention and d(logit of each image's target)/d(attention), in float64.

    A float64 copy of the model with its own hooks (not the package's); one `autograd.grad` per image and per
    layer, so neither a batch-sum trick nor the layer order of a backward pass is shared with the package.
    Returns (attentions, gradients, targets); target None = each image's argmax.
    """
    m = copy.deepcopy(model).double().eval()
    recorded: list[torch.Tensor] = []
    handles = []
    for module in m.modules():
        if hasattr(module, "fused_attn") and isinstance(getattr(module, "attn_drop", None), torch.nn.Module):
            module.fused_attn = False
            handles.append(module.attn_drop.register_forward_hook(lambda mod, inp, out: recorded.append(inp[0])))
    x = images.detach().double().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = m(x)
    for h in handles:
        h.remove()
    b = images.shape[0]
    targets = [int(logits[s].argmax()) for s in range(b)] if target is None else list(target)
    atts = [a.detach().numpy() for a in recorded]
    grads = [np.zeros_like(a) for a in atts]
    for s in range(b):
        for l, a in enumerate(recorded):
            (g,) = torch.autograd.grad(logits[s, targets[s]], a, retain_graph=True)
            grads[l][s] = g[s].numpy()
    return atts, grads, targets


def pointing_game(maps: torch.Tensor, masks: torch.Tensor) -> np.ndarray:
    """Share of each map's mass inside the mask, the mask's share of every patch counted pixel by pixel."""
    m = maps.double().numpy()
    k = masks.double().numpy()
    b, gh, gw = m.shape
    ph, pw = k.shape[1] // gh, k.shape[2] // gw
    out = np.zeros(b)
    for s in range(b):
        inside = 0.0
        for i in range(gh):
            for j in range(gw):
                inside += m[s, i, j] * k[s, i * ph : (i + 1) * ph, j * pw : (j + 1) * pw].mean()
        out[s] = inside / m[s].sum()
    return out
