"""Image utilities that turn attention tensors into one labelled grid image: colour, overlay, assemble.

Everything takes tensors, never models, and stays on the input's device; :func:`make_grid` makes the only
device -> host copy, one per grid. matplotlib is used only to read a colormap's table, once per name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache, lru_cache

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .names import DEFAULT_COLOUR_RANGE, SCALES

__all__ = [
    "COLOUR_BAR_HEIGHT",
    "DEFAULT_COLOUR_RANGE",
    "LABEL_SIZE",
    "SCALES",
    "check_cmap",
    "check_colour_scale",
    "colorize",
    "colormap_lut",
    "colour_bar",
    "colour_values",
    "filmstrip",
    "grid_shape",
    "layer_step_image",
    "make_grid",
    "matrix_tiles",
    "normalize_per_map",
    "overlay",
    "peak_notes",
    "peak_ratio",
    "relative_scale",
    "tile_images",
    "tile_shape",
    "to_display",
    "with_colour_bar",
]

LABEL_SIZE = 24
"""Thickness in pixels of the label strips :func:`make_grid` adds: the header's height, the row strip's width."""

# SCALES and DEFAULT_COLOUR_RANGE live in the torch-free names.py (the command line's --help reads them)

_FONT_SIZE = 14
_NOTE_WIDTH, _NOTE_HEIGHT = 40, 14  # the box of a tile's note
_BACKGROUND = 1.0  # white padding and label strips, black text
_TEXT = (0, 0, 0)


def check_cmap(name: str) -> None:
    """Raise a ValueError unless ``name`` is a matplotlib colormap name."""
    if not isinstance(name, str) or name not in matplotlib.colormaps:
        raise ValueError(
            f"`cmap` must be a matplotlib colormap name such as 'jet', 'viridis', 'inferno', 'magma' or 'turbo' "
            f"(any name in matplotlib.colormaps works, '_r' reverses), got {name!r}"
        )


@cache
def _lut(name: str) -> np.ndarray:
    check_cmap(name)
    table = matplotlib.colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3].astype(np.float32)
    table.flags.writeable = False
    return table


def colormap_lut(name: str, device: torch.device | str | None = None) -> Tensor:
    """The 256 colours of matplotlib colormap ``name`` as a (256, 3) float32 table in [0, 1] on ``device``.

    The table is read from matplotlib once per name and cached; each call returns a fresh tensor.

    Raises:
        ValueError: ``name`` is not a matplotlib colormap.

    Example::

        >>> lut = colormap_lut("gray")
        >>> tuple(lut.shape), lut[0].tolist(), lut[-1].tolist()
        ((256, 3), [0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
    """
    return torch.tensor(_lut(name), device=device)


def normalize_per_map(maps: Tensor) -> Tensor:
    """Min-max normalise each map over its last two dims to [0, 1] in float32; a constant map becomes all zeros.

    Raises:
        ValueError: ``maps`` has fewer than 2 dims or holds NaN or inf (checking reads one bool on the host).

    Example::

        >>> normalize_per_map(torch.tensor([[[1.0, 3.0], [2.0, 5.0]], [[7.0, 7.0], [7.0, 7.0]]])).tolist()
        [[[0.0, 0.5], [0.25, 1.0]], [[0.0, 0.0], [0.0, 0.0]]]
    """
    if maps.dim() < 2:
        raise ValueError(f"`maps` must have shape (..., h, w), got {tuple(maps.shape)}")
    maps = maps.float()
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    hi = maps.amax(dim=(-2, -1), keepdim=True)
    # amin/amax propagate NaN and inf, so checking the extremes checks every entry at a fraction of the cost.
    if not bool(torch.isfinite(lo).all() & torch.isfinite(hi).all()):
        raise ValueError("maps contain NaN or inf: check the model's outputs (e.g. overflow under fp16)")
    span = hi - lo
    return (maps - lo) / torch.where(span > 0, span, torch.ones_like(span))


def check_colour_scale(scale: str, colour_range: float) -> None:
    """Raise a ValueError unless ``scale`` is one of :data:`SCALES` and ``colour_range`` a finite number > 1."""
    if scale not in SCALES:
        raise ValueError(
            f"`scale` must be one of {SCALES} ('relative': one colour scale centred on uniform attention for every "
            f"tile; 'per_map': each tile stretched to its own min..max), got {scale!r}"
        )
    if (
        isinstance(colour_range, bool)
        or not isinstance(colour_range, (int, float))
        or not 1.0 < colour_range < math.inf
    ):
        raise ValueError(
            f"`colour_range` must be a finite number > 1 (colours run from 1/colour_range to colour_range times "
            f"uniform attention), got {colour_range!r}"
        )


def _check_finite(maps: Tensor) -> None:
    # sums propagate NaN and inf, so one reduction checks every entry; one bool read on the host
    if not bool(torch.isfinite(maps.sum()).item()):
        raise ValueError("maps contain NaN or inf: check the model's outputs (e.g. overflow under fp16)")


def uniform_ratio(maps: Tensor, dims: int = 2) -> Tensor:
    """Each entry's share of its map divided by the uniform share: ``m / sum(m) * n`` over the last ``dims`` dims
    (``n`` entries), float32; 1 everywhere on uniform attention. Negative entries count as 0; an all-zero map
    stays all zeros. Maps are renormalised over what they hold (the patches), as the entropy curves are.

    Example::

        >>> uniform_ratio(torch.tensor([[1.0, 1.0], [2.0, 4.0]])).tolist()
        [[0.5, 0.5], [1.0, 2.0]]
    """
    maps = maps.float().clamp_min(0.0)
    axes = tuple(range(-dims, 0))
    total = maps.sum(dim=axes, keepdim=True)
    count = math.prod(maps.shape[-dims:])
    return maps * (count / torch.where(total > 0, total, torch.ones_like(total)))


def _ratio_to_unit(ratio: Tensor, colour_range: float) -> Tensor:
    # log2(ratio) / log2(R) in [-1, 1] -> [0, 1]; a zero share is below any range: the bottom colour
    position = 0.5 + 0.5 * torch.log(ratio.clamp_min(1e-30)) / math.log(colour_range)
    return position.clamp(0.0, 1.0)


def relative_scale(maps: Tensor, colour_range: float = DEFAULT_COLOUR_RANGE) -> Tensor:
    r"""Colour positions in [0, 1] that mean the same in every map: each patch's share relative to uniform, on a
    logarithmic scale centred on uniform attention.

    .. math::

        t = \operatorname{clip}\left(\tfrac12 + \tfrac12 \frac{\log (p_i\, n)}{\log R}, 0, 1\right),
        \qquad p = m / \textstyle\sum_i m_i

    over the ``n`` entries of each map (the last two dims), with ``R = colour_range``: a patch at the uniform share
    sits mid-scale, one with R times (or more) at the top, 1/R times (or less) at the bottom. Uniform attention is
    one flat colour however it is reached, and near-uniform attention (normalised entropy 0.9999) is nearly flat.

    Raises:
        ValueError: bad ``colour_range``, fewer than 2 dims, or NaN or inf in ``maps``.

    Example::

        >>> relative_scale(torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[1.0, 0.0], [0.0, 0.0]]])).tolist()
        [[[0.5, 0.5], [0.5, 0.5]], [[0.75, 0.0], [0.0, 0.0]]]
    """
    check_colour_scale("relative", colour_range)
    if maps.dim() < 2:
        raise ValueError(f"`maps` must have shape (..., h, w), got {tuple(maps.shape)}")
    _check_finite(maps)
    return _ratio_to_unit(uniform_ratio(maps), colour_range)


def peak_ratio(maps: Tensor) -> Tensor:
    """The largest share of each map (last two dims) divided by the uniform share: 1 for uniform attention, n
    when everything is on one of n patches. (...,) float32.

    Example::

        >>> peak_ratio(torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[5.0, 1.0], [1.0, 1.0]]])).tolist()
        [1.0, 2.5]
    """
    return uniform_ratio(maps).amax(dim=(-2, -1))


def peak_notes(maps: Tensor) -> list[list[str]]:
    """The notes of :func:`make_grid` for (B, K, h, w) ``maps`` drawn after an image column: each map's
    :func:`peak_ratio` (``"3.2x"``), the image column blank. One small device -> host copy.

    Example::

        >>> peak_notes(torch.tensor([[[[1.0, 1.0], [1.0, 1.0]], [[3.0, 1.0], [0.0, 0.0]]]]))
        [['', '1x', '3x']]
    """
    return [[""] + [f"{v:.3g}x" for v in row] for row in peak_ratio(maps).tolist()]


def colour_values(maps: Tensor, scale: str = "relative", colour_range: float = DEFAULT_COLOUR_RANGE) -> Tensor:
    """Colour positions in [0, 1] of (..., h, w) ``maps`` under ``scale``: :func:`relative_scale` or
    :func:`normalize_per_map`.

    Example::

        >>> m = torch.tensor([[1.0, 1.1], [1.0, 1.0]])
        >>> colour_values(m).max().item() < 0.52, colour_values(m, "per_map").max().item()
        (True, 1.0)
    """
    check_colour_scale(scale, colour_range)
    return relative_scale(maps, colour_range) if scale == "relative" else normalize_per_map(maps)


def colorize(maps01: Tensor, lut: Tensor) -> Tensor:
    """Colour (..., h, w) values in [0, 1] with a (256, 3) table: (..., 3, h, w) on the table's device.

    Binning follows matplotlib: value v takes colour ``min(floor(v * 256), 255)``, so the result equals
    ``matplotlib.colormaps[name](v)[..., :3]`` for a 256-colour map. Values outside [0, 1] are clamped.

    Example::

        >>> colorize(torch.tensor([[0.0, 1.0]]), colormap_lut("gray")).squeeze(-2).tolist()
        [[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]
    """
    index = (maps01.clamp(0.0, 1.0) * 256).long().clamp_(0, 255)  # also keeps a stray NaN in range
    return F.embedding(index.to(lut.device), lut).movedim(-1, -3)  # a row gather, faster than lut[index]


def _check_tile_size(tile_size: int) -> None:
    if not isinstance(tile_size, int) or tile_size < 1:
        raise ValueError(f"`tile_size` must be a positive int (pixels), got {tile_size!r}")


def tile_shape(height: int, width: int, tile_size: int) -> tuple[int, int]:
    """(tile_h, tile_w) of an image of ``height`` x ``width`` shown with ``tile_size`` pixels on its long side.

    Example::

        >>> tile_shape(224, 224, 96), tile_shape(64, 96, 96), tile_shape(96, 64, 96)
        ((96, 96), (64, 96), (96, 64))
    """
    _check_tile_size(tile_size)
    if height >= width:
        return tile_size, max(1, round(tile_size * width / height))
    return max(1, round(tile_size * height / width)), tile_size


def tile_images(images: Tensor, tile_size: int) -> Tensor:
    """(B, 3, H, W) images in [0, 1] resized to their tile (:func:`tile_shape`; bilinear, antialiased), float32.
    Images already at their tile's size are returned as they are, so a caller drawing many grids of the same
    images resizes them once and hands the result to :func:`overlay`.

    Example::

        >>> tiled = tile_images(torch.rand(2, 3, 64, 96), 48)
        >>> tuple(tiled.shape), tile_images(tiled, 48) is tiled
        ((2, 3, 32, 48), True)
    """
    size = tile_shape(images.shape[-2], images.shape[-1], tile_size)
    if tuple(images.shape[-2:]) == size and images.dtype == torch.float32:
        return images
    shown = F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    return shown.clamp(0.0, 1.0)


def _check_alpha(alpha: float) -> None:
    if not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be a number in [0, 1] (weight of the heatmap), got {alpha!r}")


def overlay(
    images: Tensor,
    maps: Tensor,
    tile_size: int,
    cmap: str = "jet",
    alpha: float = 0.5,
    scale: str = "relative",
    colour_range: float = DEFAULT_COLOUR_RANGE,
) -> Tensor:
    """Each image followed by each of its maps as a heatmap blended over it: (B, K + 1, 3, tile_h, tile_w).

    Tiles keep the image's aspect ratio with ``tile_size`` pixels on the long side (see :func:`tile_shape`).
    Column 0 is the image resized to the tile (bilinear, antialiased); column k + 1 is map k upsampled to the
    tile (bilinear, ``align_corners=False``), coloured with ``cmap`` and blended as
    ``alpha * heat + (1 - alpha) * image``. A map is stretched to the whole image whatever its grid.

    With ``scale="relative"`` (the default) the colour of a patch is its share of the map relative to uniform
    (:func:`relative_scale`: the ratio is taken on the patch grid, then upsampled), one scale for every tile: a
    uniform map is one flat colour and the same colour means the same share in every tile, probe, layer and step.
    ``scale="per_map"`` stretches each tile to its own min..max (:func:`normalize_per_map`), which shows the
    shape of a weak map but not its strength: pair it with :func:`peak_ratio`.

    Args:
        images: (B, 3, H, W) display-ready images in [0, 1] (see :func:`to_display`).
        maps: (B, K, gh, gw) maps of any scale, e.g. per-layer attention on the patch grid.
        tile_size: pixels on the long side of each tile.
        cmap: matplotlib colormap name.
        alpha: weight of the heatmap in [0, 1].
        scale: one of :data:`SCALES`.
        colour_range: ``R`` of the relative scale: colours span 1/R to R times uniform.

    Returns:
        (B, K + 1, 3, tile_h, tile_w) float32 in [0, 1] on the images' device.

    Raises:
        ValueError: bad shapes or arguments, or maps with NaN or inf.

    Example::

        >>> tiles = overlay(torch.rand(2, 3, 64, 96), torch.rand(2, 4, 4, 6), tile_size=48)
        >>> tuple(tiles.shape)
        (2, 5, 3, 32, 48)
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"`images` must be (B, 3, H, W) in [0, 1] (see to_display), got {tuple(images.shape)}")
    if maps.dim() != 4 or maps.shape[0] != images.shape[0]:
        raise ValueError(
            f"`maps` must be (B, K, gh, gw) with the images' batch size: images {tuple(images.shape)}, "
            f"maps {tuple(maps.shape)}"
        )
    _check_alpha(alpha)
    check_cmap(cmap)
    check_colour_scale(scale, colour_range)
    size = tile_shape(images.shape[-2], images.shape[-1], tile_size)
    shown = tile_images(images, tile_size).unsqueeze(1)
    maps = maps.float().to(images.device)
    if scale == "relative":
        _check_finite(maps)
        # the share relative to uniform is a property of the patch grid: take it there, then smooth it
        up = F.interpolate(uniform_ratio(maps), size=size, mode="bilinear", align_corners=False)
        values = _ratio_to_unit(up, colour_range)
    else:
        values = normalize_per_map(F.interpolate(maps, size=size, mode="bilinear", align_corners=False))
    heat = colorize(values, colormap_lut(cmap, images.device))
    # blended straight into the output, after the image column: one pass over the pixels, no concatenation
    out = torch.empty((heat.shape[0], heat.shape[1] + 1, *heat.shape[2:]), dtype=heat.dtype, device=heat.device)
    out[:, :1] = shown
    torch.lerp(shown.expand_as(heat), heat, alpha, out=out[:, 1:])
    return out


