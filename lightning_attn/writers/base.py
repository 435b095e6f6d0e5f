"""The one interface between the callback and a destination: images, grids, scalars, animations, chart layouts."""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ..animation import GifStream

__all__ = [
    "Animation",
    "AttentionWriter",
    "ChartLayout",
    "LoggerWriter",
    "WriteError",
    "animation_size",
    "check_image",
]

#: What :meth:`AttentionWriter.add_animation` takes: the frames, or a :class:`~lightning_attn.animation.GifStream`
#: that already holds them encoded (the callback's, built pass by pass).
Animation = Sequence[np.ndarray] | GifStream

#: ``{section: {chart: [tag regex, ...]}}``: which scalar tags one chart draws as lines (see
#: :func:`lightning_attn.report.scalar_layout`).
ChartLayout = Mapping[str, Mapping[str, Sequence[str]]]


def check_image(image: Any) -> None:
    """Raise a ValueError unless ``image`` is an (H, W, 3) uint8 numpy array.

    Example::

        >>> check_image(np.zeros((2, 3, 3), np.uint8))
        >>> check_image(np.zeros((3, 2, 3), np.float32))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `image` must be an (H, W, 3) uint8 numpy array (see render.make_grid), got ((3, 2, 3), ...)
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shape = (image.shape, image.dtype) if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"`image` must be an (H, W, 3) uint8 numpy array (see render.make_grid), got {shape}")


def animation_size(frames: Animation) -> tuple[int, int]:
    """(height, width) of an animation's frames."""
    if isinstance(frames, GifStream):
        if frames.size is None:
            raise ValueError("`frames` is empty: the GifStream holds no frame")
        return frames.size
    first = check_frames(frames)[0]
    return first.shape[0], first.shape[1]


def check_frames(frames: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The frames of an animation as a list, each checked by :func:`check_image` and all of one size."""
    frames = list(frames)
    if not frames:
        raise ValueError("`frames` is empty: pass at least one (H, W, 3) uint8 image")
    for frame in frames:
        check_image(frame)
    sizes = sorted({frame.shape for frame in frames})
    if len(sizes) > 1:
        raise ValueError(f"`frames` must all have one size, got shapes {sizes}: render them with the same tile size")
    return frames


class WriteError(RuntimeError):
    """A writer could not store records: its call failed, or a bounded wait for it ran out. ``step`` is the pass
    the records belonged to (None when unknown), which may be an earlier pass than the one running now."""

    def __init__(self, message: str, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step


class AttentionWriter(ABC):
    """Destination for the callback's images and scalars.

    A writer must implement :meth:`add_image` and :meth:`add_scalar`; everything else has a default built on
    them (or does nothing where a destination has no place for it), so a custom writer is a few lines. The
    writers for Lightning's loggers override the rest to use what each logger does best.

    Attributes:
        thread_safe: whether the writer may be driven from a thread other than the training loop's while the
            loop goes on logging to the same logger; then the callback writes through a
            :class:`~lightning_attn.writers.background.BackgroundWriter`. False unless a writer says so.
    """

    thread_safe: bool = False

    @abstractmethod
    def add_image(self, tag: str, image: np.ndarray, step: int) -> None:
        """Record an (H, W, 3) uint8 ``image`` under ``tag`` at ``step``."""

    @abstractmethod
    def add_scalar(self, tag: str, value: float, step: int) -> None:
        """Record ``value`` under ``tag`` at ``step``."""

    def add_scalars(self, metrics: Mapping[str, float], step: int) -> None:
        """Record every ``{tag: value}`` of one pass at ``step``; by default one :meth:`add_scalar` each."""
        for tag, value in metrics.items():
            self.add_scalar(tag, value, step)

    def add_grid(self, tag: str, image: np.ndarray, step: int, rows: Sequence[str]) -> None:
        """Record a grid whose rows are the probes named ``rows`` (top to bottom); by default :meth:`add_image`."""
        self.add_image(tag, image, step)

    def add_animation(self, tag: str, frames: Animation, step: int, duration_ms: int = 500) -> None:
        """Record (H, W, 3) uint8 ``frames`` as one looping animation; by default nothing (no place for it)."""

    def add_layout(self, layout: ChartLayout) -> None:
        """Declare which scalar tags share a chart; by default nothing (only TensorBoard draws layouts)."""

    def add_text(self, tag: str, text: str, step: int) -> None:
        """Record a message (an alert) under ``tag`` at ``step``; by default nothing (no place for text)."""

    def add_html(self, tag: str, page: str, step: int) -> None:
        """Record a self-contained HTML page (the interactive report, at the end of fit) under ``tag``; by
        default nothing (no place for it)."""

    def prepare(self, method: str, *args: Any) -> Callable[[], None]:
        """Split the call ``method(*args)`` in two: do now the work that needs only the arguments (encoding an
        image), and return the call that stores the result. By default nothing is done now: the call itself.

        A :class:`~lightning_attn.writers.BackgroundWriter` prepares a pass's calls before its
        :meth:`~lightning_attn.writers.BackgroundWriter.flush` returns, while the training loop waits for the pass
        anyway, and leaves only storing to its thread, which then takes little CPU (and GIL) from the training
        steps beside it. Thread-safe writers must prepare safely on any thread.

        Example::

            >>> import tempfile
            >>> from pathlib import Path
            >>> from lightning_attn.writers import PNGWriter
            >>> with tempfile.TemporaryDirectory() as d:
            ...     store = PNGWriter(d).prepare("add_image", "attention/raw", np.zeros((4, 4, 3), np.uint8), 1)
            ...     before = sorted(Path(d).iterdir())  # encoded, not written yet
            ...     store()
            ...     before, [p.name for p in Path(d).iterdir()]
            ([], ['attention__raw_step0000001.png'])
        """
        return functools.partial(getattr(self, method), *args)

    def flush(self) -> None:
        """Push buffered records to storage; writers that write at once need not override it."""

    def drain(self) -> None:
        """Wait until every record handed over is stored (a writer working on another thread); by default nothing."""

    def close(self) -> None:
        """Drain and release what the writer holds (a thread); it may be used again afterwards. By default nothing."""


class LoggerWriter(AttentionWriter):
    """A writer bound to a Lightning logger: scalars go through ``logger.log_metrics`` (one call per pass, as
    Lightning's own callbacks do), or to :meth:`_add_scalars_without_logger` where ``logger`` is None."""

    logger: Any = None

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.add_scalars({tag: value}, step)

    def add_scalars(self, metrics: Mapping[str, float], step: int) -> None:
        if self.logger is None:
            self._add_scalars_without_logger(metrics, step)
        else:
            self.logger.log_metrics(dict(metrics), step=step)

    def _add_scalars_without_logger(self, metrics: Mapping[str, float], step: int) -> None:
        raise ValueError(f"{type(self).__name__} needs a `logger` to take scalars")
