"""Token layout of a ViT: how many prefix tokens come first, the patch grid of an input, and which query to read.

timm puts ``num_prefix_tokens`` tokens (class, distillation, registers) first, then the patches row-major over
the grid. Which token "speaks for the image" depends on the head: the class token when the head reads it
(``global_pool == "token"``), otherwise (average pooling, as in eva02, beit and ``*_gap_*`` models, or no class
token at all) every patch does, so the query row is the mean over patch-token rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

__all__ = ["QUERIES", "TokenLayout", "query_row", "token_layout"]

QUERIES = ("auto", "cls", "mean")


@dataclass(frozen=True)
class TokenLayout:
    """Where the patches are in the token sequence of one input size.

    Attributes:
        num_prefix_tokens: tokens before the patches (class, distillation, registers).
        grid_size: (gh, gw) patch grid of the actual input.
        query: ``"cls"`` (row 0, the class token) or ``"mean"`` (mean over patch-token rows).
        patch_size: (ph, pw) pixels per patch, when known (needed for distances in pixels).
    """

    num_prefix_tokens: int
    grid_size: tuple[int, int]
    query: str
    patch_size: tuple[int, int] | None = None

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches


def _pair(value: object) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    a, b = value  # type: ignore[misc]
    return int(a), int(b)


def _patch_size(model: nn.Module) -> tuple[int, int]:
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "patch_size", None)
    if size is None:
        raise ValueError(
            f"cannot tell the patch size of {type(model).__name__}: it has no `patch_embed.patch_size`. "
            "Pass `layout=TokenLayout(num_prefix_tokens=..., grid_size=(gh, gw), query=...)`."
        )
    return _pair(size)


def token_layout(model: nn.Module, image_size: tuple[int, int], query: str = "auto") -> TokenLayout:
    """Read the token layout of a timm ViT for inputs of ``image_size`` (H, W).

    The grid comes from the actual input (H // patch, W // patch), not from the size the model was built for,
    so non-square and dynamic image sizes work.

    Args:
        model: a timm ViT (``VisionTransformer``, ``Eva``, ``Beit``...).
        image_size: (H, W) of the input.
        query: ``"auto"`` (class token when the head reads it, else the patch mean), ``"cls"`` or ``"mean"``.

    Example::

        >>> import timm
        >>> vit = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=(64, 96))
        >>> token_layout(vit, (64, 96))
        TokenLayout(num_prefix_tokens=2, grid_size=(4, 6), query='cls', patch_size=(16, 16))
    """
    if query not in QUERIES:
        raise ValueError(f"`query` must be one of {QUERIES}, got {query!r}")
    ph, pw = _patch_size(model)
    h, w = image_size
    num_prefix = int(getattr(model, "num_prefix_tokens", 1 if getattr(model, "cls_token", None) is not None else 0))
    has_cls = getattr(model, "cls_token", None) is not None and num_prefix > 0
    if query == "auto":
        query = "cls" if has_cls and getattr(model, "global_pool", "token") == "token" else "mean"
    elif query == "cls" and not has_cls:
        raise ValueError(f"`query='cls'` but {type(model).__name__} has no class token; use query='mean'")
    return TokenLayout(num_prefix_tokens=num_prefix, grid_size=(h // ph, w // pw), query=query, patch_size=(ph, pw))


def query_row(matrix: Tensor, layout: TokenLayout) -> Tensor:
    """The query row of a (B, N, N) token matrix restricted to patch columns: (B, num_patches).

    ``layout.query == "cls"`` takes row 0; ``"mean"`` averages the patch-token rows. Returns new memory.
    """
    p = layout.num_prefix_tokens
    if layout.query == "cls":
        row = matrix[:, 0, :]
    else:
        row = matrix[:, p:, :].mean(dim=1)
    # a copy, not a view: a view would keep the whole (B, N, N) matrix alive for as long as the row is kept
    return row[:, p:].clone()