def matrix_tiles(
    matrices: Tensor,
    tile_size: int,
    cmap: str = "jet",
    scale: str = "relative",
    colour_range: float = DEFAULT_COLOUR_RANGE,
) -> Tensor:
    """Token x token attention matrices as square colour heatmaps: (B, K, 3, tile_size, tile_size).

    Each entry is coloured and upsampled nearest-neighbour, so every entry is a crisp block (blocks differ by a
    pixel when ``tile_size`` is not a multiple of N). Nothing is drawn underneath. With ``scale="relative"`` each
    row (a query's attention over the N tokens) is on the relative scale of :func:`relative_scale`: entry share
    times N, 1 = uniform; ``"per_map"`` min-max normalises each matrix on its own.

    Args:
        matrices: (B, K, N, N), e.g. K layers' head-fused attention.
        tile_size: side of each square tile in pixels.
        cmap: matplotlib colormap name.
        scale: one of :data:`SCALES`.
        colour_range: ``R`` of the relative scale.

    Raises:
        ValueError: bad shapes or arguments, or matrices with NaN or inf.

    Example::

        >>> tuple(matrix_tiles(torch.rand(2, 3, 17, 17), tile_size=34).shape)
        (2, 3, 3, 34, 34)
    """
    if matrices.dim() != 4:
        raise ValueError(f"`matrices` must be (B, K, N, N), got {tuple(matrices.shape)}")
    _check_tile_size(tile_size)
    check_cmap(cmap)
    check_colour_scale(scale, colour_range)
    if scale == "relative":
        _check_finite(matrices)
        values = _ratio_to_unit(uniform_ratio(matrices, dims=1), colour_range)
    else:
        values = normalize_per_map(matrices)
    # Nearest upsampling commutes with per-entry colouring: colour the N x N matrix, then enlarge.
    colour = colorize(values, colormap_lut(cmap, matrices.device))
    b, k = matrices.shape[:2]
    up = F.interpolate(colour.flatten(0, 1), size=(tile_size, tile_size), mode="nearest")
    return up.view(b, k, 3, tile_size, tile_size)


