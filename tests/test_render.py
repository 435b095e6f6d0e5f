import matplotlib
import numpy as np
import pytest
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from lightning_attn.render import (
    COLOUR_BAR_HEIGHT,
    LABEL_SIZE,
    check_cmap,
    colorize,
    colormap_lut,
    filmstrip,
    grid_shape,
    make_grid,
    matrix_tiles,
    normalize_per_map,
    overlay,
    tile_shape,
    to_display,
    with_colour_bar,
)


def mpl_rgb(name, values):
    """matplotlib's own colours for ``values``: (..., 3) float64."""
    values = np.asarray(values, dtype=np.float64)
    return matplotlib.colormaps[name](values.ravel(), bytes=False)[:, :3].reshape(*values.shape, 3)


# --- colormaps ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["jet", "viridis", "inferno", "magma", "turbo", "gray_r"])
def test_colormap_lut_is_matplotlibs_table(name):
    lut = colormap_lut(name)
    assert lut.shape == (256, 3) and lut.dtype == torch.float32
    np.testing.assert_allclose(lut.numpy(), mpl_rgb(name, np.arange(256) / 255), atol=1e-6)


def test_colormap_lut_returns_fresh_tensor():
    lut = colormap_lut("jet")
    lut.zero_()
    assert colormap_lut("jet").sum() > 0


@pytest.mark.parametrize("bad", ["not_a_cmap", "", None])
def test_unknown_cmap_names_valid_ones(bad):
    with pytest.raises(ValueError, match="matplotlib colormap name such as 'jet', 'viridis'"):
        check_cmap(bad)
    with pytest.raises(ValueError, match="any name in matplotlib.colormaps works"):
        overlay(torch.rand(1, 3, 8, 8), torch.rand(1, 1, 2, 2), tile_size=8, cmap=bad)


@pytest.mark.parametrize("name", ["jet", "viridis", "turbo"])
def test_colorize_matches_matplotlib(name):
    values = np.concatenate([np.random.default_rng(0).random(502), np.arange(256) / 255, [0.0, 1.0]])
    maps = torch.tensor(values, dtype=torch.float32).view(2, -1, 2)
    rgb = colorize(maps, colormap_lut(name))
    assert rgb.shape == (2, 3, maps.shape[1], 2)
    expected = mpl_rgb(name, maps.double().numpy())  # (2, h, w, 3)
    np.testing.assert_allclose(rgb.movedim(-3, -1).numpy(), expected, atol=1 / 255)


# --- normalisation ------------------------------------------------------------------------------------------------


def test_normalize_per_map_each_map_to_unit_range():
    maps = torch.rand(3, 2, 5, 7) * torch.tensor([1e-6, 1.0, 1e6]).view(3, 1, 1, 1) - 4
    out = normalize_per_map(maps)
    assert out.dtype == torch.float32
    flat = out.flatten(-2)
    torch.testing.assert_close(flat.amin(-1), torch.zeros(3, 2))
    torch.testing.assert_close(flat.amax(-1), torch.ones(3, 2))
    lo, hi = maps.amin((-2, -1), keepdim=True), maps.amax((-2, -1), keepdim=True)
    torch.testing.assert_close(out, (maps - lo) / (hi - lo))


def test_normalize_per_map_constant_map_is_zero():
    out = normalize_per_map(torch.full((2, 4, 4), 3.5))
    assert torch.equal(out, torch.zeros(2, 4, 4))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_normalize_per_map_rejects_non_finite(bad):
    maps = torch.rand(2, 3, 4, 4)
    maps[1, 2, 0, 3] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        normalize_per_map(maps)


# --- overlay ------------------------------------------------------------------------------------------------------


