"""TensorBoard: images (PNG or JPEG) and animated GIFs in the event file, scalars, and a custom-scalars layout."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .base import Animation, ChartLayout, LoggerWriter, animation_size, check_image
from .files import IMAGE_FORMATS, encode_image, file_name, gif_bytes, write_file

__all__ = ["IMAGE_FORMATS", "TensorBoardWriter", "encode_image", "fast_event_checksums"]

# One merged layout per SummaryWriter: TensorBoard shows only the last layout written to a run, so monitors
# sharing a logger each add their charts to it and the whole is written again.
_LAYOUTS: weakref.WeakKeyDictionary[Any, dict[str, dict[str, list[str]]]] = weakref.WeakKeyDictionary()


def _masked_crc32c(data: bytes) -> int:
    """TensorBoard's masked CRC-32C of an event record, computed by google-crc32c's C code: the same value as
    ``tensorboard.compat.tensorflow_stub.pywrap_tensorflow.masked_crc32c``."""
    import google_crc32c

    crc = google_crc32c.value(bytes(data))
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def fast_event_checksums() -> bool:
    """Have TensorBoard's event files checksummed in C. Without TensorFlow, TensorBoard's record writer computes
    each record's CRC-32C in pure Python: about 0.13-0.16 s per MiB on the writer's thread, holding the GIL that the
    training loop needs (measured: the optimiser step of a tiny model took 0.18 s while a pass was written). This
    points the record writer's checksum at google-crc32c (the same values: the event files are byte for byte those
    TensorBoard writes) -- once per process, and only where TensorBoard's own pure-Python function is in place.
    Returns whether the C checksum is in use.

    Example::

        >>> fast_event_checksums()
        True
    """
    try:
        import google_crc32c
        from tensorboard.summary.writer import record_writer
    except ImportError:  # an older install without the dependency: TensorBoard's own checksum stays
        return False
    current = record_writer.masked_crc32c
    if current is _masked_crc32c:
        return True
    if getattr(current, "__module__", "") != "tensorboard.compat.tensorflow_stub.pywrap_tensorflow":
        return False  # someone else's (TensorFlow's C one, say): left alone
    if google_crc32c.implementation != "c":
        return False  # its pure-Python fallback would be no faster
    record_writer.masked_crc32c = _masked_crc32c
    return True


class TensorBoardWriter(LoggerWriter):
    """Writes to a ``torch.utils.tensorboard.SummaryWriter``, e.g. Lightning's ``TensorBoardLogger.experiment``.

    Images are stored encoded as ``image_format`` (TensorBoard shows whatever a browser decodes); animations as
    animated GIFs in the images tab (and, with a ``directory``, as GIF files there too); :meth:`add_layout`
    registers a custom-scalars layout (one chart per metric, one line per layer). Scalars go to
    ``logger.log_metrics`` when a ``logger`` is given, else to ``experiment.add_scalar``.

    Args:
        experiment: the SummaryWriter.
        logger: the Lightning logger that owns it (its ``log_metrics`` takes the scalars).
        image_format: ``"jpeg"`` (default) or ``"png"``. JPEG at quality 90 keeps a pass at the defaults (96-pixel
            tiles) at about a quarter of PNG's bytes (``benchmarks/bench_encoding.py``); PNG is lossless.
        quality: JPEG quality, 1-95.
        directory: where animations are also written as GIF files; None: event file only.

    Example::

        >>> import tempfile
        >>> from torch.utils.tensorboard import SummaryWriter
        >>> with tempfile.TemporaryDirectory() as d:
        ...     writer = TensorBoardWriter(SummaryWriter(d), image_format="jpeg")
        ...     writer.add_image("attention/raw", np.zeros((8, 12, 3), np.uint8), step=3)
        ...     writer.add_scalar("attention_entropy/raw/layer_00", 0.5, step=3)
        ...     writer.flush()
        ...     writer.experiment.close()
    """

    # SummaryWriter hands events to its own writer thread through a queue, and TensorBoardLogger.log_metrics is
    # add_scalar underneath: both take calls from any thread
    thread_safe = True

    def __init__(
        self,
        experiment: Any,
        logger: Any | None = None,
        image_format: str = "jpeg",
        quality: int = 90,
        directory: str | Path | None = None,
    ) -> None:
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"`image_format` must be one of {IMAGE_FORMATS}, got {image_format!r}")
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 95:
            raise ValueError(f"`quality` must be an int in [1, 95] (JPEG quality), got {quality!r}")
        self.experiment = experiment
        self.logger = logger
        fast_event_checksums()  # before the first record: the writer's thread then spends microseconds per MiB
        self.image_format = image_format
        self.quality = quality
        self.directory = None if directory is None else Path(directory)

    @staticmethod
    def accepts(logger: Any) -> bool:
        """True for any logger whose ``experiment`` is a SummaryWriter-like object (torch's or tensorboardX's)."""
        experiment = getattr(logger, "experiment", None)
        return all(
            callable(getattr(experiment, name, None)) for name in ("add_image", "add_scalar", "add_custom_scalars")
        )

    @classmethod
    def for_logger(cls, logger: Any, directory: Path, image_format: str = "jpeg") -> TensorBoardWriter:
        """The writer for ``logger``; GIF files go under its ``log_dir`` (else ``directory``), in ``attention/``."""
        root = getattr(logger, "log_dir", None) or directory
        return cls(logger.experiment, logger=logger, image_format=image_format, directory=Path(root) / "attention")

    def _add_encoded(self, tag: str, data: bytes, height: int, width: int, step: int) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=data)
        # add_image always re-encodes as PNG; this is what it does underneath, with our bytes.
        self.experiment._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def add_image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.prepare("add_image", tag, image, step)()

    def prepare(self, method: str, *args: Any) -> Callable[[], None]:
        """Images are encoded now (``image_format``) and animations as GIF; the call returned adds the encoded
        bytes to the event file (and writes the GIF file)."""
        if method in ("add_image", "add_grid") and hasattr(self.experiment, "_get_file_writer"):
            tag, image, step = args[:3]
            data = encode_image(image, self.image_format, self.quality)  # PNG: the bytes add_image would make
            return functools.partial(self._add_encoded, tag, data, image.shape[0], image.shape[1], step)
        if method == "add_image":  # a SummaryWriter look-alike without the file writer: its own add_image
            tag, image, step = args
            check_image(image)
            return functools.partial(self.experiment.add_image, tag, image, global_step=step, dataformats="HWC")
        if method == "add_animation":
            tag, frames, step, *duration_ms = args
            height, width = animation_size(frames)
            return functools.partial(self._add_gif, tag, gif_bytes(frames, *duration_ms), height, width, step)
        return super().prepare(method, *args)

    def _add_scalars_without_logger(self, metrics: Mapping[str, float], step: int) -> None:
        for tag, value in metrics.items():
            self.experiment.add_scalar(tag, value, global_step=step)

    def add_animation(self, tag: str, frames: Animation, step: int, duration_ms: int = 500) -> None:
        self.prepare("add_animation", tag, frames, step, duration_ms)()

    def _add_gif(self, tag: str, data: bytes, height: int, width: int, step: int) -> None:
        if hasattr(self.experiment, "_get_file_writer"):
            self._add_encoded(tag, data, height, width, step)  # the images tab plays GIFs
        if self.directory is not None:
            write_file(self.directory / f"{file_name(tag)}.gif", data)

    def add_html(self, tag: str, page: str, step: int) -> None:
        """TensorBoard shows no HTML: with a ``directory``, the page is written there as ``<tag>.html``."""
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            (self.directory / f"{file_name(tag)}.html").write_text(page, encoding="utf-8")

    def add_text(self, tag: str, text: str, step: int) -> None:
        """The TEXT tab: ``SummaryWriter.add_text``."""
        self.experiment.add_text(tag, text, global_step=step)

    def add_layout(self, layout: ChartLayout) -> None:
        merged = _LAYOUTS.setdefault(self.experiment, {})
        changed = False
        for section, charts in layout.items():
            known = merged.setdefault(section, {})
            for chart, regexes in charts.items():
                if known.get(chart) != list(regexes):
                    known[chart] = list(regexes)
                    changed = True
        if changed:  # written again only when a chart is new: in practice on the first two passes
            self.experiment.add_custom_scalars(
                {s: {c: ["Multiline", r] for c, r in charts.items()} for s, charts in merged.items()}
            )

    def flush(self) -> None:
        self.experiment.flush()