def grid_shape(
    rows: int,
    cols: int,
    tile_h: int,
    tile_w: int,
    has_col_labels: bool = False,
    has_row_labels: bool = False,
    padding: int = 2,
) -> tuple[int, int]:
    r"""(height, width) of the image :func:`make_grid` returns.

    .. math::

        H = [\text{col labels}] \cdot L + R \cdot t_h + (R + 1) \cdot p \qquad
        W = [\text{row labels}] \cdot L + C \cdot t_w + (C + 1) \cdot p

    with :data:`LABEL_SIZE` :math:`L` and ``padding`` :math:`p`.

    Example::

        >>> grid_shape(2, 3, 32, 32, has_col_labels=True, padding=2)
        (94, 104)
    """
    height = LABEL_SIZE * bool(has_col_labels) + rows * tile_h + (rows + 1) * padding
    width = LABEL_SIZE * bool(has_row_labels) + cols * tile_w + (cols + 1) * padding
    return height, width


@cache
def _font(size: int = _FONT_SIZE) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap font and no size
        return ImageFont.load_default()


#: The smallest text drawn: below it a label is shortened by whole words instead.
_MIN_FONT_SIZE = 7


def fit_label(
    draw: ImageDraw.ImageDraw, text: str, width: int
) -> tuple[str, ImageFont.FreeTypeFont | ImageFont.ImageFont]:
    """``text`` and a font that fit in ``width`` pixels: a smaller font first, then whole trailing words dropped
    for an ellipsis. A label is never cut inside a word, so ``p571`` never reads ``p5``."""
    for size in range(_FONT_SIZE, _MIN_FONT_SIZE - 1, -1):
        font = _font(size)
        if draw.textlength(text, font=font) <= width:
            return text, font
    words = text.split(" ")
    while words:
        words.pop()
        shorter = " ".join(words) + " …" if words else "…"
        if draw.textlength(shorter, font=font) <= width:
            return shorter, font
    return "", font


