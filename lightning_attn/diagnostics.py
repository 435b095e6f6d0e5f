r"""Fine-tuning diagnostics: how far attention moved, which tokens hoard it, and how far each head looks.

Pure tensor functions for the callback to call on the maps of :func:`~lightning_attn.maps.attention_maps` or,
inside a layer's hook, on that layer's full (B, heads, N, N) attention:

* :func:`attention_drift`: Jensen-Shannon divergence per layer between today's maps and a reference (step 0);
* :func:`artifact_tokens`: how many patches take an outsized share of the query's attention and how much they
  take (the "artifact" tokens of Darcet et al., 2023, *Vision Transformers Need Registers*);
* :func:`register_share`: the share of the query's attention that goes to register tokens
  (:func:`lightning_attn.backends.register_slice` finds them);
* :func:`mean_attention_distance`: each head's attention-weighted distance in pixels between query and key
  patches (Dosovitskiy et al., 2021, Fig. 7);
* :func:`head_query_rows`: each head's query row on the patch grid, the per-head analogue of the maps.

Everything returns float32 on the input's device and stays there: no host copies, so the callback decides when
to read the numbers.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

from .layout import TokenLayout, query_row

__all__ = [
    "artifact_mask",
    "artifact_tokens",
    "attention_drift",
    "head_query_rows",
    "mean_attention_distance",
    "register_share",
]

_MEDIAN_FLOOR = 1e-3
"""Floor on the median share in :func:`artifact_mask`, as a fraction of the uniform share 1 / P."""


def _check_maps(name: str, maps: Tensor) -> None:
    if not isinstance(maps, Tensor) or maps.dim() != 4:
        shape = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise ValueError(f"`{name}` must be (B, L, gh, gw) maps (e.g. AttentionMaps.raw), got {shape}")


def _shares(maps: Tensor) -> Tensor:
    """(..., gh, gw) -> (..., P) float32 distributions over patches; an all-zero map becomes uniform."""
    flat = maps.float().flatten(-2)
    total = flat.sum(dim=-1, keepdim=True)
    # A map with no mass says nothing about where attention went: uniform is the neutral reading.
    uniform = torch.full_like(flat, 1.0 / flat.shape[-1])
    return torch.where(total > 0, flat / torch.where(total > 0, total, torch.ones_like(total)), uniform)


def attention_drift(maps: Tensor, reference: Tensor, eps: float = 1e-12) -> Tensor:
    r"""Jensen-Shannon divergence in bits between each layer's maps and a reference, mean over probes: (L,).

    Both maps are first renormalised over their patches to distributions :math:`p` and :math:`q` (an all-zero
    map counts as uniform), then

    .. math::

        \operatorname{JSD}(p, q) = \tfrac12 \sum_i p_i \log_2 \frac{p_i}{m_i}
            + \tfrac12 \sum_i q_i \log_2 \frac{q_i}{m_i}, \qquad m = \tfrac12 (p + q)

    Why this distance: it is bounded in [0, 1] (0 = the same map, 1 = disjoint supports), so layers and runs
    compare on one scale and one plot; it is symmetric, so it does not matter which map is the reference; it
    stays finite where either map is zero (unlike KL); and, comparing distributions over patches, it measures
    *where* the query looks, not how much of its attention goes to patches rather than prefix tokens (track
    that with :func:`register_share`). Terms with :math:`p_i = 0` contribute 0; ``eps`` only keeps the
    logarithm of those zeros finite.

    A single number per step is ``attention_drift(maps, reference).mean()``, the mean over layers; no helper is
    provided for it.

    Args:
        maps: (B, L, gh, gw) non-negative maps, e.g. ``AttentionMaps.raw`` now.
        reference: (B, L, gh, gw) maps of the same probes and layers, e.g. before fine-tuning; moved to the
            device of ``maps``.
        eps: floor inside the logarithm.

    Returns:
        (L,) float32 in [0, 1] on the device of ``maps``.

    Raises:
        ValueError: either input is not 4-D, or their shapes differ.

    Example::

        >>> one_hot = torch.zeros(1, 2, 2, 2)
        >>> one_hot[0, :, 0, 0] = 1.0
        >>> attention_drift(one_hot, one_hot).tolist(), attention_drift(one_hot, one_hot.flip(-1)).tolist()
        ([0.0, 0.0], [1.0, 1.0])
    """
    _check_maps("maps", maps)
    _check_maps("reference", reference)
    if maps.shape != reference.shape:
        raise ValueError(
            f"`maps` {tuple(maps.shape)} and `reference` {tuple(reference.shape)} differ in shape: compute the "
            "reference with the same probes, image size and model (same number of layers)"
        )
    p, q = _shares(maps), _shares(reference.to(maps.device))
    log_m = torch.log((0.5 * (p + q)).clamp_min(eps))
    kl_p = (p * (torch.log(p.clamp_min(eps)) - log_m)).sum(dim=-1)
    kl_q = (q * (torch.log(q.clamp_min(eps)) - log_m)).sum(dim=-1)
    jsd = (0.5 * (kl_p + kl_q) / math.log(2.0)).clamp(0.0, 1.0)  # rounding can step just outside
    return jsd.mean(dim=0)


def _check_threshold(threshold: float) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 1.0:
        raise ValueError(
            f"`threshold` must be a number > 1 (a multiple of the median share; 10 follows Darcet et al.), "
            f"got {threshold!r}"
        )


def artifact_mask(maps: Tensor, threshold: float = 10.0) -> Tensor:
    r"""Which patches take an outsized share of each map's attention: (..., gh, gw) bool.

    With :math:`p` the map renormalised over its :math:`P` patches (an all-zero map counts as uniform, so it
    has none), patch :math:`i` is outsized when

    .. math:: p_i > t \cdot \max\!\left(\operatorname{median}(p),\ 10^{-3} / P\right)

    where ``threshold`` :math:`t` multiplies the median share (``torch.median``: the lower of the two middle
    values when :math:`P` is even). Comparing with the median makes the test independent of the grid size and
    of the share that goes to prefix tokens.

    The floor, a thousandth of the uniform share, matters when more than half the patches get nothing: the
    median is then 0, every patch with any attention would be outsized, and float dust (1e-9 after a softmax)
    would count. With the floor, only patches above :math:`10^{-2} / P` (for :math:`t = 10`) can count. A map
    that puts everything on a few patches (fewer than half) therefore counts each of them: attention confined
    to a handful of tokens is what the artifact pattern looks like.

    Args:
        maps: (..., gh, gw) non-negative maps.
        threshold: multiple of the median share above which a patch counts, > 1.

    Raises:
        ValueError: ``maps`` has fewer than 2 dims or ``threshold`` is not > 1.

    Example::

        >>> maps = torch.ones(4, 4)
        >>> maps[1, 2] = 20.0
        >>> artifact_mask(maps).nonzero().tolist()
        [[1, 2]]
    """
    if not isinstance(maps, Tensor) or maps.dim() < 2:
        shape = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise ValueError(f"`maps` must have shape (..., gh, gw), got {shape}")
    _check_threshold(threshold)
    p = _shares(maps)
    floor = _MEDIAN_FLOOR / p.shape[-1]
    median = p.median(dim=-1, keepdim=True).values.clamp_min(floor)
    return (p > threshold * median).view(maps.shape)


def artifact_tokens(maps: Tensor, threshold: float = 10.0) -> tuple[Tensor, Tensor]:
    r"""Per layer, how many patches take an outsized share of the attention, and how much they take.

    Darcet et al. (2023, *Vision Transformers Need Registers*) found that large ViTs recycle a few
    low-information patch tokens as global scratch space: those tokens get high norms and soak up a large share
    of the attention, which shows as bright isolated spots in attention maps. This counts such spots on the
    maps: a patch is outsized when its share exceeds ``threshold`` times the median share of its map (see
    :func:`artifact_mask` for the rule and the floor on the median).

    Why 10: the paper separates artifact tokens by their norm, which this callback does not see; on attention
    maps they show as isolated patches far above their surroundings. Shares of ordinary patches, even on the
    object a map highlights, stay within a few multiples of the median, so an order of magnitude above the
    median is a heuristic cut that flags the isolated spikes and not a smooth, peaked object map. It is not
    calibrated on a model: lower it to catch milder hot spots, raise it if object maps count.

    Args:
        maps: (B, L, gh, gw) non-negative maps, e.g. ``AttentionMaps.raw``.
        threshold: multiple of the median share above which a patch counts, > 1.

    Returns:
        ``(count, share)``, each (L,) float32: the mean over probes of the number of outsized patches and of the
        share of the map's attention (over patches) they take together, in [0, 1].
        All on one patch gives (1, 1); a uniform map gives (0, 0).

    Raises:
        ValueError: ``maps`` is not 4-D or ``threshold`` is not > 1.

    Example::

        >>> maps = torch.ones(1, 2, 4, 4)
        >>> maps[0, 1, 1, 2] = maps[0, 1, 3, 0] = 20.0
        >>> count, share = artifact_tokens(maps)
        >>> count.tolist(), [round(s, 4) for s in share.tolist()]
        ([0.0, 2.0], [0.0, 0.7407])
    """
    _check_maps("maps", maps)
    mask = artifact_mask(maps, threshold).flatten(-2)
    p = _shares(maps)
    count = mask.sum(dim=-1).float().mean(dim=0)
    share = (p * mask).sum(dim=-1).mean(dim=0)
    return count, share


def register_share(attention_query_rows: Tensor, register_slice: slice) -> Tensor:
    r"""Share of each layer's query attention that goes to register tokens, mean over probes: (L,).

    Each row is divided by its own sum first, so rows of softmax attention (sum 1), of the rollout, or of
    matrices with weak entries zeroed all give shares in [0, 1].

    .. math:: s = \frac{\sum_{r \in \text{registers}} a_r}{\sum_{j} a_j}

    Args:
        attention_query_rows: (B, L, N) each layer's query row over all N tokens, prefix tokens included.
        register_slice: positions of the registers in the token sequence, e.g. from :func:`register_slice`.

    Returns:
        (L,) float32 in [0, 1].

    Raises:
        ValueError: the rows are not 3-D, or the slice is not a non-empty, contiguous range of token positions.

    Example::

        >>> rows = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.5, 0.0, 0.0, 0.5]]])  # B=1, L=2, [cls][r][r][patch]
        >>> [round(s, 4) for s in register_share(rows, slice(1, 3)).tolist()]
        [0.5, 0.0]
    """
    rows = attention_query_rows
    if not isinstance(rows, Tensor) or rows.dim() != 3:
        shape = tuple(rows.shape) if isinstance(rows, Tensor) else type(rows).__name__
        raise ValueError(f"`attention_query_rows` must be (B, L, N) query rows over all tokens, got {shape}")
    n = rows.shape[-1]
    if not isinstance(register_slice, slice):
        raise ValueError(
            f"`register_slice` must be a slice of token positions, got {register_slice!r}; register_slice(model) "
            "returns None for models without registers: skip this metric for them"
        )
    positions = range(n)[register_slice]
    if len(positions) == 0 or positions.step != 1 or register_slice.stop is not None and register_slice.stop > n:
        raise ValueError(
            f"`register_slice` {register_slice} does not pick a contiguous run of the {n} tokens: pass "
            "slice(start, stop) with 0 <= start < stop <= N"
        )
    rows = rows.float()
    total = rows.sum(dim=-1)
    registers = rows[..., register_slice].sum(dim=-1)
    share = registers / torch.where(total > 0, total, torch.ones_like(total))
    return share.mean(dim=0)


def _pair(value: object, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)  # type: ignore[arg-type]
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"`{name}` must be a positive int or a pair of them (height, width), got {value!r}")
    return pair


@lru_cache(maxsize=32)
def _patch_distances(grid_size: tuple[int, int], patch_size: tuple[int, int], device: torch.device) -> Tensor:
    """(P, P) float32 distances in pixels between patch centres, patches row-major; cached per grid and device.

    Callers only read it: the cached tensor is shared.
    """
    (gh, gw), (ph, pw) = grid_size, patch_size
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    # Centres are at (r + 1/2, c + 1/2) patches; the half cancels in differences.
    centres = torch.stack([rows.flatten() * ph, cols.flatten() * pw], dim=-1).double()
    return torch.cdist(centres, centres).float().to(device)


def mean_attention_distance(
    attention: Tensor,
    grid_size: tuple[int, int],
    num_prefix_tokens: int,
    patch_size: tuple[int, int] | int,
) -> Tensor:
    r"""Each head's attention-weighted distance in pixels between query and key patches: (B, heads).

    Dosovitskiy et al. (2021, Fig. 7) read it as the receptive field of a head: near 0 for heads that look at
    their own neighbourhood, about the image's mean pairwise patch distance for heads that look everywhere. For
    query patch :math:`i`, key patch :math:`j` and patch-centre distance :math:`d_{ij}` in pixels (grid steps
    times the patch's height and width, so non-square patches and grids work):

    .. math::

        D = \frac{1}{|Q|} \sum_{i \in Q} \sum_j w_{ij}\, d_{ij}, \qquad
        w_{ij} = \frac{a_{ij}}{\sum_{k} a_{ik}}

    with :math:`i, j, k` over patches only. Prefix keys (class, distillation, registers) are dropped and the
    weights renormalised over patch keys, because those tokens have no position in the image; prefix queries
    are dropped for the same reason. :math:`Q` is the set of queries with some attention on patches (all of
    them for softmax attention); the distance is 0 if there are none.

    Args:
        attention: (B, heads, N, N) one layer's attention, N = ``num_prefix_tokens`` + gh * gw.
        grid_size: (gh, gw) patch grid.
        num_prefix_tokens: tokens before the patches.
        patch_size: patch side in pixels, or (height, width).

    Returns:
        (B, heads) float32 in pixels on the attention's device.

    Raises:
        ValueError: ``attention`` is not (B, heads, N, N) with N matching the grid and prefix, or the sizes are
            not positive ints.

    Example::

        >>> identity = torch.eye(5).expand(1, 2, 5, 5)  # [cls] + 2x2 patches, each token attends to itself
        >>> mean_attention_distance(identity, (2, 2), num_prefix_tokens=1, patch_size=16).tolist()
        [[0.0, 0.0]]
        >>> uniform = torch.full((1, 1, 3, 3), 1 / 3)  # [cls] + 1x2 patches of 16 pixels: half the keys are 16 away
        >>> mean_attention_distance(uniform, (1, 2), num_prefix_tokens=1, patch_size=16).tolist()
        [[8.0]]
    """
    grid = _pair(grid_size, "grid_size")
    patch = _pair(patch_size, "patch_size")
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise ValueError(f"`num_prefix_tokens` must be a non-negative int, got {num_prefix_tokens!r}")
    n = num_prefix_tokens + grid[0] * grid[1]
    if not isinstance(attention, Tensor) or attention.dim() != 4 or attention.shape[-2:] != (n, n):
        shape = tuple(attention.shape) if isinstance(attention, Tensor) else type(attention).__name__
        raise ValueError(
            f"`attention` must be (B, heads, N, N) with N = {num_prefix_tokens} prefix + {grid[0]}x{grid[1]} "
            f"patches = {n}, got {shape}: check `grid_size` and `num_prefix_tokens` (see token_layout)"
        )
    a = attention[..., num_prefix_tokens:, num_prefix_tokens:].float()
    total = a.sum(dim=-1)
    valid = total > 0
    weights = a / torch.where(valid, total, torch.ones_like(total)).unsqueeze(-1)
    per_query = (weights * _patch_distances(grid, patch, a.device)).sum(dim=-1)
    return (per_query * valid).sum(dim=-1) / valid.sum(dim=-1).clamp_min(1)


def head_query_rows(attention: Tensor, layout: TokenLayout) -> Tensor:
    """Each head's query row on the patch grid: (B, heads, N, N) -> (B, heads, gh, gw) float32.

    The per-head analogue of the maps: the class-token row or the mean over patch-token rows, as
    ``layout.query`` says, restricted to patch columns (:func:`~lightning_attn.layout.query_row` with the heads
    folded into the batch).

    Raises:
        ValueError: ``attention`` is not (B, heads, N, N) with the layout's N.

    Example::

        >>> layout = TokenLayout(num_prefix_tokens=1, grid_size=(2, 3), query="cls")
        >>> tuple(head_query_rows(torch.rand(2, 4, 7, 7), layout).shape)
        (2, 4, 2, 3)
    """
    n = layout.num_tokens
    if not isinstance(attention, Tensor) or attention.dim() != 4 or attention.shape[-2:] != (n, n):
        shape = tuple(attention.shape) if isinstance(attention, Tensor) else type(attention).__name__
        raise ValueError(
            f"`attention` must be (B, heads, N, N) with the layout's N = {layout.num_prefix_tokens} prefix + "
            f"{layout.grid_size[0]}x{layout.grid_size[1]} patches = {n}, got {shape}"
        )
    b, h = attention.shape[:2]
    rows = query_row(attention.float().flatten(0, 1), layout)
    return rows.reshape(b, h, *layout.grid_size)