def hot_patch_maps():
    maps = torch.zeros(1, 1, 4, 4)
    maps[0, 0, 1, 2] = 3.0
    return maps


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_overlay_blends_heat_over_image(alpha):
    grey = 0.4
    images = torch.full((1, 3, 64, 64), grey)
    tiles = overlay(images, hot_patch_maps(), tile_size=32, cmap="jet", alpha=alpha, scale="per_map")
    assert tiles.shape == (1, 2, 3, 32, 32) and tiles.dtype == torch.float32
    torch.testing.assert_close(tiles[0, 0], torch.full((3, 32, 32), grey))
    # Patch (1, 2) covers rows 8..15, cols 16..23; bilinear upsampling peaks at its centre, (11..12, 19..20).
    hot = alpha * mpl_rgb("jet", 1.0) + (1 - alpha) * grey
    cold = alpha * mpl_rgb("jet", 0.0) + (1 - alpha) * grey
    for y, x in [(11, 19), (12, 20)]:
        np.testing.assert_allclose(tiles[0, 1, :, y, x].numpy(), hot, atol=1e-6)
    for y, x in [(0, 0), (31, 31), (31, 0), (0, 31)]:
        np.testing.assert_allclose(tiles[0, 1, :, y, x].numpy(), cold, atol=1e-6)


def test_overlay_image_column_is_the_image_at_tile_size():
    images = torch.rand(2, 3, 24, 40)
    tiles = overlay(images, torch.rand(2, 3, 3, 5), tile_size=40)
    torch.testing.assert_close(tiles[:, 0], images)


def test_overlay_per_map_normalises_each_tile():
    maps = torch.rand(2, 1, 4, 4)
    scaled = torch.cat([maps * 2.0**-12, maps * 2.0**10], dim=1)  # exact rescalings: identical after min-max
    tiles = overlay(torch.rand(2, 3, 16, 16), scaled, tile_size=16, scale="per_map")
    assert torch.equal(tiles[:, 1], tiles[:, 2])


def test_overlay_per_map_constant_map_is_cold_not_nan():
    tiles = overlay(
        torch.full((1, 3, 8, 8), 0.2), torch.full((1, 2, 2, 2), 0.25), tile_size=8, alpha=0.5, scale="per_map"
    )
    assert torch.isfinite(tiles).all()
    expected = torch.tensor(0.5 * mpl_rgb("jet", 0.0) + 0.5 * 0.2, dtype=torch.float32).view(3, 1, 1)
    torch.testing.assert_close(tiles[0, 1:], expected.expand(2, 3, 8, 8))


def test_overlay_rejects_nan_maps():
    maps = torch.rand(1, 2, 4, 4)
    maps[0, 1, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        overlay(torch.rand(1, 3, 16, 16), maps, tile_size=16)


@pytest.mark.parametrize(("size", "tile"), [((64, 96), (32, 48)), ((96, 64), (48, 32)), ((50, 50), (48, 48))])
def test_overlay_keeps_aspect_ratio(size, tile):
    assert tile_shape(*size, 48) == tile
    tiles = overlay(torch.rand(2, 3, *size), torch.rand(2, 4, size[0] // 16, size[1] // 16), tile_size=48)
    assert tiles.shape == (2, 5, 3, *tile)
    assert 0.0 <= tiles.min() and tiles.max() <= 1.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(images=torch.rand(1, 1, 8, 8)), "`images` must be"),
        (dict(maps=torch.rand(2, 1, 2, 2)), "batch size"),
        (dict(maps=torch.rand(1, 2, 2)), "`maps` must be"),
        (dict(alpha=1.5), "`alpha`"),
        (dict(tile_size=0), "`tile_size`"),
        (dict(tile_size=16.0), "`tile_size`"),
    ],
)
def test_overlay_bad_arguments(kwargs, match):
    args = dict(images=torch.rand(1, 3, 8, 8), maps=torch.rand(1, 1, 2, 2), tile_size=8) | kwargs
    with pytest.raises(ValueError, match=match):
        overlay(**args)


# --- matrix tiles -------------------------------------------------------------------------------------------------


def test_matrix_tiles_crisp_blocks_in_cmap_colours():
    matrix = torch.tensor([[0.0, 4.0], [2.0, 1.0]])
    tiles = matrix_tiles(matrix.view(1, 1, 2, 2), tile_size=8, cmap="viridis", scale="per_map")
    assert tiles.shape == (1, 1, 3, 8, 8)
    expected = np.kron(mpl_rgb("viridis", (matrix / 4).numpy()).transpose(2, 0, 1), np.ones((1, 4, 4)))
    np.testing.assert_allclose(tiles[0, 0].numpy(), expected, atol=1e-6)