def _draw_centred(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], text: str) -> None:
    """Draw ``text`` centred in ``box`` (x0, y0, x1, y1), shrunk or shortened by whole words to fit."""
    x0, y0, x1, y1 = box
    text, font = fit_label(draw, text, x1 - x0)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = x0 + (x1 - x0 - (right - left)) // 2 - left
    y = y0 + (y1 - y0 - (bottom - top)) // 2 - top
    draw.text((x, y), text, fill=_TEXT, font=font)


def make_grid(
    tiles: Tensor,
    col_labels: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    padding: int = 2,
    notes: Sequence[Sequence[str]] | None = None,
) -> np.ndarray:
    """Assemble (R, C, 3, tile_h, tile_w) tiles in [0, 1] into one labelled HWC uint8 image.

    Tiles are separated by ``padding`` white pixels (also around the border). Column labels go in a white
    header strip of :data:`LABEL_SIZE` pixels, centred over each column; row labels in a strip of the same width
    on the left, rotated to read bottom to top. Labels too long for their tile get a smaller font, then lose
    whole trailing words (never part of a number). ``notes`` (R rows of C strings, ``""`` for none) are written
    in a small white box in the top-left corner of their tile, e.g. a stretched tile's peak-to-uniform ratio.
    The grid is built and converted to uint8 on the tiles' device and copied to the host once; text is then drawn
    with PIL. The shape is :func:`grid_shape`.

    Raises:
        ValueError: ``tiles`` is not 5-D with 3 channels, a label or note count differs from the grid's, or
            ``padding`` is negative.

    Example::

        >>> grid = make_grid(torch.rand(2, 3, 3, 32, 32), col_labels=["image", "L0", "L1"])
        >>> grid.shape, grid.dtype, grid.shape[:2] == grid_shape(2, 3, 32, 32, has_col_labels=True)
        ((94, 104, 3), dtype('uint8'), True)
    """
    if tiles.dim() != 5 or tiles.shape[2] != 3:
        raise ValueError(f"`tiles` must be (rows, cols, 3, tile_h, tile_w), got {tuple(tiles.shape)}")
    rows, cols, _, th, tw = tiles.shape
    for name, labels, count in (("col_labels", col_labels, cols), ("row_labels", row_labels, rows)):
        if labels is not None and len(labels) != count:
            raise ValueError(f"`{name}` has {len(labels)} labels but the grid has {count}: pass one per {name[:3]}")
    if not isinstance(padding, int) or padding < 0:
        raise ValueError(f"`padding` must be a non-negative int, got {padding!r}")
    if notes is not None and (len(notes) != rows or any(len(line) != cols for line in notes)):
        raise ValueError(f"`notes` must hold {rows} rows of {cols} strings, one per tile ('' for none)")
    top = LABEL_SIZE if col_labels is not None else 0
    left = LABEL_SIZE if row_labels is not None else 0

    # The tiles become uint8 on their device, put in the canvas's (row, y, col, x, channel) order by the conversion's
    # copy, and are copied to the host once; the white canvas with its strips is laid out in numpy, and the tiles go
    # into a strided view of it as one block copy.
    scaled = tiles.float().mul(255).round_().clamp_(0, 255)
    pixels8 = torch.empty((rows, th, cols, tw, 3), dtype=torch.uint8, device=tiles.device)
    pixels8.copy_(scaled.permute(0, 3, 1, 4, 2))
    step_x, step_y = tw + padding, th + padding
    height, width = grid_shape(rows, cols, th, tw, col_labels is not None, row_labels is not None, padding)
    pixels = np.full((height, width, 3), round(_BACKGROUND * 255), np.uint8)
    body = pixels[top + padding :, left + padding :][: rows * step_y, : cols * step_x]
    body.reshape(rows, step_y, cols, step_x, 3)[:, :th, :, :tw] = pixels8.cpu().numpy()
    for r, line in enumerate(notes or ()):
        for c, note in enumerate(line):
            if note:
                x0, y0 = left + padding + c * step_x, top + padding + r * step_y
                box = _label(str(note), min(tw, _NOTE_WIDTH), min(th, _NOTE_HEIGHT), False)
                pixels[y0 : y0 + box.shape[0], x0 : x0 + box.shape[1]] = box  # pasted: readable on any colour
    if col_labels is None and row_labels is None:
        return pixels

    for c, label in enumerate(col_labels or ()):
        x0 = left + padding + c * step_x
        _stamp(pixels, (x0, 0, x0 + tw, top), str(label))
    for r, label in enumerate(row_labels or ()):
        y0 = top + padding + r * step_y
        _stamp(pixels, (0, y0, left, y0 + th), str(label), vertical=True)
    return pixels


