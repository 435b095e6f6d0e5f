"""Where rendered grids and scalars go: small adapters between the callback and a logger or a folder.

The callback talks only to :class:`AttentionWriter`; supporting another logger means writing its three methods.
"""

from __future__ import annotations

import csv
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["AttentionWriter", "PNGWriter", "TensorBoardWriter"]


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
