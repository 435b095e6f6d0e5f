"""PNG and GIF files in a folder: the writer for loggers that take no images (CSV and any other) and for none.

Scalars go to the logger's own ``log_metrics`` (a CSVLogger's ``metrics.csv``), or, without a logger, to
``scalars.csv`` beside the images.
"""

from __future__ import annotations

import csv
import functools
import io
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..animation import GifStream, gif_stream
from .base import Animation, LoggerWriter, check_frames, check_image

__all__ = ["IMAGE_FORMATS", "PNGWriter", "encode_image", "gif_bytes", "save_gif"]

IMAGE_FORMATS = ("png", "jpeg")


def file_name(tag: str) -> str:
    """A tag as a file name: ``/`` becomes ``__``.

    Example::

        >>> file_name("attention/heads/layer_01")
        'attention__heads__layer_01'
    """
    return tag.replace("/", "__")


class PNGWriter(LoggerWriter):
    """Writes each image to ``directory/<tag>_step<step:07d>.png`` and each animation to ``directory/<tag>.gif``
    (``/`` in tags becomes ``__``). Scalars go to ``logger.log_metrics`` when a ``logger`` is given, else they
    are appended to ``directory/scalars.csv`` (columns ``step,tag,value``). The directory is created on first
    write.

    Args:
        directory: folder of the files.
        logger: a Lightning logger whose ``log_metrics`` takes the scalars (and whose ``save`` is called on
            :meth:`flush`, which writes a CSVLogger's ``metrics.csv``).

    Example::

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     writer = PNGWriter(d)
        ...     writer.add_image("attention/raw", np.zeros((8, 12, 3), np.uint8), step=3)
        ...     writer.add_scalar("attention_entropy/raw/layer_00", 0.5, step=3)
        ...     writer.add_animation("attention/rollout_evolution/probe_00", [np.zeros((8, 12, 3), np.uint8)], step=3)
        ...     sorted(p.name for p in Path(d).iterdir())
        ['attention__raw_step0000003.png', 'attention__rollout_evolution__probe_00.gif', 'scalars.csv']
    """

    @property
    def thread_safe(self) -> bool:  # type: ignore[override]
        # files of its own only: a CSVLogger's rows are rewritten by its `save`, which the training loop calls too
        return self.logger is None

    def __init__(self, directory: str | os.PathLike[str], logger: Any | None = None) -> None:
        self.directory = Path(directory)
        self.logger = logger

    @classmethod
    def for_logger(cls, logger: Any, directory: Path) -> PNGWriter:
        """Files under the logger's own ``log_dir`` (else ``save_dir``, else ``directory``), in ``attention/``."""
        root = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None) or directory
        return cls(Path(root) / "attention", logger=logger)

    def image_path(self, tag: str, step: int) -> Path:
        """The file :meth:`add_image` writes for ``tag`` at ``step``."""
        return self.directory / f"{file_name(tag)}_step{step:07d}.png"

    def animation_path(self, tag: str) -> Path:
        """The file :meth:`add_animation` writes for ``tag``."""
        return self.directory / f"{file_name(tag)}.gif"

    def add_image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.prepare("add_image", tag, image, step)()

    def prepare(self, method: str, *args: Any) -> Callable[[], None]:
        """Images and animations are encoded now (PNG, GIF); the call returned writes the bytes to their file."""
        if method in ("add_image", "add_grid"):
            tag, image, step = args[:3]
            return functools.partial(write_file, self.image_path(tag, step), encode_image(image, "png"))
        if method == "add_animation":
            tag, frames, _, *duration_ms = args
            return functools.partial(write_file, self.animation_path(tag), gif_bytes(frames, *duration_ms))
        return super().prepare(method, *args)

    def _add_scalars_without_logger(self, metrics: Mapping[str, float], step: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / "scalars.csv"
        new = not path.exists()
        with path.open("a", newline="") as f:
            rows = csv.writer(f)
            if new:
                rows.writerow(["step", "tag", "value"])
            rows.writerows([step, tag, float(value)] for tag, value in metrics.items())

    def add_text(self, tag: str, text: str, step: int) -> None:
        """Appended to ``directory/alerts.txt``: one line ``step<TAB>tag<TAB>text`` per message."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with (self.directory / "alerts.txt").open("a") as f:
            f.write(f"{step}\t{tag}\t{' '.join(text.split())}\n")

    def add_animation(self, tag: str, frames: Animation, step: int, duration_ms: int = 500) -> None:
        self.prepare("add_animation", tag, frames, step, duration_ms)()

    def add_html(self, tag: str, page: str, step: int) -> None:
        """Written to ``directory/<tag>.html``."""
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / f"{file_name(tag)}.html").write_text(page, encoding="utf-8")

    def flush(self) -> None:
        save = getattr(self.logger, "save", None)
        if callable(save):
            save()  # a CSVLogger keeps rows in memory until then


def encode_image(image: np.ndarray, image_format: str = "png", quality: int = 90) -> bytes:
    """Encode an (H, W, 3) uint8 image as PNG (lossless) or JPEG (``quality`` 1-95, 4:2:0 chroma), in memory.

    Example::

        >>> data = encode_image(np.zeros((8, 8, 3), np.uint8), "jpeg")
        >>> data[:3] == b"\\xff\\xd8\\xff", Image.open(io.BytesIO(data)).size
        (True, (8, 8))
    """
    check_image(image)
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"`image_format` must be one of {IMAGE_FORMATS}, got {image_format!r}")
    out = io.BytesIO()
    if image_format == "jpeg":
        Image.fromarray(image).save(out, format="JPEG", quality=quality)
    else:
        Image.fromarray(image).save(out, format="PNG")  # Pillow's default compression, as add_image uses
    return out.getvalue()


def gif_bytes(frames: Animation, duration_ms: int = 500) -> bytes:
    """(H, W, 3) uint8 frames encoded as a looping animated GIF, in memory (see :func:`save_gif`).

    Example::

        >>> gif_bytes([np.zeros((4, 6, 3), np.uint8)] * 2)[:6]
        b'GIF89a'
    """
    if isinstance(duration_ms, bool) or not isinstance(duration_ms, int) or duration_ms < 1:
        raise ValueError(f"`duration_ms` must be a positive int (milliseconds per frame), got {duration_ms!r}")
    stream = frames if isinstance(frames, GifStream) else gif_stream(check_frames(frames))
    return stream.to_bytes(duration_ms)


def save_gif(frames: Animation, path: str | os.PathLike[str], duration_ms: int = 500) -> Path:
    """Write (H, W, 3) uint8 frames as an animated GIF that loops forever; returns the path written.

    The parent directory is created if needed and the file is GIF whatever its suffix. GIF holds at most 256
    colours per frame, so each frame is quantised to its own palette (:class:`~lightning_attn.animation.GifStream`):
    colours come back close, not exact. Every frame is kept, repeated ones included.

    Args:
        frames: images of one size, e.g. :func:`~lightning_attn.render.filmstrip` rows or grids at each step, or
            a :class:`~lightning_attn.animation.GifStream` holding them.
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
    data = gif_bytes(frames, duration_ms)  # checks everything before touching the disk
    path = Path(path)
    write_file(path, data)
    return path


def write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``, its parent directories created first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