def _stamp(canvas: np.ndarray, box: tuple[int, int, int, int], text: str, vertical: bool = False) -> None:
    """Darken ``canvas`` (H, W, 3 uint8, white where text goes) with ``text`` centred in ``box`` (x0, y0, x1, y1);
    ``vertical``: reading bottom to top. The part of the box outside the canvas is dropped."""
    x0, y0, x1, y1 = box
    strip = _label(text, y1 - y0, x1 - x0, True) if vertical else _label(text, x1 - x0, y1 - y0, False)
    h, w = canvas.shape[:2]
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if cx0 >= cx1 or cy0 >= cy1:
        return
    region = canvas[cy0:cy1, cx0:cx1]
    np.minimum(region, strip[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0], out=region)


@lru_cache(maxsize=4096)
def _label(text: str, width: int, height: int, vertical: bool) -> np.ndarray:
    """``text`` centred on a white (height, width) strip, as uint8 pixels; ``vertical``: turned a quarter
    counter-clockwise, (width, height), to read bottom to top. Cached: the same labels come back every pass."""
    strip = Image.new("RGB", (width, height), (255, 255, 255))
    _draw_centred(ImageDraw.Draw(strip), (0, 0, width, height), text)
    if vertical:
        strip = strip.rotate(90, expand=True)
    out = np.asarray(strip).copy()
    out.setflags(write=False)  # shared by every grid that shows it
    return out


