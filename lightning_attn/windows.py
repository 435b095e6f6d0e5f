r"""Windowed, hierarchical attention (Swin) read as whole-image matrices on the finest patch grid, without building
them.

A Swin block attends inside windows of its stage's token grid: its softmax weights arrive as (B * windows, heads,
w, w), ``w`` tokens per window, the windows shifted and padded as its :class:`~lightning_attn.layout.WindowGrid`
says. Placed at their windows (shifted windows shifted back), they form the block's whole-image attention
:math:`A` over the stage's :math:`n` tokens, block-diagonal across windows. Padded tokens are dropped and each
row renormalised over the real keys it attended (a padded key took some weight where no shift mask covers it).

Every map lies on the finest (stage-1) grid of :math:`N` patches. With :math:`P` (N x n) saying which stage token
covers each patch and :math:`Q` (n x N) spreading a token evenly over the patches it covers (:math:`Q P = I`), a
block's matrix on the patch grid is :math:`P A Q`, each row a distribution over the patches:

.. math::

    \text{raw}_l = q^\top P A_l Q, \qquad
    \text{rollout}_l = q^\top \, P \hat A_l Q \; P \hat A_{l-1} Q \cdots P \hat A_0 Q, \qquad
    \hat A = \frac{A + I}{(A + I)\,\mathbf 1}

with :math:`q = \mathbf 1 / N` (Swin pools the mean of its tokens). Between stages :math:`Q P'` is patch merging
as pooling (a later token averages the tokens it merges), and the residual of a later-stage token is its own
identity, :math:`P I Q`. Only row vectors are ever multiplied: a (B, k, N) stack of rows times a block costs
O(k N w) (:func:`rows_times`), never an N x N matrix, so a 56 x 56 first stage needs no 3136^2 matrix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import Tensor

from .layout import TokenLayout, WindowGrid
from .rollout import check_discard_ratio, residual_transition

__all__ = [
    "chain_rows",
    "discard_in_windows",
    "mean_query",
    "place_windows",
    "rows_times",
    "check_grid",
    "whole_image",
    "window_distance",
    "window_gradient_rows",
]


@lru_cache(maxsize=64)
def _tokens(grid: WindowGrid, device: torch.device) -> Tensor:
    return grid.tokens(device)


@lru_cache(maxsize=64)
def _cover(fine: tuple[int, int], stride: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The stage token covering each finest patch, (N,) row-major, and how many patches each token covers."""
    gh, gw = fine
    coarse_w = math.ceil(gw / stride)
    rows = torch.arange(gh, device=device)[:, None] // stride
    cols = torch.arange(gw, device=device)[None, :] // stride
    owner = (rows * coarse_w + cols).reshape(-1)
    counts = torch.bincount(owner, minlength=math.ceil(gh / stride) * coarse_w)
    return owner, counts.float()


def check_grid(grid: WindowGrid, fine: tuple[int, int]) -> None:
    """Raise a ``ValueError`` when ``grid``'s stage grid is not the ``fine`` patch grid seen at its stride.

    Example::

        >>> check_grid(WindowGrid((5, 5), (2, 2), stride=2), (9, 10))  # ceil(9 / 2) = 5, ceil(10 / 2) = 5: fits
    """
    expected = (math.ceil(fine[0] / grid.stride), math.ceil(fine[1] / grid.stride))
    if tuple(grid.grid) != expected:
        raise ValueError(
            f"a stage grid of {grid.grid} at stride {grid.stride} does not cover the {fine} patch grid (expected "
            f"{expected}): the backend's WindowGrid is wrong for this input"
        )


def place_windows(attention: Tensor, grid: WindowGrid, renormalise: bool = True) -> Tensor:
    """One block's window weights, (B * windows, ...k, w, w) as the attention used them, as (B, windows, ...k, w, w)
    float32 with padded queries and keys dropped (zeroed) and, with ``renormalise``, each real row renormalised
    over the real keys.

    Example::

        >>> g = WindowGrid((1, 3), (1, 2))  # 1x3 tokens in windows of 1x2: the second window holds a padded token
        >>> attention = torch.full((2, 1, 2, 2), 0.5)  # one image: 2 windows, 1 head
        >>> place_windows(attention, g)[0, 1, 0].tolist()
        [[1.0, 0.0], [0.0, 0.0]]
    """
    tokens = _tokens(grid, attention.device)
    windows, w = tokens.shape
    if attention.shape[0] % windows or attention.shape[-1] != w:
        raise ValueError(
            f"window attention of shape {tuple(attention.shape)} does not fit {windows} windows of {w} tokens "
            f"({grid}): the backend's WindowGrid differs from what the block did"
        )
    a = attention.float().reshape(-1, windows, *attention.shape[1:])
    valid = tokens >= 0
    if bool(valid.all()):
        return a
    extra = a.dim() - 4  # head dimensions between the windows and the (w, w) weights
    keys = valid.reshape(windows, *([1] * extra), 1, w).to(a.dtype)
    a = a * keys
    if renormalise:
        a = a / a.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    return a * valid.reshape(windows, *([1] * extra), w, 1).to(a.dtype)


