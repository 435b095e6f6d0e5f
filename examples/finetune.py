"""Pretrain a small ViT on two shapes, fine-tune it on two others, and let :class:`~lightning_attn.AttentionMonitor`'s
alerts say whether the fine-tune is overwriting what pretraining learned.

Offline, on a CPU, a couple of minutes on 2 cores::

    python examples/finetune.py --plot docs/finetune_alerts.png

1. Pretrain ``vit_tiny_patch16_224`` (32 x 32 images in 8 x 8 patches, 4 blocks) from scratch on circles and
   squares (``shapes.py``).
2. Fine-tune a copy on triangles and crosses twice, with the monitor's default alerts on: once at a sane peak
   learning rate (``--lr``, AdamW) and once at ``--bad-factor`` (1000) times it. The sane run fires no alert; the
   other fires "overwrite" (pretrained features overwritten: the early layers' attention drifts from the
   pretrained model's as much as the late layers'), with the warning on the console.

``--plot FILE`` draws, for both fine-tunes, the drift from the pretrained attention of the first and the last
layer (``attention_drift_baseline/raw/layer_00`` and ``.../layer_03``, the curves the overwrite rule reads) with a
line where each alert fired. ``--fast`` is a smoke run used by the tests. TensorBoard logs: ``--logdir``.
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_attn import AttentionMonitor

from shapes import CLASSES, ShapesDataset, make_probes
from train_vit import ViTClassifier

IMG, PATCH, DEPTH = 32, 8, 4
MEAN = STD = (0.5, 0.5, 0.5)
PRETRAIN_CLASSES, FINETUNE_CLASSES = (0, 1), (2, 3)  # circle, square -> triangle, cross


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Pretrain on two shapes, fine-tune on two others, read the alerts.")
    p.add_argument("--pretrain-epochs", type=int, default=4, help="default: %(default)s")
    p.add_argument("--finetune-epochs", type=int, default=4, help="default: %(default)s")
    p.add_argument(
        "--num-train", type=int, default=3000, help="shapes drawn per stage (half kept) (default: %(default)s)"
    )
    p.add_argument("--lr", type=float, default=1e-4, help="sane fine-tuning peak lr, AdamW (default: %(default)s)")
    p.add_argument("--pretrain-lr", type=float, default=1e-3, help="default: %(default)s")
    p.add_argument(
        "--bad-factor",
        type=float,
        default=1000.0,
        help="the second fine-tune uses --lr times this (default: %(default)s)",
    )
    p.add_argument("--logdir", type=Path, default=Path("lightning_logs"), help="default: %(default)s")
    p.add_argument("--plot", type=Path, default=None, help="save the drift curves of both fine-tunes to this PNG")
    p.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    p.add_argument("--fast", action="store_true", help="smoke run: few small batches")
    args = p.parse_args(argv)
    if args.fast:
        args.pretrain_epochs, args.finetune_epochs, args.num_train = 1, 2, 256
    return args


def shapes(classes: Sequence[int], n: int, seed: int) -> TensorDataset:
    """The images of ``n`` drawn shapes whose class is in ``classes`` (about half of them for two classes)."""
    x, y, _ = ShapesDataset(n, IMG, seed=seed, mean=MEAN, std=STD).tensors()
    keep = torch.isin(y, torch.tensor(classes))
    return TensorDataset(x[keep], y[keep])


def probes(classes: Sequence[int], n: int = 8, seed: int = 0) -> dict:
    """``n`` fixed probes of ``classes`` with their labels and object masks."""
    images, labels, masks = make_probes(n * len(CLASSES) // len(classes), IMG, seed=seed, mean=MEAN, std=STD)
    keep = torch.isin(labels, torch.tensor(classes))
    return {"probes": images[keep][:n], "labels": labels[keep][:n], "masks": masks[keep][:n]}


def fit(
    module: ViTClassifier, classes: Sequence[int], epochs: int, args: argparse.Namespace, name: str, seed: int
) -> AttentionMonitor:
    """Train ``module`` on ``classes`` with an AttentionMonitor (alerts on, the default); returns the monitor."""
    train = DataLoader(shapes(classes, args.num_train, seed), batch_size=32, shuffle=True, drop_last=True)
    val = DataLoader(shapes(classes, args.num_train // 4, seed + 1), batch_size=128)
    monitor = AttentionMonitor(
        **probes(classes, seed=args.seed), module="model", mean=MEAN, std=STD, tile_size=48, gif=False
    )
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(args.logdir, name=name),
        callbacks=[monitor],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
        limit_train_batches=4 if args.fast else None,
        limit_val_batches=1 if args.fast else None,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(module, train, val)
    accuracy = float(trainer.callback_metrics.get("val/acc", float("nan")))
    # how far the run was from the uniform rule: it needs every layer (raw and rollout) near uniform
    last = monitor.runner.scalar_history[-1][1] if monitor.runner and monitor.runner.scalar_history else {}
    entropies = [
        v for tag, v in last.items() if tag.startswith(("attention_entropy/raw/", "attention_entropy/rollout/"))
    ]
    lowest = f", most selective layer's entropy {min(entropies):.3f}" if entropies else ""
    print(
        f"{name}: {trainer.global_step} steps, validation accuracy {accuracy:.3f}{lowest}, "
        f"{len(monitor.alerts)} alert(s){':' if monitor.alerts else ''}"
    )
    for alert in monitor.alerts:
        print(f"    step {alert.step}: {alert.rule} (layers {list(alert.layers)}, curve {alert.curve})")
    return monitor


def plot(runs: dict[str, AttentionMonitor], path: Path) -> None:
    """Per fine-tune, the raw drift from the baseline of the first and last layer, and a line at each alert."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5.2 * len(runs), 3.4), sharey=True, squeeze=False)
    for ax, (title, monitor) in zip(axes[0], runs.items()):
        history = monitor.runner.scalar_history
        for layer, style in ((0, "-o"), (DEPTH - 1, "--s")):
            tag = f"attention_drift_baseline/raw/layer_{layer:02d}"
            points = [(step, values[tag]) for step, values in history if tag in values]
            ax.plot(*zip(*points), style, label=f"layer {layer} (drift from pretrained)")
        fired: dict[int, list[str]] = {}
        for alert in monitor.alerts:
            fired.setdefault(alert.step, []).append(alert.rule)
        for step, rules in fired.items():
            ax.axvline(step, color="red", alpha=0.6)
            ax.text(step, 0.97, " alert: " + ", ".join(rules), color="red", va="top", fontsize=8)
        ax.set(title=title, xlabel="step", ylim=(0, 1))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("Jensen-Shannon divergence (bits)")
    axes[0][0].legend(loc="center right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv: Sequence[str] | None = None) -> dict[str, AttentionMonitor]:
    """Pretrain, then fine-tune at a sane and at a far too high learning rate; returns each fine-tune's monitor."""
    args = parse_args(argv)
    start = time.perf_counter()
    L.seed_everything(args.seed, verbose=False)
    kwargs = dict(num_classes=len(CLASSES), img_size=IMG, patch_size=PATCH, depth=DEPTH, warmup_epochs=0.5)
    pretrained = ViTClassifier(lr=args.pretrain_lr, **kwargs)
    fit(pretrained, PRETRAIN_CLASSES, args.pretrain_epochs, args, "pretrain", seed=10 * args.seed)
    runs = {}
    for lr in (args.lr, args.lr * args.bad_factor):
        L.seed_everything(args.seed, verbose=False)
        module = ViTClassifier(lr=lr, **kwargs)
        module.model.load_state_dict(copy.deepcopy(pretrained.model.state_dict()))
        runs[f"fine-tune, lr {lr:g}"] = fit(
            module, FINETUNE_CLASSES, args.finetune_epochs, args, f"finetune_lr{lr:g}", seed=10 * args.seed + 2
        )
    if args.plot is not None:
        plot(runs, args.plot)
    print(f"Finished in {time.perf_counter() - start:.0f} s; TensorBoard: tensorboard --logdir {args.logdir}")
    return runs


if __name__ == "__main__":
    main()