_BAR_HEIGHT = 10
#: Height in pixels of :func:`colour_bar`, the key under every grid: caption, bar, tick labels.
COLOUR_BAR_HEIGHT = 2 * LABEL_SIZE + _BAR_HEIGHT - 4


def _ratio_text(ratio: float) -> str:
    if ratio >= 1:
        return f"{ratio:.3g}x"
    return f"1/{1 / ratio:.3g}x"


@lru_cache(maxsize=64)
def colour_bar(
    width: int, cmap: str = "jet", scale: str = "relative", colour_range: float = DEFAULT_COLOUR_RANGE
) -> np.ndarray:
    """The key to a grid's colours, ``width`` pixels wide: a caption, the colormap as a bar, tick labels under it.
    (H, W, 3) uint8, read-only (cached: the same bar comes back every pass).

    On the relative scale the ticks read multiples of the uniform share (``1/16x ... 1x ... 16x``, log-spaced);
    on the per-map scale the bar reads each tile's own min to max, and the caption says so.

    Example::

        >>> bar = colour_bar(300)
        >>> bar.shape[1], bar.dtype, bar.flags.writeable
        (300, dtype('uint8'), False)
    """
    check_cmap(cmap)
    check_colour_scale(scale, colour_range)
    if not isinstance(width, int) or width < 16:
        raise ValueError(f"`width` must be an int >= 16 (pixels), got {width!r}")
    margin = 6
    bar_w = width - 2 * margin
    height = COLOUR_BAR_HEIGHT
    canvas = np.full((height, width, 3), 255, np.uint8)
    lut = _lut(cmap)
    bar = lut[np.linspace(0, 255, bar_w).round().astype(np.int64)]
    canvas[LABEL_SIZE : LABEL_SIZE + _BAR_HEIGHT, margin : margin + bar_w] = (bar[None] * 255).round()
    if scale == "relative":
        caption = "attention share vs uniform (log scale)"
        # five ticks when there is room for them, else the two ends and uniform
        fractions = (0.0, 0.25, 0.5, 0.75, 1.0) if bar_w >= 220 else (0.0, 0.5, 1.0)
        ticks = [(f, _ratio_text(colour_range ** (2 * f - 1))) for f in fractions]
    else:
        caption = "each tile stretched: its min to max"
        ticks = [(0.0, "min"), (1.0, "max")]
    _stamp(canvas, (0, 0, width, LABEL_SIZE), caption)
    y = LABEL_SIZE + _BAR_HEIGHT
    for fraction, text in ticks:
        x = margin + round(fraction * (bar_w - 1))
        canvas[y : y + 3, x] = 0  # the tick
        half = 24
        x0 = min(max(x - half, 0), width - 2 * half)
        _stamp(canvas, (x0, y + 3, x0 + 2 * half, height), text)
    canvas.setflags(write=False)
    return canvas


def with_colour_bar(
    grid: np.ndarray, cmap: str = "jet", scale: str = "relative", colour_range: float = DEFAULT_COLOUR_RANGE
) -> np.ndarray:
    """``grid`` (H, W, 3 uint8) with its :func:`colour_bar` underneath, as wide as the grid.

    Example::

        >>> grid = make_grid(torch.rand(1, 2, 3, 32, 32))
        >>> with_colour_bar(grid).shape[0] == grid.shape[0] + colour_bar(grid.shape[1]).shape[0]
        True
    """
    return np.concatenate([grid, colour_bar(max(grid.shape[1], 16), cmap, scale, colour_range)[:, : grid.shape[1]]])


