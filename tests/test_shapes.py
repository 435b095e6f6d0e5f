"""The generated shapes dataset of the example (examples/shapes.py): determinism, layout, masks, contrast, probes."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import shapes  # noqa: E402
from shapes import CLASSES, ShapesDataset, make_probes, render_shapes  # noqa: E402

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def unnormalize(images: torch.Tensor) -> torch.Tensor:
    m, s = torch.tensor(MEAN).view(-1, 1, 1), torch.tensor(STD).view(-1, 1, 1)
    return images * s + m


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return ShapesDataset(256, image_size=64, seed=0).tensors()


def test_same_seed_and_index_give_identical_samples():
    a, b = ShapesDataset(20, seed=3), ShapesDataset(20, seed=3)
    for i in (0, 7, 19):
        (xa, ya, ma), (xb, yb, mb) = a[i], b[i]
        assert torch.equal(xa, xb) and ya == yb and torch.equal(ma, mb)
        assert torch.equal(a[i][0], xa)  # and again from the same instance
    # The length does not change the images either: sample i depends on (seed, i) only.
    assert torch.equal(ShapesDataset(5, seed=3)[4][0], a[4][0])


def test_different_index_or_seed_gives_different_images():
    ds = ShapesDataset(10, seed=0)
    images = torch.stack([ds[i][0] for i in range(10)])
    assert all(not torch.equal(images[i], images[j]) for i in range(10) for j in range(i + 1, 10))
    assert not torch.equal(ShapesDataset(10, seed=1)[0][0], images[0])


def test_tensors_match_getitem(data):
    images, labels, masks = data
    ds = ShapesDataset(256, image_size=64, seed=0)
    for i in (0, 63, 64, 255):  # both sides of a chunk boundary
        x, y, m = ds[i]
        torch.testing.assert_close(images[i], x, rtol=0, atol=1e-6)
        assert labels[i].item() == y and torch.equal(masks[i], m)


def test_item_shapes_and_dtypes():
    x, y, m = ShapesDataset(3, image_size=48)[1]
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32
    assert isinstance(y, int) and 0 <= y < len(CLASSES)
    assert m.shape == (48, 48) and m.dtype == torch.bool
    images, labels, masks = ShapesDataset(5, image_size=48).tensors()
    assert images.shape == (5, 3, 48, 48) and labels.dtype == torch.int64 and masks.shape == (5, 48, 48)
    assert len(ShapesDataset(5)) == 5 and ShapesDataset(0).tensors()[0].shape == (0, 3, 64, 64)


def test_labels_in_range_and_every_class_present(data):
    _, labels, _ = data
    assert labels.min() >= 0 and labels.max() < len(CLASSES)
    counts = torch.bincount(labels, minlength=len(CLASSES))
    assert (counts > 256 / len(CLASSES) / 2).all(), counts  # roughly balanced


def test_masks_are_non_empty_and_inside_the_image(data):
    _, _, masks = data
    area = masks.float().mean(dim=(1, 2))
    # Objects span ~20-45% of the side: between ~2% and ~20% of the pixels.
    assert (area > 0.01).all() and (area < 0.25).all(), (area.min(), area.max())
    border = masks[:, 0, :] | masks[:, -1, :] | masks[:, :, 0] | masks[:, :, -1]
    assert not border.any(), "an object touches the border: it may be cut off"


def test_object_differs_from_background_under_the_mask(data):
    images, _, masks = data
    pixels = unnormalize(images).clamp(0, 1)
    assert pixels.min() >= 0 and pixels.max() <= 1
    inside = masks.unsqueeze(1)  # (B, 1, H, W)
    n_in, n_out = inside.sum(dim=(2, 3)), (~inside).sum(dim=(2, 3))
    mean_in = (pixels * inside).sum(dim=(2, 3)) / n_in
    mean_out = (pixels * ~inside).sum(dim=(2, 3)) / n_out
    # Light object on a darker background, in every channel of every image.
    assert (mean_in - mean_out > 0.1).all(), (mean_in - mean_out).min()
    # The object is one flat colour plus pixel noise (sigma <= 0.08): no background texture under the mask.
    var_in = ((pixels - mean_in[..., None, None]) ** 2 * inside).sum(dim=(2, 3)) / n_in
    assert (var_in.sqrt() < 0.1).all()


def test_object_colour_is_not_tied_to_the_class(data):
    images, labels, masks = data
    pixels = unnormalize(images)
    colour = (pixels * masks.unsqueeze(1)).sum(dim=(2, 3)) / masks.sum(dim=(1, 2)).unsqueeze(1)  # (B, 3)
    per_class = torch.stack([colour[labels == c].mean(dim=0) for c in range(len(CLASSES))])
    assert (per_class - colour.mean(dim=0)).abs().max() < 0.06  # class means of the object colour all agree


def test_normalisation_uses_mean_and_std():
    raw = ShapesDataset(4, mean=(0, 0, 0), std=(1, 1, 1)).tensors()[0]
    norm = ShapesDataset(4, mean=(0.2, 0.4, 0.6), std=(0.5, 0.25, 2.0)).tensors()[0]
    expected = (raw - torch.tensor([0.2, 0.4, 0.6]).view(3, 1, 1)) / torch.tensor([0.5, 0.25, 2.0]).view(3, 1, 1)
    torch.testing.assert_close(norm, expected)


@pytest.mark.parametrize(
    ("label", "area"),  # analytic areas in units of the bounding radius squared
    [
        (0, math.pi * shapes._CIRCLE_RADIUS**2),
        (1, (2 * shapes._SQUARE_HALF_SIDE) ** 2),
        (2, 3 * math.sqrt(3) * shapes._TRIANGLE_INRADIUS**2),
        (3, 2 * (2 * shapes._CROSS_HALF_LENGTH) * (2 * shapes._CROSS_HALF_WIDTH) - (2 * shapes._CROSS_HALF_WIDTH) ** 2),
    ],
)
def test_rasterised_area_matches_the_outline(label, area):
    size = 256
    uniforms = torch.full((1, shapes._NUM_UNIFORMS), 0.5)
    uniforms[0, 1] = 1.0  # largest object: bounding radius MAX_SIZE / 2, centred (u2 = u3 = 0.5)
    _, labels, masks = render_shapes(uniforms, torch.zeros(1, 3, size, size), torch.tensor([label]))
    radius_px = shapes.MAX_SIZE / 2 * size
    assert labels.tolist() == [label]
    assert masks.sum().item() == pytest.approx(area * radius_px**2, rel=0.03)


def test_make_probes_cover_every_class_and_are_fixed():
    images, labels, masks = make_probes(8, image_size=64, seed=0)
    assert images.shape == (8, 3, 64, 64) and labels.shape == (8,) and masks.shape == (8, 64, 64)
    assert sorted(set(labels.tolist())) == list(range(len(CLASSES)))
    assert torch.bincount(labels).tolist() == [2, 2, 2, 2]
    assert masks.flatten(1).any(dim=1).all()
    again = make_probes(8, image_size=64, seed=0)
    assert torch.equal(images, again[0]) and torch.equal(labels, again[1]) and torch.equal(masks, again[2])
    # Probes come from their own stream: not copies of the training images of the same seed.
    train = ShapesDataset(8, image_size=64, seed=0).tensors()[0]
    assert not any(torch.equal(p, t) for p in images for t in train)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: ShapesDataset(-1), "num_samples"),
        (lambda: ShapesDataset(4, image_size=4), "image_size"),
        (lambda: ShapesDataset(4, mean=(0.5, 0.5)), "mean"),
        (lambda: ShapesDataset(4, std=(0.5, 0.0, 0.5)), "std"),
        (lambda: make_probes(0), "`n`"),
    ],
)
def test_invalid_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_index_out_of_range_raises():
    ds = ShapesDataset(3)
    with pytest.raises(IndexError):
        ds[3]
    assert torch.equal(ds[-1][0], ds[2][0])
