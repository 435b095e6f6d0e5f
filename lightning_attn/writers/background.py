"""Writing off the training loop: a writer's stores run on a worker thread, in order, a pass at a time.

A pass's records are prepared as the calls come, on the caller's thread (:meth:`AttentionWriter.prepare`:
encoding the grids), while the training loop waits for the pass anyway; at :meth:`~BackgroundWriter.flush` they are
handed to a thread of its own, which stores them (TensorBoard's event queue, a file, a tracking server's request),
and the loop waits up to ``settle`` seconds for that. A local destination is done by then, so nothing of a pass is
left to run beside the training steps that follow: on a machine whose training uses every core, whatever a writer
thread does beside them (its CPU, and each handover of the GIL) slows those steps, even at the lowest scheduling
priority (docs/performance.md, the steps after a pass). A slow destination goes on storing in the background, and
the loop goes on training. Only
writers that say they are :attr:`~lightning_attn.writers.AttentionWriter.thread_safe` are wrapped (TensorBoard,
MLflow, files without a logger); the others keep writing on the caller's thread.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .base import Animation, AttentionWriter, ChartLayout, WriteError

__all__ = ["BackgroundWriter", "in_background"]

_STOP = None

#: Seconds :meth:`BackgroundWriter.flush` waits for a pass to be stored. A pass at the defaults takes a few
#: milliseconds to store in a local TensorBoard event file once prepared (ViT-S/16, 8 probes); a remote tracking
#: server can take seconds, and goes on in the background.
DEFAULT_SETTLE = 0.25


class BackgroundWriter(AttentionWriter):
    """Runs ``writer``'s calls on a worker thread, in the order they were made.

    Each call is prepared at once (``writer.prepare``: the CPU work, on the caller's thread); the prepared calls
    of a pass are handed over at :meth:`flush` (the end of a pass), which then waits up to ``settle`` seconds for
    the worker to store them. At most ``max_pending`` passes wait for the worker, after which :meth:`flush` blocks
    until one is written, so memory stays bounded however slow the destination. A call that fails does not stop
    the ones after it; its error is raised on the caller's thread at the next :meth:`flush` or :meth:`drain` (any
    ``BaseException`` of the writer's, ``SystemExit`` included: the worker goes on). :meth:`drain` waits until
    everything handed over is written (the callback drains at the end of fit and before each checkpoint, so nothing
    is lost); :meth:`close` drains and stops the thread. Both take a ``timeout``: past it they stop waiting, drop
    what is left and raise a :class:`~lightning_attn.writers.WriteError` saying what was not written (the callback
    bounds its waits on an exception and at teardown, so a hanging destination cannot keep a run from ending).

    Args:
        writer: the writer whose calls run on the thread.
        max_pending: passes that may wait for the worker before :meth:`flush` blocks.
        settle: seconds :meth:`flush` waits for the pass it hands over to be stored (0: none); past it, storing
            goes on beside training and nothing is dropped.

    Example::

        >>> import tempfile
        >>> from pathlib import Path
        >>> from lightning_attn.writers import PNGWriter
        >>> with tempfile.TemporaryDirectory() as d:
        ...     writer = BackgroundWriter(PNGWriter(d))
        ...     writer.add_image("attention/raw", np.zeros((4, 4, 3), np.uint8), step=1)  # encoded now
        ...     writer.flush()  # handed to the worker, which writes the file
        ...     writer.close()
        ...     [p.name for p in Path(d).iterdir()]
        ['attention__raw_step0000001.png']
    """

    thread_safe = True

    def __init__(self, writer: AttentionWriter, max_pending: int = 2, settle: float = DEFAULT_SETTLE) -> None:
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"`max_pending` must be an int >= 1 (passes waiting to be written), got {max_pending!r}")
        if isinstance(settle, bool) or not isinstance(settle, (int, float)) or not settle >= 0:
            raise ValueError(f"`settle` must be a number of seconds >= 0, got {settle!r}")
        self.writer = writer
        self.max_pending = max_pending
        self.settle = float(settle)
        self._calls: list[tuple[str, Callable[[], Any], int | None]] = []
        # created with the thread, so a writer that never wrote pickles (ddp_spawn sends callbacks to workers)
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._errors: list[tuple[str, int | None, BaseException]] = []
        self._abandoned = False  # set when a bounded wait gave up: the worker drops what is left and stops
        self._current: tuple[str, int | None] | None = None  # the call the worker is in, for the messages

    # ------------------------------------------------------------------ the caller's side

    def _defer(self, method: str, *args: Any, step: int | None = None) -> None:
        try:
            self._calls.append((method, self.writer.prepare(method, *args), step))
        except BaseException as err:  # noqa: BLE001 - as a failed store: raised at this pass's flush
            self._errors.append((method, step, err))

    def add_image(self, tag: str, image: np.ndarray, step: int) -> None:
        self._defer("add_image", tag, image, step, step=step)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._defer("add_scalar", tag, value, step, step=step)

    def add_scalars(self, metrics: Mapping[str, float], step: int) -> None:
        self._defer("add_scalars", dict(metrics), step, step=step)  # a copy: the caller may go on changing its dict

    def add_grid(self, tag: str, image: np.ndarray, step: int, rows: Sequence[str]) -> None:
        self._defer("add_grid", tag, image, step, list(rows), step=step)

    def add_animation(self, tag: str, frames: Animation, step: int, duration_ms: int = 500) -> None:
        self._defer("add_animation", tag, frames, step, duration_ms, step=step)

    def add_layout(self, layout: ChartLayout) -> None:
        self._defer("add_layout", layout)

    def add_text(self, tag: str, text: str, step: int) -> None:
        self._defer("add_text", tag, text, step, step=step)

    def add_html(self, tag: str, page: str, step: int) -> None:
        self._defer("add_html", tag, page, step, step=step)

    def flush(self, timeout: float | None = None) -> None:
        """Hand this pass's calls (and the writer's own flush) to the worker, wait up to ``settle`` seconds for
        them to be stored, and raise an error of this pass's or an earlier one's.

        Blocks while ``max_pending`` passes wait, ``timeout`` seconds at most (None: no limit)."""
        self._defer("flush")
        calls, self._calls = self._calls, []
        if self._thread is None or not self._thread.is_alive():
            self._queue = queue.Queue(maxsize=self.max_pending)
            self._abandoned = False
            self._thread = threading.Thread(target=self._work, name="lightning-attn-writer", daemon=True)
            self._thread.start()
        assert self._queue is not None
        try:
            self._queue.put(calls, timeout=timeout)  # blocks while `max_pending` passes wait
        except queue.Full:
            raise self._gave_up(timeout, [calls]) from None
        if self.settle > 0:
            self._wait_stored(time.monotonic() + self.settle)
        self._raise_errors()

    def _wait_stored(self, deadline: float | None) -> bool:
        """Wait until every call handed over is stored, or until ``deadline`` (``time.monotonic()``; None: no
        limit); whether they were."""
        work_queue = self._queue
        if work_queue is None:
            return True
        with work_queue.all_tasks_done:  # Queue.join, with a time limit
            while work_queue.unfinished_tasks:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                work_queue.all_tasks_done.wait(left)
        return True

    def drain(self, timeout: float | None = None) -> None:
        """Wait until every call handed over is written, ``timeout`` seconds at most (None: no limit); raise the
        first error one met, or a :class:`~lightning_attn.writers.WriteError` naming what was not written."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._calls:
            self.flush(timeout)
        if not self._wait_stored(deadline):
            assert self._queue is not None
            raise self._gave_up(timeout, list(self._queue.queue))
        self._raise_errors()

    def close(self, timeout: float | None = None) -> None:
        """Drain (``timeout`` seconds at most), then stop the worker thread (a later :meth:`flush` starts a new
        one). A thread stuck inside a call of the writer cannot be stopped: it ends when that call returns."""
        try:
            self.drain(timeout)
        finally:
            thread, work_queue = self._thread, self._queue
            self._thread = self._queue = None
            if thread is not None and work_queue is not None:
                self._abandoned = True  # anything still queued is dropped, not written after close
                try:
                    work_queue.put_nowait(_STOP)
                except queue.Full:  # a stuck worker: it sees `_abandoned` once its call returns
                    pass
                thread.join(timeout)

    def _gave_up(self, timeout: float | None, waiting: list[Any]) -> WriteError:
        """Stop waiting: drop what is queued, and say what was not written."""
        self._abandoned = True
        name, current = type(self.writer).__name__, self._current
        passes = [calls for calls in waiting if calls is not _STOP]
        steps = {s for calls in passes for _, _, s in calls if s is not None}
        if current is not None and current[1] is not None:
            steps.add(current[1])
        where = f" (still in {name}.{current[0]})" if current is not None else ""
        return WriteError(
            f"{name} did not finish writing within {timeout:g} s{where}: the passes at steps {sorted(steps)} are "
            "not (completely) written",
            step=min(steps, default=None),
        )

    def _raise_errors(self) -> None:
        if self._errors:
            (method, step, err), self._errors = self._errors[0], []
            at = "" if step is None else f" (step {step})"
            raise WriteError(
                f"{type(self.writer).__name__}.{method} failed: {type(err).__name__}: {err}{at}", step=step
            ) from err

    # ------------------------------------------------------------------ the worker's side

    def _work(self) -> None:
        _yield_to_training()
        work_queue = self._queue
        assert work_queue is not None
        while True:
            calls = work_queue.get()
            try:
                if calls is _STOP or self._abandoned:
                    return
                for method, call, step in calls:
                    if self._abandoned:
                        break
                    self._current = (method, step)
                    try:
                        call()
                    except BaseException as err:  # noqa: BLE001 - SystemExit too: raised on the caller's thread at its next flush
                        self._errors.append((method, step, err))
                    finally:
                        self._current = None
            finally:
                work_queue.task_done()


#: The writer thread's nice value: the scheduler then gives the cores to the training threads first (on a
#: 2-core machine whose training uses both, writing a pass otherwise slowed the steps beside it).
WRITER_NICENESS = 19


def _yield_to_training() -> None:
    """Lower the calling thread's scheduling priority (Linux: a thread is a task of its own); elsewhere nothing."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICENESS)
    except (AttributeError, OSError):  # no setpriority (Windows), or not allowed: write at normal priority
        pass


def in_background(writers: Iterable[AttentionWriter]) -> list[AttentionWriter]:
    """Each thread-safe writer wrapped in a :class:`BackgroundWriter`; the others as they are."""
    return [w if isinstance(w, BackgroundWriter) or not w.thread_safe else BackgroundWriter(w) for w in writers]
