"""A classification dataset drawn in code: one coloured shape per image on a textured background.

Nothing is downloaded. Each image shows a circle, square, triangle or cross (:data:`CLASSES`) at a random
position, size (about 20-45% of the side) and rotation, in a random light colour, over a darker background of
random hue made of a low-frequency colour gradient, stripes and pixel noise. The class depends only on the
outline, and neither colour nor background says anything about it, so a model that classifies well has to look at
the object -- which is what makes the attention maps of :class:`lightning_attn.AttentionMonitor` easy to judge:
every sample also carries the object's mask.

Every sample is a pure function of ``(seed, index)``: it is drawn from its own ``torch.Generator``, so data-loader
workers, a re-created dataset and another process all see the same pixels. Shapes are rasterised as inequalities
on a coordinate grid, in batches, with torch ops only (several thousand 64 x 64 images per second on a CPU).

Example::

    >>> ds = ShapesDataset(100, image_size=64, seed=0)
    >>> image, label, mask = ds[0]
    >>> image.shape, image.dtype, CLASSES[label], mask.shape, mask.dtype
    (torch.Size([3, 64, 64]), torch.float32, 'square', torch.Size([64, 64]), torch.bool)
    >>> images, labels, masks = make_probes(8, image_size=64, seed=0)
    >>> images.shape, labels.tolist()
    (torch.Size([8, 3, 64, 64]), [0, 1, 2, 3, 0, 1, 2, 3])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["CLASSES", "ShapesDataset", "make_probes", "render_shapes"]

CLASSES = ("circle", "square", "triangle", "cross")

#: Default normalisation: that of timm's ViTs (``vit_tiny_patch16_224``'s data config), mapping [0, 1] to [-1, 1].
DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)

# Object size: the shape's bounding circle has a diameter of MIN_SIZE..MAX_SIZE times the image side, so the
# shapes themselves span about 20-45% of it.
MIN_SIZE, MAX_SIZE = 0.25, 0.50

# Outlines in units of the bounding-circle radius (1.0 = the circle of diameter `size`), picked so the four
# classes cover similar areas and every rotation stays within the bounding circle.
_CIRCLE_RADIUS = 0.85
_SQUARE_HALF_SIDE = 0.70  # circumradius 0.99
_TRIANGLE_INRADIUS = 0.50  # equilateral, circumradius 1.0
_CROSS_HALF_LENGTH, _CROSS_HALF_WIDTH = 0.95, 0.30  # corners at radius 0.996

# Streams keep dataset samples and probes apart for one seed.
_DATA_STREAM, _PROBE_STREAM = 0, 1

# Layout of the uniform draws of one sample (see `_draw`).
_NUM_UNIFORMS = 20


def _sample_seed(seed: int, index: int, stream: int) -> int:
    """A 63-bit generator seed from (seed, index, stream): splitmix64 finaliser over a mixed key.

    Neighbouring indices and seeds give unrelated generator states (plain `seed + index` would make seed 1's
    sample 0 equal seed 0's sample 1).
    """
    mask = (1 << 64) - 1
    x = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return (x ^ (x >> 31)) >> 1


def _draw(seed: int, index: int, stream: int, image_size: int) -> tuple[Tensor, Tensor]:
    """All random numbers of one sample: (uniforms (_NUM_UNIFORMS,), noise (3, H, W)), from its own generator."""
    g = torch.Generator().manual_seed(_sample_seed(seed, index, stream))
    uniforms = torch.rand(_NUM_UNIFORMS, generator=g)
    noise = torch.randn(3, image_size, image_size, generator=g)
    return uniforms, noise


def render_shapes(uniforms: Tensor, noise: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Rasterise a batch of samples from their random draws; un-normalised colours in [0, 1].

    Args:
        uniforms: (B, 20) uniform [0, 1) draws, one row per sample.
        noise: (B, 3, H, W) standard normal pixel noise; also sets the image size.
        labels: (B,) class indices to draw instead of the class encoded in ``uniforms[:, 0]`` (used for probes).

    Returns:
        ``(images, labels, masks)``: (B, 3, H, W) float in [0, 1], (B,) int64, (B, H, W) bool true on the object.
    """
    b, _, h, w = noise.shape
    u = uniforms.to(torch.float32).T  # (20, B): one row per quantity
    if labels is None:
        labels = (u[0] * len(CLASSES)).long().clamp_(max=len(CLASSES) - 1)
    labels = labels.long()

    def per_sample(t: Tensor) -> Tensor:  # (B,) -> (B, 1, 1) to broadcast over the pixel grid
        return t.view(b, 1, 1)

    # Pixel centres in [0, 1], y down; (1, H, W) grids.
    ys = ((torch.arange(h, dtype=torch.float32) + 0.5) / h).view(1, h, 1).expand(1, h, w)
    xs = ((torch.arange(w, dtype=torch.float32) + 0.5) / w).view(1, 1, w).expand(1, h, w)

    # Object geometry: radius of the bounding circle (fraction of the side), centre kept inside the image, rotation.
    radius = (MIN_SIZE + (MAX_SIZE - MIN_SIZE) * u[1]) / 2
    cx = radius + (1 - 2 * radius) * u[2]
    cy = radius + (1 - 2 * radius) * u[3]
    theta = 2 * math.pi * u[4]
    dx, dy = xs - per_sample(cx), ys - per_sample(cy)
    cos, sin = per_sample(torch.cos(theta)), per_sample(torch.sin(theta))
    r = per_sample(radius)
    px, py = (dx * cos + dy * sin) / r, (-dx * sin + dy * cos) / r  # object frame, bounding circle = unit circle

    circle = px.square() + py.square() <= _CIRCLE_RADIUS**2
    square = torch.maximum(px.abs(), py.abs()) <= _SQUARE_HALF_SIDE
    triangle = torch.ones_like(circle)
    for k in range(3):  # three half-planes with outward normals 120 degrees apart
        a = math.pi / 2 + 2 * math.pi * k / 3
        triangle &= px * math.cos(a) + py * math.sin(a) <= _TRIANGLE_INRADIUS
    arm_x = (px.abs() <= _CROSS_HALF_LENGTH) & (py.abs() <= _CROSS_HALF_WIDTH)
    arm_y = (py.abs() <= _CROSS_HALF_LENGTH) & (px.abs() <= _CROSS_HALF_WIDTH)
    cross = arm_x | arm_y
    outlines = torch.stack([circle, square, triangle, cross], dim=1)  # (B, C, H, W), in CLASSES order
    masks = outlines.gather(1, labels.view(b, 1, 1, 1).expand(b, 1, h, w)).squeeze(1)

    # Colours: a light object on a dark background, both of random hue (independent of the class); every channel
    # of the object is >= 0.15 brighter than the background. (With random per-channel contrast signs a small ViT
    # from scratch learns several times slower: its linear patch embedding cannot see such edges directly.)
    colour = (0.6 + 0.4 * u[5:8]).T.reshape(b, 3, 1, 1)
    near, far = (0.35 * u[8:11]).T.reshape(b, 3, 1, 1), (0.35 * u[11:14]).T.reshape(b, 3, 1, 1)
    phi = per_sample(2 * math.pi * u[14]).unsqueeze(1)  # gradient direction, (B, 1, 1, 1)
    ramp = 0.5 + ((xs - 0.5) * torch.cos(phi) + (ys - 0.5) * torch.sin(phi)) / math.sqrt(2)  # in [0, 1]
    psi = per_sample(math.pi * u[15]).unsqueeze(1)  # stripe direction
    cycles = per_sample(2 + 6 * u[16]).unsqueeze(1)  # 2-8 stripes across the image
    phase = per_sample(2 * math.pi * u[17]).unsqueeze(1)
    amplitude = per_sample(0.1 * u[18]).unsqueeze(1)
    stripes = torch.sin(2 * math.pi * cycles * (xs * torch.cos(psi) + ys * torch.sin(psi)) + phase)
    background = (near + (far - near) * ramp + amplitude * stripes).clamp(0, 1)  # <= 0.45

    sigma = per_sample(0.02 + 0.06 * u[19]).unsqueeze(1)
    images = torch.where(masks.unsqueeze(1), colour, background) + sigma * noise
    return images.clamp_(0, 1), labels, masks


def _normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    m = torch.as_tensor(mean, dtype=images.dtype).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype).view(-1, 1, 1)
    return (images - m) / s