def to_display(images: Tensor, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> Tensor:
    """Undo the model's input normalisation, ``x * std + mean``, and clamp to [0, 1]: (B, 3, H, W) float32.

    A missing ``mean`` counts as 0 and a missing ``std`` as 1; each may hold one value or one per channel.
    Grey (1-channel) images are repeated to 3 channels. Runs on the images' device.

    Raises:
        ValueError: ``images`` is not (B, 1 or 3, H, W), or ``mean``/``std`` length matches neither 1 nor C.

    Example::

        >>> x = (torch.full((1, 3, 2, 2), 0.5) - 0.5) / 0.25
        >>> to_display(x, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)).unique().tolist()
        [0.5]
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"`images` must be (B, 1 or 3, H, W), got {tuple(images.shape)}")
    channels = images.shape[1]
    images = images.float()
    for name, values in (("std", std), ("mean", mean)):
        if values is not None and len(values) not in (1, channels):
            raise ValueError(
                f"`{name}` has {len(values)} values but the images have {channels} channels: pass 1 or {channels} "
                f"(e.g. timm's `model.pretrained_cfg['{name}']`)"
            )
    if std is not None:
        images = images * torch.tensor(std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    if mean is not None:
        images = images + torch.tensor(mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    return images.clamp(0.0, 1.0).expand(-1, 3, -1, -1)


def filmstrip(
    image: Tensor,
    maps: Tensor,
    labels: Sequence[str],
    tile_size: int,
    cmap: str = "jet",
    alpha: float = 0.5,
    scale: str = "relative",
    colour_range: float = DEFAULT_COLOUR_RANGE,
) -> np.ndarray:
    """One image and its maps over time in one labelled row: HWC uint8, the image then one overlay per frame.

    Built from :func:`overlay` and :func:`make_grid`, whose header reads ``"image"`` then ``labels``, with the
    :func:`colour_bar` underneath. On the default relative scale every frame shares one colour scale, so the strip
    shows attention forming (a uniform start is one flat colour); ``scale="per_map"`` stretches each frame on its
    own (where attention is, not how strong) and writes its peak-to-uniform ratio on it. The shape is
    ``grid_shape(1, T + 1, tile_h, tile_w, has_col_labels=True)`` with ``(tile_h, tile_w) = tile_shape(H, W,
    tile_size)``, plus the colour bar's height.

    Args:
        image: (3, H, W) display-ready image in [0, 1] (see :func:`to_display`).
        maps: (T, gh, gw) maps of that image, e.g. one layer's map at T training steps.
        labels: T frame labels such as ``"step 0"``, ``"step 120"``.
        tile_size: pixels on the long side of each tile.
        cmap: matplotlib colormap name.
        alpha: weight of the heatmap in [0, 1].
        scale: one of :data:`SCALES`.
        colour_range: ``R`` of the relative scale.

    Raises:
        ValueError: bad shapes or arguments, or a label count other than T.

    Example::

        >>> strip = filmstrip(torch.rand(3, 64, 96), torch.rand(3, 4, 6), ["step 0", "step 50", "step 100"], 48)
        >>> strip.shape[0] == grid_shape(1, 4, 32, 48, has_col_labels=True)[0] + colour_bar(202).shape[0]
        True
    """
    if image.dim() != 3:
        raise ValueError(f"`image` must be one (3, H, W) image in [0, 1], got {tuple(image.shape)}")
    if maps.dim() != 3:
        raise ValueError(f"`maps` must be (T, gh, gw), one map per frame, got {tuple(maps.shape)}")
    if len(labels) != maps.shape[0]:
        raise ValueError(f"`labels` has {len(labels)} labels but there are {maps.shape[0]} maps: pass one per map")
    tiles = overlay(image.unsqueeze(0), maps.unsqueeze(0), tile_size, cmap, alpha, scale, colour_range)
    notes = peak_notes(maps.unsqueeze(0)) if scale == "per_map" else None
    return with_colour_bar(make_grid(tiles, col_labels=["image", *labels], notes=notes), cmap, scale, colour_range)


_NAN_GREY = np.array([0.85, 0.85, 0.85], np.float32)


def _cell(span: int, count: int, low: int, high: int) -> int:
    return int(min(high, max(low, span // max(count, 1))))


def layer_step_image(
    values: np.ndarray,
    steps: Sequence[int],
    title: str,
    cmap: str = "viridis",
    layers: Sequence[int] | None = None,
    value_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """A whole run of one per-layer metric in one picture: rows = layers (first on top), columns = logged steps,
    colour = value, with a titled header, layer and step axis labels and a colour bar giving the value range.

    Built with numpy and the colormap's lookup table (no matplotlib figure): cheap enough to redraw every pass.
    Cells are 6-24 px high and 2-32 px wide, so the picture stays a few hundred pixels wide for any run; NaN
    (a step that did not log that layer) is light grey. The colours span ``value_range`` when given (a metric's
    natural bounds, e.g. (0, 1) for normalised entropy: the same colour means the same value in every run and
    pass), else the values' min..max.

    Args:
        values: (layers, steps) values.
        steps: the step of each column.
        title: text of the header, e.g. the chart's tag.
        cmap: matplotlib colormap name.
        layers: the layer index of each row (default 0..layers-1).
        value_range: (low, high) of the colour bar, or None for the values' own min..max.

    Returns:
        (H, W, 3) uint8.

    Raises:
        ValueError: ``values`` is not 2-D, or ``steps`` / ``layers`` do not match its shape.

    Example::

        >>> picture = layer_step_image(np.array([[0.9, 0.5, 0.4], [1.0, 0.7, np.nan]]), [0, 4, 8], "entropy/raw")
        >>> picture.dtype, picture.ndim, picture.shape[2]
        (dtype('uint8'), 3, 3)
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"`values` must be a non-empty (layers, steps) array, got shape {values.shape}")
    rows, cols = values.shape
    layers = list(range(rows)) if layers is None else list(layers)
    if len(steps) != cols or len(layers) != rows:
        raise ValueError(
            f"`values` is {rows} layers x {cols} steps but {len(layers)} layers and {len(steps)} steps were given"
        )
    finite = values[np.isfinite(values)]
    if value_range is not None:
        lo, hi = (float(v) for v in value_range)
        if not hi > lo:
            raise ValueError(f"`value_range` must be (low, high) with high > low, got {value_range!r}")
    else:
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    span = hi - lo if hi > lo else 1.0
    lut = _lut(cmap)
    index = np.clip(((np.nan_to_num(values, nan=lo) - lo) / span * 256).astype(np.int64), 0, 255)
    colours = lut[index]
    colours[~np.isfinite(values)] = _NAN_GREY
    cell_h, cell_w = _cell(192, rows, 6, 24), _cell(480, cols, 2, 32)
    heat = np.repeat(np.repeat(colours, cell_h, axis=0), cell_w, axis=1)

    font = _font()
    left, top, bottom, bar_gap, bar_w = 2 * LABEL_SIZE + 8, LABEL_SIZE, 2 * LABEL_SIZE, 10, 12
    label_w = 56  # room for the colour bar's numbers
    height, width = top + heat.shape[0] + bottom, left + heat.shape[1] + bar_gap + bar_w + label_w
    canvas = np.full((height, width, 3), 255, np.uint8)
    canvas[top : top + heat.shape[0], left : left + heat.shape[1]] = (heat * 255).round().astype(np.uint8)
    bar = lut[np.linspace(255, 0, heat.shape[0]).round().astype(np.int64)]  # high values on top
    x_bar = left + heat.shape[1] + bar_gap
    canvas[top : top + heat.shape[0], x_bar : x_bar + bar_w] = (bar[:, None] * 255).round().astype(np.uint8)

    # text from the cached label strips, merged with min so that overlapping boxes never erase each other's ink
    _stamp(canvas, (0, 0, width, top), title)
    # y axis: a label per row when they fit, else every k-th
    every = max(1, -(-14 // cell_h))
    for r in range(0, rows, every):
        y = top + r * cell_h
        _stamp(canvas, (LABEL_SIZE, y + cell_h // 2 - 8, left - 2, y + cell_h // 2 + 8), f"L{layers[r]}")
    _stamp(canvas, (0, top, LABEL_SIZE, top + heat.shape[0]), "layer", vertical=True)
    # x axis: the last step and every k-th before it, at least 44 px apart
    y_ticks = top + heat.shape[0]
    stride = -(-44 // cell_w)
    ticks = list(range(cols - 1, -1, -stride))
    for c in ticks:
        x = left + c * cell_w + cell_w // 2
        _stamp(canvas, (x - 24, y_ticks + 3, x + 24, y_ticks + 3 + LABEL_SIZE - 6), str(steps[c]))
    _stamp(canvas, (left, y_ticks + LABEL_SIZE - 2, left + max(heat.shape[1], 60), height), "step")
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for c in ticks:
        x = left + c * cell_w + cell_w // 2
        draw.line([(x, y_ticks), (x, y_ticks + 3)], fill=_TEXT)
    # colour bar: max at the top, min at the bottom
    x_text = x_bar + bar_w + 3
    draw.text((x_text, top), _fmt(hi), fill=_TEXT, font=font)
    draw.text((x_text, top + heat.shape[0] - 14), _fmt(lo), fill=_TEXT, font=font)
    return np.asarray(image)


def _fmt(value: float) -> str:
    return f"{value:.3g}"
