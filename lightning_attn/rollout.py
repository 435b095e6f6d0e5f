r"""Attention rollout (Abnar & Zuidema, 2020) and its gradient-weighted variants as pure tensor math.

For layer :math:`l` with softmax attention :math:`A_l` (B, heads, N, N):

.. math::

    F_l = \operatorname{fuse}_{h}(A_l) \qquad
    \hat A_l = \frac{F_l + I}{(F_l + I)\,\mathbf 1} \qquad
    R_l = \hat A_l R_{l-1}, \quad R_{-1} = I

where ``fuse`` is the mean, max or min over heads and, before the residual, the
``floor(N * N * discard_ratio)`` smallest entries of each sample's :math:`F_l` are set to zero (never entry
[0, 0]). All math runs in float32 whatever the input dtype.

:func:`grad_rollout` and :func:`relevance_propagation` weight each head's attention by the gradient of a class
score with respect to it (:math:`\nabla A_l = \partial y_c / \partial A_l`, same shape as :math:`A_l`) before
fusing heads; the caller computes the gradients (see :func:`lightning_attn.attention_maps`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "HEAD_FUSIONS",
    "attention_rollout",
    "check_discard_ratio",
    "check_head_fusion",
    "discard_weakest",
    "fuse_heads",
    "grad_rollout",
    "relevance_propagation",
    "residual_transition",
]

HEAD_FUSIONS = ("mean", "max", "min")


def check_head_fusion(head_fusion: str) -> None:
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"`head_fusion` must be one of {HEAD_FUSIONS}, got {head_fusion!r}")


def check_discard_ratio(discard_ratio: float) -> None:
    if not isinstance(discard_ratio, (int, float)) or not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"`discard_ratio` must be a number in [0, 1), got {discard_ratio!r}")


def fuse_heads(attention: Tensor, head_fusion: str = "mean") -> Tensor:
    """Fuse the heads of a (B, heads, N, N) attention into (B, N, N) float32 by mean, max or min."""
    check_head_fusion(head_fusion)
    if attention.dim() != 4 or attention.shape[-1] != attention.shape[-2]:
        raise ValueError(f"expected attention of shape (B, heads, N, N), got {tuple(attention.shape)}")
    attention = attention.float()
    if head_fusion == "mean":
        return attention.mean(dim=1)
    if head_fusion == "max":
        return attention.amax(dim=1)
    return attention.amin(dim=1)


def discard_weakest(fused: Tensor, discard_ratio: float) -> Tensor:
    """Zero the ``floor(N*N*discard_ratio)`` smallest entries of each sample of ``fused`` (B, N, N), never [0, 0].

    Applied per sample: the copied vit-explain code zeroes them in batch element 0 only.
    """
    check_discard_ratio(discard_ratio)
    b, n, _ = fused.shape
    k = math.floor(n * n * discard_ratio)
    if k == 0:
        return fused
    flat = fused.reshape(b, n * n)
    # Entry [0, 0] must survive: make it the largest so it is never among the k smallest.
    candidates = flat.clone()
    candidates[:, 0] = float("inf")
    weakest = candidates.topk(k, dim=-1, largest=False).indices
    return flat.scatter(-1, weakest, 0.0).reshape(b, n, n)


def residual_transition(fused: Tensor, in_place: bool = False) -> Tensor:
    """Â = (F + I) / row sums: the residual connection modelled as identity, rows normalised to 1.

    The row sums keep their dimension; ``a / a.sum(dim=-1)`` would broadcast over the last axis and divide each
    column ``j`` by the sum of row ``j`` instead. ``in_place`` computes it in ``fused``'s memory.
    """
    a = fused if in_place else fused.clone()
    a.diagonal(dim1=-2, dim2=-1).add_(1.0)
    return a.div_(a.sum(dim=-1, keepdim=True))


def attention_rollout(
    attentions: Sequence[Tensor],
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
) -> Tensor:
    """Cumulative attention rollout after every layer.

    Args:
        attentions: L tensors (B, heads, N, N) in forward order, e.g. ``record_attention(...).attentions``.
        head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads.
        discard_ratio: share in [0, 1) of each fused matrix's entries zeroed, smallest first.

    Returns:
        (B, L, N, N) float32: ``R_l`` after layers 0..l for every l.

    Example::

        >>> import torch
        >>> attn = [torch.softmax(torch.randn(2, 3, 5, 5), dim=-1) for _ in range(4)]
        >>> r = attention_rollout(attn)
        >>> tuple(r.shape), bool(torch.allclose(r.sum(-1), torch.ones(2, 4, 5)))
        ((2, 4, 5, 5), True)
    """
    check_head_fusion(head_fusion)
    check_discard_ratio(discard_ratio)
    if len(attentions) == 0:
        raise ValueError("`attentions` is empty: no attention layer ran (was the forward inside record_attention?)")
    out = []
    rollout = None
    for attention in attentions:
        step = residual_transition(discard_weakest(fuse_heads(attention, head_fusion), discard_ratio))
        rollout = step if rollout is None else step @ rollout
        out.append(rollout)
    return torch.stack(out, dim=1)


def _check_pairs(attentions: Sequence[Tensor], gradients: Sequence[Tensor]) -> None:
    if len(attentions) == 0:
        raise ValueError("`attentions` is empty: no attention layer ran (was the forward inside record_attention?)")
    if len(gradients) != len(attentions):
        raise ValueError(
            f"got {len(attentions)} attentions but {len(gradients)} gradients: pass one gradient per layer, "
            "in the same (forward) order as the attentions"
        )
    for index, (attention, gradient) in enumerate(zip(attentions, gradients)):
        if attention.dim() != 4 or attention.shape[-1] != attention.shape[-2]:
            raise ValueError(f"expected attention of shape (B, heads, N, N), got {tuple(attention.shape)}")
        if gradient.shape != attention.shape:
            raise ValueError(
                f"layer {index}: gradient shape {tuple(gradient.shape)} differs from attention shape "
                f"{tuple(attention.shape)}; each gradient must be d(score)/d(attention) of its own layer"
            )


def grad_rollout(
    attentions: Sequence[Tensor],
    gradients: Sequence[Tensor],
    discard_ratio: float = 0.0,
) -> Tensor:
    r"""Gradient-weighted attention rollout (vit-explain's ``grad_rollout``) after every layer.

    .. math::

        G_l = \max\bigl(0,\ \operatorname{mean}_h(A_l \odot \nabla A_l)\bigr) \qquad
        \hat A_l = \frac{G_l + I}{(G_l + I)\,\mathbf 1} \qquad
        R_l = \hat A_l R_{l-1}, \quad R_{-1} = I

    with the ``floor(N * N * discard_ratio)`` smallest entries of each sample's :math:`G_l` zeroed before the
    residual (as in :func:`attention_rollout`). Negatives are cut after the head mean, as vit-explain does.

    Args:
        attentions: L tensors (B, heads, N, N) in forward order.
        gradients: L tensors of the same shapes, ``gradients[l]`` the gradient of the class score with respect to
            ``attentions[l]`` (same order: pairing layer ``l``'s gradient with another layer's attention is wrong).
        discard_ratio: share in [0, 1) of each weighted matrix's entries zeroed, smallest first.

    Returns:
        (B, L, N, N) float32, rows summing to 1.

    Example::

        >>> import torch
        >>> attn = [torch.softmax(torch.randn(2, 3, 5, 5), dim=-1) for _ in range(4)]
        >>> grads = [torch.randn(2, 3, 5, 5) for _ in range(4)]
        >>> r = grad_rollout(attn, grads, discard_ratio=0.5)
        >>> tuple(r.shape), bool(torch.allclose(r.sum(-1), torch.ones(2, 4, 5)))
        ((2, 4, 5, 5), True)
    """
    check_discard_ratio(discard_ratio)
    _check_pairs(attentions, gradients)
    out = []
    rollout = None
    for attention, gradient in zip(attentions, gradients):
        # upcast before the product: bf16 products of small gradients lose most of their digits
        weighted = (attention.float() * gradient.float()).mean(dim=1).clamp_min(0.0)
        step = residual_transition(discard_weakest(weighted, discard_ratio))
        rollout = step if rollout is None else step @ rollout
        out.append(rollout)
    return torch.stack(out, dim=1)


def relevance_propagation(attentions: Sequence[Tensor], gradients: Sequence[Tensor]) -> Tensor:
    r"""Gradient-weighted relevance after every layer: Chefer et al. (2021), the rule for self-attention encoders.

    .. math::

        \bar A_l = \operatorname{mean}_h\bigl(\max(0,\ \nabla A_l \odot A_l)\bigr) \qquad
        R_l = R_{l-1} + \bar A_l R_{l-1}, \quad R_{-1} = I

    Negatives are cut per head before the mean, as in the paper's code. No row normalisation: the identity
    carries each token's own relevance through the residual connection, and adds nothing to the patch columns
    of the class-token row.

    Args:
        attentions: L tensors (B, heads, N, N) in forward order.
        gradients: L tensors of the same shapes, ``gradients[l]`` the gradient of the class score with respect to
            ``attentions[l]``.

    Returns:
        (B, L, N, N) float32, non-negative.

    Example::

        >>> import torch
        >>> attn = [torch.softmax(torch.randn(2, 3, 5, 5), dim=-1) for _ in range(4)]
        >>> grads = [torch.randn(2, 3, 5, 5) for _ in range(4)]
        >>> r = relevance_propagation(attn, grads)
        >>> tuple(r.shape), bool((r >= 0).all()), bool((r.diagonal(dim1=-2, dim2=-1) >= 1).all())
        ((2, 4, 5, 5), True, True)
    """
    _check_pairs(attentions, gradients)
    n = attentions[0].shape[-1]
    # dtype explicit: under Lightning's "bf16-true" the default dtype is bfloat16
    relevance = torch.eye(n, dtype=torch.float32, device=attentions[0].device).expand(attentions[0].shape[0], n, n)
    out = []
    for attention, gradient in zip(attentions, gradients):
        weighted = (gradient.float() * attention.float()).clamp_min(0.0).mean(dim=1)
        relevance = relevance + weighted @ relevance
        out.append(relevance)
    return torch.stack(out, dim=1)