def _check_normalization(mean: Sequence[float], std: Sequence[float]) -> None:
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"`mean` and `std` need 3 values (RGB), got mean={tuple(mean)} and std={tuple(std)}")
    if any(s <= 0 for s in std):
        raise ValueError(f"`std` must be positive, got {tuple(std)}")


class ShapesDataset(Dataset):
    """``num_samples`` images of one shape each; sample ``i`` is a pure function of ``(seed, i)``.

    Args:
        num_samples: dataset length.
        image_size: side of the square images, in pixels.
        seed: selects the images; two datasets with the same seed agree on every index they share.
        mean: per-channel mean subtracted from the [0, 1] colours.
        std: per-channel divisor applied after the mean.

    Items are ``(image, label, mask)``: a (3, H, W) float32 image normalised with ``mean``/``std``, the class index
    into :data:`CLASSES`, and a (H, W) bool mask that is true on the object.

    Raises:
        ValueError: if ``num_samples`` is negative, ``image_size`` < 8, or ``mean``/``std`` are not 3 values
            (``std`` > 0).

    Example::

        >>> images, labels, masks = ShapesDataset(16, image_size=32).tensors()
        >>> images.shape, labels.shape, masks.shape
        (torch.Size([16, 3, 32, 32]), torch.Size([16]), torch.Size([16, 32, 32]))
    """

    classes = CLASSES

    def __init__(
        self,
        num_samples: int,
        image_size: int = 64,
        seed: int = 0,
        mean: Sequence[float] = DEFAULT_MEAN,
        std: Sequence[float] = DEFAULT_STD,
    ) -> None:
        if num_samples < 0:
            raise ValueError(f"`num_samples` must be >= 0, got {num_samples}")
        if image_size < 8:
            raise ValueError(f"`image_size` must be >= 8 pixels, got {image_size}")
        _check_normalization(mean, std)
        self.num_samples = int(num_samples)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[Tensor, int, Tensor]:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for a ShapesDataset of {self.num_samples} samples")
        index %= self.num_samples
        uniforms, noise = _draw(self.seed, index, _DATA_STREAM, self.image_size)
        images, labels, masks = render_shapes(uniforms[None], noise[None])
        return _normalize(images[0], self.mean, self.std), int(labels[0]), masks[0]

    def tensors(self, chunk_size: int = 64) -> tuple[Tensor, Tensor, Tensor]:
        """Render the whole dataset at once, ``chunk_size`` images per batch: (images, labels, masks).

        Same values as stacking ``self[i]`` for every ``i``, several times faster; useful to keep the data in
        memory (a ``TensorDataset``) when training for several epochs.
        """
        images, labels, masks = [], [], []
        for start in range(0, self.num_samples, chunk_size):
            stop = min(start + chunk_size, self.num_samples)
            draws = [_draw(self.seed, i, _DATA_STREAM, self.image_size) for i in range(start, stop)]
            x, y, m = render_shapes(torch.stack([d[0] for d in draws]), torch.stack([d[1] for d in draws]))
            images.append(_normalize(x, self.mean, self.std))
            labels.append(y)
            masks.append(m)
        if not images:
            s = self.image_size
            return torch.empty(0, 3, s, s), torch.empty(0, dtype=torch.long), torch.empty(0, s, s, dtype=torch.bool)
        return torch.cat(images), torch.cat(labels), torch.cat(masks)