def rows_times(rows: Tensor, blocks: Tensor, grid: WindowGrid, fine: tuple[int, int]) -> Tensor:
    """Row vectors on the patch grid times a block's whole-image matrix on the patch grid: ``rows P M Q``.

    Args:
        rows: (B, k, N) row vectors over the ``fine`` grid's N patches.
        blocks: (B, windows, w, w) the block's (placed) window matrix ``M``.
        grid: the block's windows.
        fine: (gh, gw) finest patch grid.

    Returns:
        (B, k, N): each row pooled onto the stage's tokens (summed over the patches a token covers), multiplied by
        the block-diagonal matrix window by window, and spread evenly back over the patches.

    Example::

        >>> g = WindowGrid((2, 2), (2, 2), stride=2)  # stage 2 of a 4x4 patch grid: one window of 2x2 tokens
        >>> uniform = torch.full((1, 1, 4, 4), 0.25)
        >>> rows_times(torch.full((1, 1, 16), 1 / 16), uniform, g, (4, 4)).sum().item()
        1.0
    """
    tokens = _tokens(grid, rows.device)
    owner, counts = _cover(tuple(fine), grid.stride, rows.device)
    n = grid.grid[0] * grid.grid[1]
    slot = torch.where(tokens >= 0, tokens, n).reshape(-1)  # padding goes to slot n, which holds zeros
    b, k, _ = rows.shape
    pooled = rows.new_zeros(b, k, n + 1).index_add_(-1, owner, rows)
    gathered = pooled[..., slot].reshape(b, k, *tokens.shape)
    out = torch.einsum("bknr,bnrc->bknc", gathered, blocks)
    stage = rows.new_zeros(b, k, n + 1).index_add_(-1, slot, out.reshape(b, k, -1))[..., :n]
    return stage[..., owner] / counts[owner]


def mean_query(batch: int, fine: tuple[int, int], device: torch.device | str = "cpu") -> Tensor:
    """``query="mean"`` as a row vector: the mean over every patch's row, (B, 1, N).

    Example::

        >>> mean_query(2, (2, 2)).tolist()
        [[[0.25, 0.25, 0.25, 0.25]], [[0.25, 0.25, 0.25, 0.25]]]
    """
    n = fine[0] * fine[1]
    return torch.full((batch, 1, n), 1.0 / n, device=device)


def whole_image(blocks: Tensor, grid: WindowGrid, fine: tuple[int, int]) -> Tensor:
    """A block's whole-image matrix on the patch grid, ``P M Q``: (B, windows, w, w) -> (B, N, N).

    Dense, N^2 per image: for the matrix pictures of a few layers and for tests; the maps never build it.

    Example::

        >>> g = WindowGrid((2, 4), (2, 2))  # two windows side by side, each attending uniformly inside itself
        >>> m = whole_image(torch.full((1, 2, 4, 4), 0.25), g, (2, 4))
        >>> m[0, 0].tolist(), m.sum(-1).tolist()
        ([0.25, 0.25, 0.0, 0.0, 0.25, 0.25, 0.0, 0.0], [[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    """
    tokens = _tokens(grid, blocks.device)
    owner, counts = _cover(tuple(fine), grid.stride, blocks.device)
    n = grid.grid[0] * grid.grid[1]
    slot = torch.where(tokens >= 0, tokens, n)
    b = blocks.shape[0]
    stage = blocks.new_zeros(b, n + 1, n + 1)
    stage[:, slot[:, :, None], slot[:, None, :]] = blocks.float()
    stage = stage[:, :n, :n]
    return stage[:, owner][:, :, owner] / counts[owner]