def test_matrix_tiles_per_map_normalise_each_matrix():
    m = torch.rand(1, 1, 5, 5)
    tiles = matrix_tiles(torch.cat([m, m * 2.0**8], dim=1), tile_size=12, scale="per_map")
    assert tiles.shape == (1, 2, 3, 12, 12)
    assert torch.equal(tiles[0, 0], tiles[0, 1])


# --- grid ---------------------------------------------------------------------------------------------------------


def coloured_tiles(rows, cols, th, tw):
    """Tiles of distinct flat colours (never white) so each one's position can be found in the grid."""
    values = torch.linspace(0.05, 0.9, rows * cols * 3).view(rows, cols, 3, 1, 1)
    return values.expand(rows, cols, 3, th, tw).contiguous()


@pytest.mark.parametrize("col", [False, True])
@pytest.mark.parametrize("row", [False, True])
@pytest.mark.parametrize("padding", [0, 3])
def test_make_grid_shape_and_tile_positions(col, row, padding):
    rows, cols, th, tw = 2, 3, 20, 30
    tiles = coloured_tiles(rows, cols, th, tw)
    grid = make_grid(
        tiles,
        col_labels=["image", "L0", "mean"] if col else None,
        row_labels=["a", "b"] if row else None,
        padding=padding,
    )
    assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3
    assert grid.shape[:2] == grid_shape(rows, cols, th, tw, col, row, padding)
    assert grid.shape[:2] == (
        LABEL_SIZE * col + rows * th + (rows + 1) * padding,
        LABEL_SIZE * row + cols * tw + (cols + 1) * padding,
    )
    top, left = LABEL_SIZE * col, LABEL_SIZE * row
    expected = np.round(tiles.permute(0, 1, 3, 4, 2).numpy() * 255).astype(np.uint8)
    for r in range(rows):
        for c in range(cols):
            y, x = top + padding + r * (th + padding), left + padding + c * (tw + padding)
            np.testing.assert_array_equal(grid[y : y + th, x : x + tw], expected[r, c])
    if padding:  # the padding between tiles is white
        assert (grid[top + padding + th : top + 2 * padding + th, left + padding :] == 255).all()


def test_make_grid_draws_column_labels_centred():
    tiles = coloured_tiles(1, 3, 40, 40)
    plain = make_grid(tiles, padding=2)
    labelled = make_grid(tiles, col_labels=["image", "L11", "mean"], padding=2)
    np.testing.assert_array_equal(labelled[LABEL_SIZE:], plain)  # labels only add the header
    header = labelled[:LABEL_SIZE]
    assert (make_grid(tiles, col_labels=["", "", ""], padding=2)[:LABEL_SIZE] == 255).all()
    for c in range(3):
        x0 = 2 + c * 42
        ink = np.argwhere(header[:, x0 : x0 + 40].min(axis=-1) < 128)
        assert len(ink) > 10, f"no text over column {c}"
        assert abs(ink[:, 1].mean() - 20) < 4 and abs(ink[:, 0].mean() - LABEL_SIZE / 2) < 5
    other = make_grid(tiles, col_labels=["image", "L10", "mean"], padding=2)
    assert not np.array_equal(other[:LABEL_SIZE], header)


def test_make_grid_draws_row_labels_vertically():
    tiles = coloured_tiles(2, 1, 60, 30)
    grid = make_grid(tiles, row_labels=["sample", "dog"], padding=2)
    np.testing.assert_array_equal(grid[:, LABEL_SIZE:], make_grid(tiles, padding=2))
    for r in range(2):
        y0 = 2 + r * 62
        ink = np.argwhere(grid[y0 : y0 + 60, :LABEL_SIZE].min(axis=-1) < 128)
        assert len(ink) > 10
        height, width = np.ptp(ink, axis=0) + 1
        assert height > width  # text runs along the row, bottom to top
    sample = np.argwhere(grid[2:62, :LABEL_SIZE].min(axis=-1) < 128)
    assert np.ptp(sample[:, 0]) > 30


