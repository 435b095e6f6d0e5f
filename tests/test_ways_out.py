"""Every way out of a run ends it and leaves nothing behind: Ctrl-C with a hanging writer, failing fits, a writer
that raises ``SystemExit``. Real Trainer fits with real writers that hang or raise."""

from __future__ import annotations

import signal
import threading

import pytest
import torch

from lightning_attn import AttentionMonitor
from lightning_attn.writers import AttentionWriter

import lit


def _probes(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, lit.IMG, lit.IMG, generator=torch.Generator().manual_seed(7))


def _writer_threads(before: frozenset[threading.Thread] = frozenset()) -> list[threading.Thread]:
    """The writer threads alive now, other than those in ``before`` (another test's, still winding down)."""
    return [t for t in threading.enumerate() if t.name == "lightning-attn-writer" and t not in before]


class _Recorder(AttentionWriter):
    """A thread-safe writer (so it runs on the writer thread) that records the steps of its images."""

    thread_safe = True

    def __init__(self) -> None:
        self.steps: list[int] = []

    def add_image(self, tag, image, step):
        self.steps.append(step)

    def add_scalar(self, tag, value, step):
        pass


class _Hanging(_Recorder):
    """From the second pass on, a call that does not return: an unreachable MLflow server."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()

    def add_image(self, tag, image, step):
        if step > 0:
            self.entered.set()
            self.release.wait(30)
        super().add_image(tag, image, step)


class _Exits(_Recorder):
    """Raises SystemExit on the baseline's first image (any BaseException of a writer's)."""

    def add_image(self, tag, image, step):
        if step == 0 and not self.steps:
            self.steps.append(-1)
            raise SystemExit(3)
        super().add_image(tag, image, step)


class _FailsAt(lit.LitViT):
    def __init__(self, step: int, error: type[BaseException]) -> None:
        super().__init__()
        self.fail_step, self.error = step, error

    def training_step(self, batch, batch_idx):
        if self.global_step == self.fail_step:
            raise self.error("stop here")
        return super().training_step(batch, batch_idx)


def test_ctrl_c_ends_a_run_whose_writer_hangs_and_says_what_was_not_written(tmp_path):
    before = frozenset(_writer_threads())
    writer = _Hanging()
    monitor = AttentionMonitor(_probes(), tile_size=16, writer=writer, write_timeout=0.5)
    trainer = lit.trainer(tmp_path, [monitor], max_epochs=3)
    handler = signal.getsignal(signal.SIGINT)  # Lightning ignores SIGINT while it shuts down after Ctrl-C
    try:
        with (
            pytest.raises(SystemExit),  # Lightning's answer to a KeyboardInterrupt
            pytest.warns(
                RuntimeWarning,
                match=r"could not write everything \(exception\): _Hanging did not finish writing within 0\.5 s "
                r"\(still in _Hanging\.add_image\): the passes at steps \[4\]",
            ),
        ):
            trainer.fit(_FailsAt(6, KeyboardInterrupt), *lit.loaders())
        # fit returned while the writer was still inside its call: the wait was bounded
        assert writer.entered.is_set() and not writer.release.is_set() and 4 not in writer.steps
    finally:
        signal.signal(signal.SIGINT, handler)
        writer.release.set()
    for thread in _writer_threads(before):
        thread.join(5)
    assert not _writer_threads(before), "the writer thread ends once its call returns"
    assert writer.steps.count(4) == 1, "the abandoned pass ends with the call it was in"


def test_no_writer_thread_outlives_a_failing_fit(tmp_path):
    before = frozenset(_writer_threads())
    for attempt in range(2):
        writer = _Recorder()
        monitor = AttentionMonitor(_probes(), tile_size=16, writer=writer, head_layers=())
        trainer = lit.trainer(tmp_path / str(attempt), [monitor], max_epochs=2)
        with pytest.raises(KeyError, match="stop here"):
            trainer.fit(_FailsAt(5, KeyError), *lit.loaders())
        assert sorted(set(writer.steps)) == [0, 4], "the passes before the failure are written"
        assert not _writer_threads(before), (
            f"fit {attempt}: Lightning skips teardown on failure; on_exception must stop it"
        )


def test_a_writer_raising_system_exit_is_reported_and_the_writer_thread_goes_on(tmp_path):
    writer = _Exits()
    monitor = AttentionMonitor(_probes(), tile_size=16, writer=writer, head_layers=())
    trainer = lit.trainer(tmp_path, [monitor], max_epochs=2)
    with pytest.warns(
        RuntimeWarning, match=r"could not write the pass at step 0: _Exits\.add_grid failed: SystemExit: 3"
    ):
        trainer.fit(lit.LitViT(), *lit.loaders())
    assert trainer.global_step == 8
    assert sorted(set(writer.steps) - {-1}) == [0, 4, 8]  # the calls after the failing one, and every later pass
