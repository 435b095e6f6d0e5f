"""What the monitor adds to a small model's training loop, early and late in a long run; prints markdown tables
(run by hand on an otherwise idle machine, not a test).

    python benchmarks/bench_loop.py               # 1000 passes and the step-by-step table, ~10 min on 2 CPU cores
    python benchmarks/bench_loop.py --passes 120  # a shorter run (passes 10 and 100 only)

The setting of the performance issue that asked for it: a tiny timm ViT (2 blocks, 32 px, patch 8, width 48), 8
probes at the monitor's defaults, one training batch and one validation batch per epoch, a TensorBoard logger;
the same run without the monitor alongside. Two tables:

1. Seconds a pass adds to an epoch (mean epoch time with the monitor minus without, over 10 epochs around passes
   10, 100 and 1000) and the bytes each pass adds to the run's event file over the same epochs.
2. Training steps while a pass is being written: with 40 training batches per epoch, every step's time, split
   by whether the monitor's writer thread still had a pass to write when the step began; their median against
   the median step of the same run without the monitor (the target is <= 1.05).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from datetime import date
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from lightning_attn import AttentionMonitor  # noqa: E402
from lightning_attn.writers import BackgroundWriter  # noqa: E402

from lit import LitViT  # noqa: E402 (the tests' tiny module: 2 blocks, 32 px, patch 8)


class _Clock(pl.Callback):
    """Epoch start times, every training step's duration, whether the monitor's writer was busy then, and the
    event file's size at each epoch start."""

    def __init__(self, monitor: AttentionMonitor | None, log_dir: Path) -> None:
        self.monitor, self.log_dir = monitor, log_dir
        self.epochs: list[float] = []
        self.sizes: list[int] = []
        self.steps: list[tuple[float, bool]] = []
        self._start = 0.0
        self._busy = False

    def _writer_busy(self) -> bool:
        writer = getattr(self.monitor, "_writer", None) if self.monitor is not None else None
        for w in getattr(writer, "writers", [writer]):
            queue = getattr(w, "_queue", None) if isinstance(w, BackgroundWriter) else None
            if queue is not None and queue.unfinished_tasks:
                return True
        return False

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epochs.append(time.perf_counter())
        self.sizes.append(sum(f.stat().st_size for f in self.log_dir.rglob("events.out.tfevents.*")))

    def on_train_batch_start(self, *args: object) -> None:
        self._busy = self._writer_busy()
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args: object) -> None:
        self.steps.append((time.perf_counter() - self._start, self._busy))


def _run(epochs: int, batches: int, monitor: bool, root: Path) -> _Clock:
    torch.manual_seed(0)
    x, y = torch.randn(16 * batches, 3, 32, 32), torch.randint(0, 3, (16 * batches,))
    train = DataLoader(TensorDataset(x, y), batch_size=16)
    val = DataLoader(TensorDataset(x[:16], y[:16]), batch_size=16)
    logger = pl.loggers.TensorBoardLogger(root, name="run")
    attention = AttentionMonitor(8) if monitor else None
    clock = _Clock(attention, Path(logger.log_dir))
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[clock] + ([attention] if attention else []),
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(LitViT(), train, val)
    return clock


def _window(values: list[float], centre: int, half: int = 5) -> list[float]:
    lo = max(1, min(centre - half, len(values) - 2 * half))  # epoch 0 holds the imports' warm-up
    return values[lo : lo + 2 * half]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passes", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps-only", action="store_true", help="only the step-by-step table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    machine = platform.processor() or platform.machine()
    print(f"{date.today()}, {machine}, {os.cpu_count()} cores, torch {torch.__version__}")

    if not args.steps_only:
        _passes_table(args.passes)
    _steps_table()


def _passes_table(passes: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # one extra epoch so that the last window is complete (epoch durations are differences of starts)
        plain = _run(passes + 1, 1, False, root / "plain")
        watched = _run(passes + 1, 1, True, root / "watched")
    durations = {
        name: [b - a for a, b in zip(c.epochs, c.epochs[1:])] for name, c in (("plain", plain), ("watched", watched))
    }
    growth = [b - a for a, b in zip(watched.sizes, watched.sizes[1:])]
    title = "A pass at the defaults: 8 probes, tiny ViT, 1 training + 1 validation batch an epoch"
    print(f"\n1. {title}; {passes} passes\n")
    print("| around pass | epoch without the monitor (s) | epoch with it (s) | added a pass (s) | event KiB a pass |")
    print("|---|---|---|---|---|")
    for centre in (10, 100, 1000):
        if centre > passes:
            continue
        without = statistics.mean(_window(durations["plain"], centre))
        with_ = statistics.mean(_window(durations["watched"], centre))
        size = statistics.mean(_window(growth, centre)) / 1024
        print(f"| {centre} | {without:.3f} | {with_:.3f} | {with_ - without:.3f} | {size:.0f} |")


def _steps_table() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        plain = _run(6, 40, False, root / "plain")
        watched = _run(6, 40, True, root / "watched")
    base = [t for t, _ in plain.steps[40:]]  # the first epoch warms up
    busy = [t for t, b in watched.steps[40:] if b]
    idle = [t for t, b in watched.steps[40:] if not b]
    print("\n2. Training steps while the writer thread writes a pass (40 batches of 16 per epoch, 5 epochs)\n")
    print("| steps | count | median step (ms) | / median without the monitor |")
    print("|---|---|---|---|")
    reference = statistics.median(base)
    print(f"| without the monitor | {len(base)} | {reference * 1e3:.2f} | 1.00 |")
    for name, values in (("with it, while a pass is written", busy), ("with it, writer idle", idle)):
        if values:
            median = statistics.median(values)
            print(f"| {name} | {len(values)} | {median * 1e3:.2f} | {median / reference:.2f} |")


if __name__ == "__main__":
    main()