def test_make_grid_cuts_labels_that_do_not_fit():
    grid = make_grid(coloured_tiles(1, 2, 16, 16), col_labels=["a very long label", "b"], padding=2)
    header = grid[:LABEL_SIZE]
    assert (header[:, 18] == 255).all()  # the padding column between the labels stays clear


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(col_labels=["a", "b"]), "`col_labels` has 2 labels but the grid has 3"),
        (dict(row_labels=["a"]), "`row_labels` has 1 labels but the grid has 2"),
        (dict(padding=-1), "`padding`"),
    ],
)
def test_make_grid_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_grid(coloured_tiles(2, 3, 8, 8), **kwargs)
    with pytest.raises(ValueError, match="`tiles` must be"):
        make_grid(torch.rand(2, 3, 8, 8))


def test_one_host_copy_per_grid(monkeypatch):
    calls = []
    cpu = torch.Tensor.cpu

    def counting_cpu(self, *args, **kwargs):
        calls.append(tuple(self.shape))
        return cpu(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    tiles = overlay(torch.rand(2, 3, 32, 32), torch.rand(2, 3, 4, 4), tile_size=32)
    assert calls == []
    make_grid(tiles, col_labels=["image", "L0", "L1", "L2"], row_labels=["0", "1"])
    assert calls == [(2, 32, 4, 32, 3)]  # the tiles as uint8 in canvas order, once; laid out on the host


# --- to_display ---------------------------------------------------------------------------------------------------


def test_to_display_round_trip_timm_normalisation():
    pixels = torch.rand(2, 3, 8, 8)
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    shown = to_display((pixels - mean) / std, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    torch.testing.assert_close(shown, pixels)


def test_to_display_clamps_and_repeats_grey():
    grey = torch.tensor([-1.0, 0.0, 1.0, 3.0]).view(1, 1, 2, 2)
    shown = to_display(grey, mean=[0.5], std=[0.5])
    assert shown.shape == (1, 3, 2, 2)
    for channel in shown[0]:
        assert channel.flatten().tolist() == [0.0, 0.5, 1.0, 1.0]
    torch.testing.assert_close(to_display(grey, None, None)[0, 2], grey[0, 0].clamp(0, 1))


@pytest.mark.parametrize(
    ("images", "kwargs", "match"),
    [
        (torch.rand(1, 2, 4, 4), {}, "`images` must be"),
        (torch.rand(3, 4, 4), {}, "`images` must be"),
        (torch.rand(1, 3, 4, 4), dict(mean=(0.5, 0.5)), "`mean` has 2 values but the images have 3 channels"),
        (torch.rand(1, 1, 4, 4), dict(std=(0.2, 0.2, 0.2)), "`std` has 3 values"),
    ],
)
def test_to_display_bad_arguments(images, kwargs, match):
    with pytest.raises(ValueError, match=match):
        to_display(images, **kwargs)


# --- filmstrip ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "frames"), [((64, 96), 3), ((40, 40), 1), ((96, 64), 5)])
def test_filmstrip_is_one_labelled_row_of_overlays(size, frames):
    image, maps = torch.rand(3, *size), torch.rand(frames, 4, 4)
    labels = [f"step {120 * t}" for t in range(frames)]
    strip = filmstrip(image, maps, labels, tile_size=48, cmap="viridis", alpha=0.3)
    th, tw = tile_shape(*size, 48)
    height, width = grid_shape(1, frames + 1, th, tw, has_col_labels=True)
    assert strip.dtype == np.uint8 and strip.shape == (height + COLOUR_BAR_HEIGHT, width, 3)
    tiles = overlay(image[None], maps[None], tile_size=48, cmap="viridis", alpha=0.3)
    grid = make_grid(tiles, col_labels=["image", *labels])
    np.testing.assert_array_equal(strip, with_colour_bar(grid, "viridis"))


def test_filmstrip_bad_arguments():
    with pytest.raises(ValueError, match="`labels` has 1 labels but there are 2 maps"):
        filmstrip(torch.rand(3, 8, 8), torch.rand(2, 2, 2), ["step 0"], tile_size=8)
    with pytest.raises(ValueError, match=r"`image` must be one \(3, H, W\) image"):
        filmstrip(torch.rand(1, 3, 8, 8), torch.rand(2, 2, 2), ["a", "b"], tile_size=8)
    with pytest.raises(ValueError, match=r"`maps` must be \(T, gh, gw\)"):
        filmstrip(torch.rand(3, 8, 8), torch.rand(1, 2, 2, 2), ["a", "b"], tile_size=8)
