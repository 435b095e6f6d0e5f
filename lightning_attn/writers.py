"""Where rendered grids and scalars go: small adapters between the callback and a logger or a folder.

The callback talks only to :class:`AttentionWriter`; supporting another logger means writing its three methods.
"""

from __future__ import annotations

import csv
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

__all__ = ["AttentionWriter", "PNGWriter", "TensorBoardWriter", "save_gif"]


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shape = (image.shape, image.dtype) if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"`image` must be an (H, W, 3) uint8 numpy array (see render.make_grid), got {shape}")


class AttentionWriter(ABC):
    """Destination for the callback's images and scalars."""

    @abstractmethod
    def add_image(self, tag: str, image: np.ndarray, step: int) -> None:
        """Record an (H, W, 3) uint8 ``image`` under ``tag`` at ``step``."""

    @abstractmethod
    def add_scalar(self, tag: str, value: float, step: int) -> None:
        """Record ``value`` under ``tag`` at ``step``."""

    def flush(self) -> None:
        """Push buffered records to storage; writers that write at once need not override it."""


class TensorBoardWriter(AttentionWriter):
    """Writes to a ``torch.utils.tensorboard.SummaryWriter``, e.g. Lightning's ``TensorBoardLogger.experiment``.

    Example::

        >>> import tempfile
        >>> from torch.utils.tensorboard import SummaryWriter
        >>> with tempfile.TemporaryDirectory() as d:
        ...     writer = TensorBoardWriter(SummaryWriter(d))
        ...     writer.add_image("attention/raw", np.zeros((8, 12, 3), np.uint8), step=3)
        ...     writer.add_scalar("attention/entropy", 0.5, step=3)
        ...     writer.flush()
        ...     writer.experiment.close()
    """

    def __init__(self, experiment: Any) -> None:
        self.experiment = experiment

    def add_image(self, tag: str, image: np.ndarray, step: int) -> None:
        _check_image(image)
        self.experiment.add_image(tag, image, global_step=step, dataformats="HWC")

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.experiment.add_scalar(tag, value, global_step=step)

    def flush(self) -> None:
        self.experiment.flush()


class PNGWriter(AttentionWriter):
    """Writes each image to ``directory/<tag>_step<step:07d>.png`` (``/`` in tags becomes ``__``) and appends
    scalars to ``directory/scalars.csv`` (columns ``step,tag,value``). The directory is created on first write.

    Example::

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     writer = PNGWriter(d)
        ...     writer.add_image("attention/raw", np.zeros((8, 12, 3), np.uint8), step=3)
        ...     writer.add_scalar("attention/entropy", 0.5, step=3)
        ...     sorted(p.name for p in Path(d).iterdir())
        ['attention__raw_step0000003.png', 'scalars.csv']
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def image_path(self, tag: str, step: int) -> Path:
        """The file :meth:`add_image` writes for ``tag`` at ``step``."""
        return self.directory / f"{tag.replace('/', '__')}_step{step:07d}.png"

    def add_image(self, tag: str, image: np.ndarray, step: int) -> None:
        _check_image(image)
        self.directory.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(self.image_path(tag, step))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / "scalars.csv"
        new = not path.exists()
        with path.open("a", newline="") as f:
            rows = csv.writer(f)
            if new:
                rows.writerow(["step", "tag", "value"])
            rows.writerow([step, tag, float(value)])


def save_gif(frames: Sequence[np.ndarray], path: str | os.PathLike[str], duration_ms: int = 500) -> Path:
    """Write (H, W, 3) uint8 frames as an animated GIF that loops forever; returns the path written.

    The parent directory is created if needed and the file is GIF whatever its suffix. GIF holds at most 256
    colours per frame, so Pillow quantises each frame to its own palette: colours come back close, not exact.
    Pillow also merges a frame identical to the one before into it (shown for both durations), so the file can
    hold fewer frames than were passed when some repeat; the animation looks the same.

    Args:
        frames: images of one size, e.g. :func:`~lightning_attn.render.filmstrip` rows or grids at each step.
        path: file to write.
        duration_ms: how long each frame shows, in milliseconds.

    Raises:
        ValueError: no frames, a frame that is not (H, W, 3) uint8, frames of different sizes, or a
            ``duration_ms`` that is not a positive int.

    Example::

        >>> import tempfile
        >>> frames = [np.full((8, 12, 3), v, np.uint8) for v in (0, 128, 255)]
        >>> with tempfile.TemporaryDirectory() as d, Image.open(save_gif(frames, Path(d) / "a.gif")) as gif:
        ...     gif.n_frames, gif.size
        (3, (12, 8))
    """
    frames = list(frames)
    if not frames:
        raise ValueError("`frames` is empty: pass at least one (H, W, 3) uint8 image")
    for frame in frames:
        _check_image(frame)
    sizes = sorted({frame.shape for frame in frames})
    if len(sizes) > 1:
        raise ValueError(f"`frames` must all have one size, got shapes {sizes}: render them with the same tile size")
    if isinstance(duration_ms, bool) or not isinstance(duration_ms, int) or duration_ms < 1:
        raise ValueError(f"`duration_ms` must be a positive int (milliseconds per frame), got {duration_ms!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    first, *rest = (Image.fromarray(frame) for frame in frames)
    first.save(path, format="GIF", save_all=True, append_images=rest, duration=duration_ms, loop=0)
    return path
