"""Writing off the training loop: another writer's calls run on a worker thread, in order, a pass at a time.

Encoding the grids (JPEG/PNG) and writing TensorBoard events (whose own queue blocks once ten events wait) take
most of a pass's writing time but need nothing from the training loop, so a :class:`BackgroundWriter` collects a
pass's calls and hands them, at :meth:`~BackgroundWriter.flush`, to a thread of its own. Only writers that say
they are :attr:`~lightning_attn.writers.AttentionWriter.thread_safe` are wrapped (TensorBoard, MLflow, files
without a logger); the others keep writing on the caller's thread.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .base import Animation, AttentionWriter, ChartLayout

__all__ = ["BackgroundWriter", "in_background"]

_STOP = None


class BackgroundWriter(AttentionWriter):
    """Runs ``writer``'s calls on a worker thread, in the order they were made.

    The calls of a pass are collected and handed over at :meth:`flush` (the end of a pass); at most
    ``max_pending`` passes wait for the worker, after which :meth:`flush` blocks until one is written, so memory
    stays bounded however slow the destination. A call that fails does not stop the ones after it; its error is
    raised on the caller's thread at the next :meth:`flush` or :meth:`drain`. :meth:`drain` waits until everything
    handed over is written (the callback drains at the end of fit, before each checkpoint, on an exception and at
    teardown, so nothing is lost); :meth:`close` drains and stops the thread.

    Example::

        >>> import tempfile
        >>> from pathlib import Path
        >>> from lightning_attn.writers import PNGWriter
        >>> with tempfile.TemporaryDirectory() as d:
        ...     writer = BackgroundWriter(PNGWriter(d))
        ...     writer.add_image("attention/raw", np.zeros((4, 4, 3), np.uint8), step=1)
        ...     writer.flush()  # handed to the worker
        ...     writer.close()  # written
        ...     [p.name for p in Path(d).iterdir()]
        ['attention__raw_step0000001.png']
    """

    thread_safe = True

    def __init__(self, writer: AttentionWriter, max_pending: int = 2) -> None:
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"`max_pending` must be an int >= 1 (passes waiting to be written), got {max_pending!r}")
        self.writer = writer
        self.max_pending = max_pending
        self._calls: list[tuple[str, Callable[[], Any]]] = []
        # created with the thread, so a writer that never wrote pickles (ddp_spawn sends callbacks to workers)
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._errors: list[tuple[str, BaseException]] = []

    # ------------------------------------------------------------------ the caller's side

    def _defer(self, method: str, *args: Any) -> None:
        self._calls.append((method, functools.partial(getattr(self.writer, method), *args)))

    def add_image(self, tag: str, image: np.ndarray, step: int) -> None:
        self._defer("add_image", tag, image, step)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._defer("add_scalar", tag, value, step)

    def add_scalars(self, metrics: Mapping[str, float], step: int) -> None:
        self._defer("add_scalars", dict(metrics), step)  # a copy: the caller may go on changing its dict

    def add_grid(self, tag: str, image: np.ndarray, step: int, rows: Sequence[str]) -> None:
        self._defer("add_grid", tag, image, step, list(rows))

    def add_animation(self, tag: str, frames: Animation, step: int, duration_ms: int = 500) -> None:
        self._defer("add_animation", tag, frames, step, duration_ms)

    def add_layout(self, layout: ChartLayout) -> None:
        self._defer("add_layout", layout)

    def add_text(self, tag: str, text: str, step: int) -> None:
        self._defer("add_text", tag, text, step)

    def add_html(self, tag: str, page: str, step: int) -> None:
        self._defer("add_html", tag, page, step)

    def flush(self) -> None:
        """Hand this pass's calls (and the writer's own flush) to the worker; raise an earlier pass's error."""
        self._defer("flush")
        calls, self._calls = self._calls, []
        if self._thread is None or not self._thread.is_alive():
            self._queue = queue.Queue(maxsize=self.max_pending)
            self._thread = threading.Thread(target=self._work, name="lightning-attn-writer", daemon=True)
            self._thread.start()
        assert self._queue is not None
        self._queue.put(calls)  # blocks while `max_pending` passes wait
        self._raise_errors()

    def drain(self) -> None:
        """Wait until every call handed over is written; raise the first error one met."""
        if self._calls:
            self.flush()
        if self._queue is not None:
            self._queue.join()
        self._raise_errors()

    def close(self) -> None:
        """Drain, then stop the worker thread (a later :meth:`flush` starts a new one)."""
        try:
            self.drain()
        finally:
            if self._thread is not None and self._queue is not None:
                self._queue.put(_STOP)
                self._thread.join()
            self._thread = self._queue = None

    def _raise_errors(self) -> None:
        if self._errors:
            (method, err), self._errors = self._errors[0], []
            raise RuntimeError(f"{type(self.writer).__name__}.{method} failed: {type(err).__name__}: {err}") from err

    # ------------------------------------------------------------------ the worker's side

    def _work(self) -> None:
        work_queue = self._queue
        assert work_queue is not None
        while True:
            calls = work_queue.get()
            try:
                if calls is _STOP:
                    return
                for method, call in calls:
                    try:
                        call()
                    except Exception as err:  # noqa: BLE001 - raised on the caller's thread at its next flush
                        self._errors.append((method, err))
            finally:
                work_queue.task_done()


def in_background(writers: Iterable[AttentionWriter]) -> list[AttentionWriter]:
    """Each thread-safe writer wrapped in a :class:`BackgroundWriter`; the others as they are."""
    return [w if isinstance(w, BackgroundWriter) or not w.thread_safe else BackgroundWriter(w) for w in writers]