def window_distance(blocks: Tensor, grid: WindowGrid, patch_size: tuple[int, int]) -> Tensor:
    """Each head's mean attention distance in pixels inside the windows: (B, windows, heads, w, w) -> (B, heads).

    The ViT definition (:func:`~lightning_attn.diagnostics.mean_attention_distance`) on the block's stage: queries
    are the stage's real tokens, each weighing equally, and distances run between token centres, a grid step
    being ``stride`` patches. Windows keep it local: at most the window's diagonal.
    """
    tokens = _tokens(grid, blocks.device)
    valid = tokens >= 0
    ph, pw = patch_size
    r = torch.div(tokens, grid.grid[1], rounding_mode="floor").double() * grid.stride * ph
    c = (tokens % grid.grid[1]).double() * grid.stride * pw
    d = ((r[:, :, None] - r[:, None, :]) ** 2 + (c[:, :, None] - c[:, None, :]) ** 2).sqrt().float()
    per_query = (blocks * d[:, None]).sum(dim=-1)  # (B, windows, heads, w)
    per_query = per_query * valid[:, None, :].to(per_query.dtype)
    return per_query.sum(dim=(1, 3)) / valid.sum().clamp_min(1)


def discard_in_windows(fused: Tensor, discard_ratio: float) -> Tensor:
    """Zero the ``floor(entries * discard_ratio)`` smallest in-window entries of each image: (B, windows, w, w).

    Example::

        >>> discard_in_windows(torch.tensor([[[[0.25, 0.75], [0.5, 0.125]]]]), 0.5).tolist()
        [[[[0.0, 0.75], [0.5, 0.0]]]]
    """
    check_discard_ratio(discard_ratio)
    b = fused.shape[0]
    flat = fused.reshape(b, -1)
    k = math.floor(flat.shape[1] * discard_ratio)
    if k == 0:
        return fused
    weakest = flat.topk(k, dim=-1, largest=False).indices
    return flat.scatter(-1, weakest, 0.0).reshape(fused.shape)


def chain_rows(steps: Sequence[Tensor], layout: TokenLayout, first: Tensor) -> Tensor:
    """Rows ``first S_l S_{l-1} ... S_0`` for every block l, each ``S`` a block's (B, windows, w, w) step read on
    the patch grid (``P S Q``), multiplied right to left as row vectors: (B, L, gh, gw).

    Example::

        >>> g = WindowGrid((2, 2), (2, 2))
        >>> layout = TokenLayout(0, (2, 2), "mean", windows=(g, g))
        >>> steps = [torch.eye(4)[None, None], torch.full((1, 1, 4, 4), 0.25)]
        >>> chain_rows(steps, layout, mean_query(1, (2, 2))).sum((-2, -1)).tolist()
        [[1.0, 1.0]]
    """
    assert layout.windows is not None
    fine = layout.grid_size
    pending: Tensor | None = None  # (B, k, N): the rows of layers l .. L-1, multiplied down to layer l
    for index in range(len(steps) - 1, -1, -1):
        rows = first if pending is None else torch.cat([first, pending], dim=1)
        pending = rows_times(rows, steps[index], layout.windows[index], fine)
    assert pending is not None
    return pending.reshape(pending.shape[0], pending.shape[1], *fine)


def window_gradient_rows(
    method: str,
    attentions: Sequence[Tensor],
    gradients: Sequence[Tensor],
    layout: TokenLayout,
    discard_ratio: float = 0.0,
) -> Tensor:
    r"""``"grad_rollout"`` or ``"relevance"`` of a windowed model on the patch grid, (B, L, gh, gw).

    The ViT formulas (:func:`~lightning_attn.rollout.grad_rollout`,
    :func:`~lightning_attn.rollout.relevance_propagation`) on each block's whole-image matrix: the gradient-weighted
    windows (padded tokens dropped, not renormalised) give the step :math:`P \hat G_l Q` for grad_rollout and
    :math:`P (I + \bar A_l) Q` for relevance.

    Args:
        method: ``"grad_rollout"`` or ``"relevance"``.
        attentions: each block's (B * windows, heads, w, w) weights, in forward order.
        gradients: the gradient of the target score with respect to each of them.
        layout: the windowed layout (``layout.windows`` set).
        discard_ratio: share of each image's in-window entries zeroed, smallest first (grad_rollout only).
    """
    assert layout.windows is not None
    steps = []
    for attention, gradient, grid in zip(attentions, gradients, layout.windows):
        product = attention.float() * gradient.float()
        if method == "grad_rollout":
            weighted = place_windows(product.mean(dim=1), grid, renormalise=False).clamp_min(0.0)
            steps.append(residual_transition(discard_in_windows(weighted, discard_ratio)))
        else:
            weighted = place_windows(product.clamp_min(0.0).mean(dim=1), grid, renormalise=False)
            steps.append(weighted + torch.eye(weighted.shape[-1], device=weighted.device))
    batch = steps[0].shape[0]
    return chain_rows(steps, layout, mean_query(batch, layout.grid_size, steps[0].device))
