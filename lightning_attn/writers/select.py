"""Pick a writer for each logger by what the logger can do, and fan every record out to all of them."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from lightning.pytorch.utilities import rank_zero_warn

from .background import BackgroundWriter
from .base import Animation, AttentionWriter, ChartLayout, WriteError
from .files import PNGWriter

__all__ = ["WriterSet", "writers_for"]


class _LoggerWriter(Protocol):
    @staticmethod
    def accepts(logger: Any) -> bool: ...

    @classmethod
    def for_logger(cls, logger: Any, directory: Path) -> AttentionWriter: ...


class WriterSet(AttentionWriter):
    """Sends every record to each of ``writers``. A writer that fails does not keep the others from writing: its
    error is kept, every other record still goes to every writer, and :meth:`flush` (the end of a pass) raises the
    first error kept, after flushing every writer (the callback's ``on_error`` decides what happens then).

    Example::

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        ...     both = WriterSet([PNGWriter(a), PNGWriter(b)])
        ...     both.add_image("attention/raw", np.zeros((4, 4, 3), np.uint8), step=1)
        ...     [p.name for d in (a, b) for p in Path(d).iterdir()]
        ['attention__raw_step0000001.png', 'attention__raw_step0000001.png']
    """

    def __init__(self, writers: Iterable[AttentionWriter]) -> None:
        self.writers = list(writers)
        self._errors: list[tuple[AttentionWriter, str, Exception]] = []

    def _each(self, method: str, *args: Any, **kwargs: Any) -> None:
        for writer in self.writers:
            try:
                getattr(writer, method)(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - raised again at flush, after the others had their turn
                self._errors.append((writer, method, err))

    def add_image(self, tag: str, image: np.ndarray, step: int) -> None:
        self._each("add_image", tag, image, step)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._each("add_scalar", tag, value, step)

    def add_scalars(self, metrics: Mapping[str, float], step: int) -> None:
        self._each("add_scalars", metrics, step)

    def add_grid(self, tag: str, image: np.ndarray, step: int, rows: Sequence[str]) -> None:
        self._each("add_grid", tag, image, step, rows)

    def add_animation(self, tag: str, frames: Animation, step: int, duration_ms: int = 500) -> None:
        self._each("add_animation", tag, frames, step, duration_ms)

    def add_layout(self, layout: ChartLayout) -> None:
        self._each("add_layout", layout)

    def add_text(self, tag: str, text: str, step: int) -> None:
        self._each("add_text", tag, text, step)

    def add_html(self, tag: str, page: str, step: int) -> None:
        self._each("add_html", tag, page, step)

    def flush(self) -> None:
        self._each("flush")
        self._raise_errors()

    def drain(self, timeout: float | None = None) -> None:
        """Drain every writer; writers on a thread wait ``timeout`` seconds at most in all (None: no limit)."""
        self._bounded("drain", timeout)

    def close(self, timeout: float | None = None) -> None:
        """Close every writer; writers on a thread wait ``timeout`` seconds at most in all (None: no limit)."""
        self._bounded("close", timeout)

    def _bounded(self, method: str, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        for writer in self.writers:
            try:
                if isinstance(writer, (BackgroundWriter, WriterSet)):  # the only waits: on a writer thread
                    left = None if deadline is None else max(0.0, deadline - time.monotonic())
                    getattr(writer, method)(timeout=left)
                else:
                    getattr(writer, method)()
            except Exception as err:  # noqa: BLE001 - raised below, after the others had their turn
                self._errors.append((writer, method, err))
        self._raise_errors()

    def _raise_errors(self) -> None:
        if self._errors:
            (writer, method, err), self._errors = self._errors[0], []
            if isinstance(err, WriteError):  # already says which writer and which pass
                raise err
            raise WriteError(f"{type(writer).__name__}.{method} failed: {type(err).__name__}: {err}") from err


def writers_for(loggers: Sequence[Any], directory: str | Path, registry: Sequence[_LoggerWriter] = ()) -> WriterSet:
    """One writer per logger: the first class in ``registry`` whose ``accepts(logger)`` is true, else PNG/GIF
    files under the logger's ``log_dir`` (:class:`PNGWriter`, scalars to its ``log_metrics``). Without any
    logger, PNG files and ``scalars.csv`` under ``directory/attention``, with a warning.

    Loggers are recognised by what they expose, not by class, so the standalone ``pytorch_lightning`` package's
    loggers and look-alikes are handled the same way.

    Example::

        >>> import tempfile
        >>> from lightning.pytorch.loggers import CSVLogger
        >>> with tempfile.TemporaryDirectory() as d:
        ...     [type(w).__name__ for w in writers_for([CSVLogger(d)], d).writers]
        ['PNGWriter']
    """
    directory = Path(directory)
    if not loggers:
        target = directory / "attention"
        rank_zero_warn(
            f"AttentionMonitor found no logger in `trainer.loggers`: writing PNG grids and scalars.csv to {target}. "
            "Add a logger (TensorBoardLogger, WandbLogger, MLFlowLogger, CSVLogger) to see them there.",
            category=RuntimeWarning,
        )
        return WriterSet([PNGWriter(target)])
    chosen = []
    for logger in loggers:
        kind = next((cls for cls in registry if cls.accepts(logger)), PNGWriter)
        chosen.append(kind.for_logger(logger, directory))
    return WriterSet(chosen)
