"""Token layout of a ViT: how many prefix tokens come first, the patch grid of an input, and which query to read.

Every supported family puts its prefix tokens (class, distillation, registers, in that order) first, then the
patches row-major over the grid. Which token "speaks for the image" depends on the head: the class token when
the head reads it (``"cls"``), the class and distillation tokens when a distilled DeiT averages both heads
(``"cls_dist"``), otherwise (average pooling, attention pooling, no class token) every patch does, so the query
row is the mean over patch-token rows (``"mean"``). Reading a model's layout is its backend's job
(:func:`lightning_attn.token_layout`); this module only describes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .names import QUERIES

__all__ = ["QUERIES", "TokenLayout", "WindowGrid", "query_row", "query_vector"]


@dataclass(frozen=True)
class WindowGrid:
    """How one block of a windowed, hierarchical model (Swin) cuts its stage's token grid into windows.

    A stage's token ``(r, c)`` covers the finest (stage-1) patches ``(i, j)`` with ``i // stride == r`` and
    ``j // stride == c`` (patch merging halves the grid, padding odd sides at the bottom and right, so the stage
    grid is ``ceil(fine / stride)``). The block pads its grid to whole windows at the bottom and right, rolls it
    by ``-shift`` (``roll_first``: timm rolls the unpadded grid, then pads; torchvision and Hugging Face pad, then
    roll the padded grid) and hands the windows, row-major, to its attention as the batch dimension.

    Attributes:
        grid: (h, w) tokens of the block's stage for the actual input, before padding.
        window: (wh, ww) tokens per window side.
        shift: (sh, sw) cyclic shift of the shifted-window blocks, (0, 0) for the others.
        stride: finest patches per stage token side (1 at stage 1, 2 at stage 2, ...).
        roll_first: the block rolls its grid before padding it (timm) rather than after (torchvision, HF).

    Example::

        >>> WindowGrid((3, 3), (2, 2), (0, 0)).tokens().tolist()  # padded to 4x4: -1 marks padding
        [[0, 1, 3, 4], [2, -1, 5, -1], [6, 7, -1, -1], [8, -1, -1, -1]]
    """

    grid: tuple[int, int]
    window: tuple[int, int]
    shift: tuple[int, int] = (0, 0)
    stride: int = 1
    roll_first: bool = False

    @property
    def padded(self) -> tuple[int, int]:
        """The grid padded to whole windows."""
        (h, w), (wh, ww) = self.grid, self.window
        return math.ceil(h / wh) * wh, math.ceil(w / ww) * ww

    def tokens(self, device: torch.device | str = "cpu") -> Tensor:
        """(windows, wh * ww) int64: the stage token (row-major index into ``grid``) at each position of each
        window as the attention sees them, ``-1`` for padding."""
        (h, w), (hp, wp), (wh, ww), (sh, sw) = self.grid, self.padded, self.window, self.shift
        r = torch.arange(hp, device=device)[:, None]
        c = torch.arange(wp, device=device)[None, :]
        if self.roll_first:  # torch.roll(x, -s)[i] = x[(i + s) % n] over the unpadded grid; padding after it
            real = (r < h) & (c < w)
            src_r, src_c = (r + sh) % h, (c + sw) % w
        else:
            src_r, src_c = (r + sh) % hp, (c + sw) % wp
            real = (src_r < h) & (src_c < w)
        index = torch.where(real, src_r * w + src_c, torch.full_like(src_r * src_c, -1))
        return index.reshape(hp // wh, wh, wp // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)

    @property
    def num_windows(self) -> int:
        (hp, wp), (wh, ww) = self.padded, self.window
        return (hp // wh) * (wp // ww)


@dataclass(frozen=True)
class TokenLayout:
    """Where the patches are in the token sequence of one input size.

    Attributes:
        num_prefix_tokens: tokens before the patches (class, distillation, registers).
        grid_size: (gh, gw) patch grid of the actual input.
        query: ``"cls"`` (row 0, the class token), ``"cls_dist"`` (mean of rows 0 and 1: class and distillation
            tokens) or ``"mean"`` (mean over patch-token rows).
        patch_size: (ph, pw) pixels per patch, when known (needed for distances in pixels).
        num_registers: register tokens, the last of the prefix tokens.
        windows: for a windowed, hierarchical model (Swin), each attention layer's :class:`WindowGrid`, in forward
            order; ``grid_size`` is then the finest (stage-1) patch grid every map lies on, and there are no prefix
            tokens. None for a ViT (one token sequence through every layer).
    """

    num_prefix_tokens: int
    grid_size: tuple[int, int]
    query: str
    patch_size: tuple[int, int] | None = None
    num_registers: int = 0
    windows: tuple[WindowGrid, ...] | None = field(default=None, repr=False)  # a long tuple: not in the repr

    def __post_init__(self) -> None:
        if self.query not in QUERIES[1:]:
            raise ValueError(f"`query` must be one of {QUERIES[1:]}, got {self.query!r}")
        needed = {"cls": 1, "cls_dist": 2}.get(self.query, 0)
        if self.num_prefix_tokens < needed:
            raise ValueError(
                f"`query={self.query!r}` reads {needed} prefix token(s) but the layout has {self.num_prefix_tokens}"
            )
        if not 0 <= self.num_registers <= self.num_prefix_tokens:
            raise ValueError(
                f"`num_registers` must be in [0, num_prefix_tokens={self.num_prefix_tokens}], got {self.num_registers}"
            )

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches

    @property
    def register_slice(self) -> slice | None:
        """Positions of the register tokens in the sequence, or None without registers."""
        if not self.num_registers:
            return None
        return slice(self.num_prefix_tokens - self.num_registers, self.num_prefix_tokens)


def query_vector(matrix: Tensor, layout: TokenLayout) -> Tensor:
    """The query row of a (..., N, N) token matrix over all N tokens: (..., N).

    ``"cls"`` takes row 0, ``"cls_dist"`` the mean of rows 0 and 1, ``"mean"`` the mean of the patch-token rows.
    """
    p = layout.num_prefix_tokens
    if layout.query == "cls":
        return matrix[..., 0, :]
    if layout.query == "cls_dist":
        return matrix[..., :2, :].mean(dim=-2)
    return matrix[..., p:, :].mean(dim=-2)


def query_row(matrix: Tensor, layout: TokenLayout) -> Tensor:
    """The query row of a (..., N, N) token matrix restricted to patch columns: (..., num_patches).

    Returns new memory: a view would keep the whole (B, N, N) matrix alive for as long as the row is kept.

    Example::

        >>> import torch
        >>> m = torch.arange(9.0).reshape(1, 3, 3)
        >>> query_row(m, TokenLayout(1, (1, 2), "cls")).tolist(), query_row(m, TokenLayout(1, (1, 2), "mean")).tolist()
        ([[1.0, 2.0]], [[5.5, 6.5]])
    """
    return query_vector(matrix, layout)[..., layout.num_prefix_tokens :].clone()
