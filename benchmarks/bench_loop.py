"""What the monitor adds to a small model's training loop, early and late in a long run; prints markdown tables
(run by hand on an otherwise idle machine, not a test).

    python benchmarks/bench_loop.py               # 1000 passes and the step-by-step table, ~10 min on 2 CPU cores
    python benchmarks/bench_loop.py --passes 120  # a shorter run (passes 10 and 100 only)

The setting of the performance issue that asked for it: a tiny timm ViT (2 blocks, 32 px, patch 8, width 48), 8
probes at the monitor's defaults, one training batch and one validation batch per epoch, a TensorBoard logger;
the same run without the monitor alongside. Two tables:

1. Seconds a pass adds to an epoch (mean epoch time with the monitor minus without, over 10 epochs around passes
   10, 100 and 1000) and the bytes each pass adds to the run's event file over the same epochs.
2. The training steps after a pass, against the same steps of the same run after no pass: 40 training batches an
   epoch and a pass every other epoch (`every_n_epochs=2`), so each epoch that follows a pass is followed by one
   that does not. Each of the first 10 steps after a pass is compared with the step at the same place of the next
   epoch (the target is <= 1.05), and the table counts the steps that began while the monitor's writer thread was
   still storing a pass. Comparing two runs instead would measure the machine: on the 2-core machine the median
   step of runs of the same code differs by 10% and more from run to run, more than the effect measured.
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


def _run(epochs: int, batches: int, monitor: bool, root: Path, every_n_epochs: int = 1) -> _Clock:
    torch.manual_seed(0)
    x, y = torch.randn(16 * batches, 3, 32, 32), torch.randint(0, 3, (16 * batches,))
    train = DataLoader(TensorDataset(x, y), batch_size=16)
    val = DataLoader(TensorDataset(x[:16], y[:16]), batch_size=16)
    logger = pl.loggers.TensorBoardLogger(root, name="run")
    attention = AttentionMonitor(8, every_n_epochs=every_n_epochs) if monitor else None
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


def _steps_table(pairs: int = 20, first: int = 10) -> None:
    batches = 40
    with tempfile.TemporaryDirectory() as tmp:
        clock = _run(2 * pairs + 2, batches, True, Path(tmp) / "watched", every_n_epochs=2)
    epochs = [clock.steps[i : i + batches] for i in range(0, len(clock.steps), batches)]
    # passes run at the end of epochs 1, 3, 5, ...: epochs 2, 4, ... follow a pass, 3, 5, ... follow none
    after = [epoch[:first] for epoch in epochs[2::2]]
    control = [epoch[:first] for epoch in epochs[3::2]][: len(after)]
    after = after[: len(control)]
    ratios = [sum(t for t, _ in a) / sum(t for t, _ in c) for a, c in zip(after, control)]
    steps_after = [t for a in after for t, _ in a]
    steps_control = [t for c in control for t, _ in c]
    busy = [t for epoch in epochs[2:] for t, b in epoch if b]
    quartiles = statistics.quantiles(ratios, n=4)
    added = (sum(steps_after) - sum(steps_control)) / len(after)
    ratio = statistics.mean(steps_after) / statistics.mean(steps_control)
    total = sum(map(len, epochs[2:]))
    print(f"\n2. The first {first} training steps after a pass ({batches} batches of 16 an epoch, a pass every other")
    print(f"epoch, {len(after)} passes), against the same steps of the epoch after, which follows no pass\n")
    print("| steps | count | median step (ms) | mean step (ms) | mean / mean after no pass |")
    print("|---|---|---|---|---|")
    print(
        f"| after no pass | {len(steps_control)} | {statistics.median(steps_control) * 1e3:.2f} | "
        f"{statistics.mean(steps_control) * 1e3:.2f} | 1.00 |"
    )
    print(
        f"| after a pass | {len(steps_after)} | {statistics.median(steps_after) * 1e3:.2f} | "
        f"{statistics.mean(steps_after) * 1e3:.2f} | {ratio:.2f} "
        f"(pass by pass: quartiles {quartiles[0]:.2f}, {quartiles[1]:.2f}, {quartiles[2]:.2f}; "
        f"{added * 1e3:+.1f} ms a pass) |"
    )
    print(f"\nSteps that began while the writer thread was still storing a pass: {len(busy)} of {total}.")


if __name__ == "__main__":
    main()