def make_probes(
    n: int,
    image_size: int = 64,
    seed: int = 0,
    mean: Sequence[float] = DEFAULT_MEAN,
    std: Sequence[float] = DEFAULT_STD,
) -> tuple[Tensor, Tensor, Tensor]:
    """``n`` fixed probe images with their labels and object masks, classes in turn (0, 1, 2, 3, 0, ...).

    Probes come from their own random stream, so they are never among the ``ShapesDataset(..., seed=seed)``
    training images; any ``n >= len(CLASSES)`` covers every class.

    Returns:
        ``(images, labels, masks)``: (n, 3, H, W) float32 normalised with ``mean``/``std``, (n,) int64,
        (n, H, W) bool.

    Raises:
        ValueError: if ``n`` < 1 or ``mean``/``std`` are not 3 values (``std`` > 0).

    Example::

        >>> images, labels, masks = make_probes(4, image_size=32)
        >>> [CLASSES[i] for i in labels]
        ['circle', 'square', 'triangle', 'cross']
    """
    if n < 1:
        raise ValueError(f"`n` must be >= 1, got {n}")
    _check_normalization(mean, std)
    draws = [_draw(seed, i, _PROBE_STREAM, image_size) for i in range(n)]
    labels = torch.arange(n) % len(CLASSES)
    uniforms, noise = torch.stack([d[0] for d in draws]), torch.stack([d[1] for d in draws])
    images, labels, masks = render_shapes(uniforms, noise, labels)
    return _normalize(images, mean, std), labels, masks
