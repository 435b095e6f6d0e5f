"""Scalar summaries of attention maps that tell whether attention is healthy."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["normalized_entropy"]


def normalized_entropy(maps: Tensor, eps: float = 1e-12) -> Tensor:
    r"""Entropy of each map over its patches divided by ``log(num_patches)``: 0 = all on one patch, 1 = uniform.

    Each map (the last two dims, gh x gw) is first renormalised to sum to 1 over patches, so the share of
    attention that went to prefix tokens does not count.

    .. math:: H(p) = -\frac{1}{\log P} \sum_i p_i \log p_i, \qquad p = m / \textstyle\sum_i m_i

    Args:
        maps: (..., gh, gw) non-negative maps.

    Returns:
        (...) float32 in [0, 1]; 0 where the grid has a single patch.

    Example::

        >>> normalized_entropy(torch.ones(2, 4, 4)).tolist()
        [1.0, 1.0]
    """
    flat = maps.float().flatten(-2)
    num = flat.shape[-1]
    if num < 2:
        return torch.zeros(flat.shape[:-1], device=flat.device)
    p = flat / flat.sum(dim=-1, keepdim=True).clamp_min(eps)
    h = -(p * torch.log(p.clamp_min(eps))).sum(dim=-1)
    return (h / math.log(num)).clamp(0.0, 1.0)
