"""Token layout of a ViT: how many prefix tokens come first, the patch grid of an input, and which query to read.

Every supported family puts its prefix tokens (class, distillation, registers, in that order) first, then the
patches row-major over the grid. Which token "speaks for the image" depends on the head: the class token when
the head reads it (``"cls"``), the class and distillation tokens when a distilled DeiT averages both heads
(``"cls_dist"``), otherwise (average pooling, attention pooling, no class token) every patch does, so the query
row is the mean over patch-token rows (``"mean"``). Reading a model's layout is its backend's job
(:func:`lightning_attn.token_layout`); this module only describes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .names import QUERIES

__all__ = ["QUERIES", "TokenLayout", "query_row", "query_vector"]


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
    """

    num_prefix_tokens: int
    grid_size: tuple[int, int]
    query: str
    patch_size: tuple[int, int] | None = None
    num_registers: int = 0

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
