"""Train a timm Vision Transformer with :class:`lightning_attn.AttentionMonitor` and watch where it looks.

With no arguments this trains a small ViT from scratch on shapes drawn in code (``shapes.py``: a circle, square,
triangle or cross on a textured background), so it runs offline, on a CPU, in two to three minutes (2 cores)::

    python examples/train_vit.py
    tensorboard --logdir lightning_logs

Every epoch the callback logs, for 8 fixed probe images (two per class), each layer's attention and its rollout
over the image; open the IMAGES tab and move the step slider to compare the untrained model (step 0) with later
epochs. Validation accuracy (chance: 25%) reaches 38-43% after the first epoch and 64-71% after the sixth (seeds 0-2,
``examples/findings.py``).

Your own images: an ImageFolder with ``train/`` and ``val/`` subfolders (one folder per class in each)::

    python examples/train_vit.py --data path/to/dataset --epochs 10 --accelerator gpu --precision bf16-mixed

Preprocessing follows the model's timm data config; the probes are the first ``--probes`` validation images
(ImageFolder lists the images class by class, so a small ``--probes`` may show one class only).
``--pretrained`` starts from the hub weights of ``--model`` (downloaded, so it needs internet) and keeps that
model's own patch size and depth; without it the model is built from scratch with ``--patch-size``/``--depth``.
``--fast`` is a smoke run (1 epoch, a few batches) used by the tests.

``--logger csv|wandb|mlflow`` logs elsewhere than TensorBoard (``pip install -e ".[wandb]"`` or ``".[mlflow]"``;
MLflow's local file store needs ``MLFLOW_ALLOW_FILE_STORE=true`` with MLflow 3). The latest epoch's checkpoint and a
``last.ckpt`` go to the run's ``checkpoints/`` folder; ``lightning-attn`` reads them (``PYTHONPATH=examples``, so
that it can import this file's ``ViTClassifier``)::

    export PYTHONPATH=examples RUN=lightning_logs/shapes/version_0
    lightning-attn render $RUN/checkpoints/last.ckpt --model-class train_vit.ViTClassifier photos/ -o maps/
    lightning-attn replay $RUN -o replay/
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import timm
import timm.data
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from timm.optim import create_optimizer_v2
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from lightning_attn import AttentionMonitor

from shapes import CLASSES, ShapesDataset, make_probes

DEFAULT_MODEL = "vit_tiny_patch16_224"
# From scratch, the default model is shrunk to fit a CPU: 64 x 64 images in 8 x 8 patches (an 8 x 8 grid), 4 blocks.
SCRATCH_IMG_SIZE, SCRATCH_PATCH_SIZE, SCRATCH_DEPTH = 64, 8, 4


class ViTClassifier(L.LightningModule):
    """A timm model trained with cross-entropy, AdamW and a linear-warmup + cosine learning-rate schedule.

    Args:
        model_name: any timm model name, e.g. ``"vit_tiny_patch16_224"``.
        num_classes: size of the classification head.
        img_size: input side in pixels; ``None`` keeps the model's default (224 for most hub ViTs).
        pretrained: load the hub weights (downloads them: needs internet). The hub's patch size and depth are kept.
        lr: peak learning rate, reached after ``warmup_epochs``.
        weight_decay: AdamW weight decay (not applied to biases, norms and position embeddings).
        warmup_epochs: length of the linear warmup, in epochs (fractions allowed).
        patch_size: override the model's patch size; ``None`` keeps it. From scratch only.
        depth: override the number of transformer blocks; ``None`` keeps it. From scratch only.
        label_smoothing: cross-entropy label smoothing.

    The timm model is ``self.model``; ``forward`` returns its logits. The example's default model is
    ``ViTClassifier("vit_tiny_patch16_224", 4, img_size=64, patch_size=8, depth=4)``: 64 x 64 inputs in an 8 x 8
    grid of patches, 4 blocks of width 192 with 3 heads, 1.8 M parameters.

    Raises:
        ValueError: if ``pretrained`` is combined with ``patch_size`` or ``depth``.
    """

    def __init__(
        self,
        model_name: str = DEFAULT_MODEL,
        num_classes: int = len(CLASSES),
        img_size: int | None = None,
        pretrained: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_epochs: float = 1.0,
        patch_size: int | None = None,
        depth: int | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if pretrained and (patch_size is not None or depth is not None):
            raise ValueError(
                f"`patch_size`/`depth` cannot change a pretrained model (got patch_size={patch_size}, depth={depth}): "
                "the hub weights fix both; pass None, or pretrained=False to train from scratch"
            )
        self.save_hyperparameters()
        overrides = {"img_size": img_size, "patch_size": patch_size, "depth": depth}
        kwargs = {k: v for k, v in overrides.items() if v is not None}
        self.model = timm.create_model(model_name, pretrained=pretrained, num_classes=num_classes, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _step(self, batch: Sequence[torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        acc = (logits.argmax(dim=-1) == y).float().mean()
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=len(y))
        self.log(f"{stage}/acc", acc, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = create_optimizer_v2(self.model, "adamw", lr=hp.lr, weight_decay=hp.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = min(int(hp.warmup_epochs * total / max(self.trainer.max_epochs, 1)), total // 2)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(total - warmup, 1)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a timm ViT; log its attention maps to TensorBoard every epoch.")
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="ImageFolder root with train/ and val/ subfolders; default: shapes generated in code",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="timm model name (default: %(default)s)")
    p.add_argument(
        "--pretrained",
        action="store_true",
        help="start from the hub weights (downloads them: needs internet); keeps the hub patch size/depth",
    )
    p.add_argument(
        "--img-size",
        type=int,
        default=None,
        help=f"input side; default {SCRATCH_IMG_SIZE} from scratch, the hub model's own with --pretrained",
    )
    p.add_argument("--patch-size", type=int, default=None, help=f"from scratch only; default {SCRATCH_PATCH_SIZE}")
    p.add_argument(
        "--depth", type=int, default=None, help=f"number of blocks, from scratch only; default {SCRATCH_DEPTH}"
    )
    p.add_argument("--epochs", type=int, default=6, help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=32, help="default: %(default)s")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (default: %(default)s)")
    p.add_argument(
        "--num-train",
        type=int,
        default=None,
        help="training images; default 4000 generated shapes, or the whole train/ folder",
    )
    p.add_argument(
        "--num-val",
        type=int,
        default=None,
        help="validation images; default 800 generated shapes, or the whole val/ folder",
    )
    p.add_argument(
        "--probes", type=int, default=8, help="number of probe images whose attention is logged (default: %(default)s)"
    )
    p.add_argument(
        "--logdir", type=Path, default=Path("lightning_logs"), help="log and checkpoint root (default: %(default)s)"
    )
    p.add_argument("--accelerator", default="auto", help='"cpu", "gpu", "mps" or "auto" (default: %(default)s)')
    p.add_argument(
        "--devices",
        default="1",
        help='devices to train on: "1", "2", "auto"; more than 1 runs DDP (default: %(default)s)',
    )
    p.add_argument(
        "--precision", default="32-true", help='"32-true", "bf16-mixed", "16-mixed"... (default: %(default)s)'
    )
    p.add_argument(
        "--workers",
        type=int,
        default=4,
        help="data-loader workers for --data; the shapes live in memory (default: %(default)s)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seeds the model, the shapes and the probes (default: %(default)s)"
    )
    p.add_argument("--fast", action="store_true", help="smoke run: 1 epoch, a few small batches")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default: torch's). Float sums depend on it, so a run is bit for bit the same "
        "only at the same count; README's numbers use --threads 2",
    )
    p.add_argument(
        "--report",
        action="store_true",
        help="after training, print README's table (pointing game and deletion AUCs) from the event file",
    )
    p.add_argument(
        "--docs",
        type=Path,
        default=None,
        help="after training, save the last rollout and relevance grids and the filmstrip as PNG here "
        "(README's pictures: --docs docs)",
    )
    p.add_argument(
        "--no-monitor",
        action="store_true",
        help="train without AttentionMonitor (compare the printed weights digest with a monitored run)",
    )
    p.add_argument(
        "--logger",
        choices=LOGGERS,
        default="tensorboard",
        help="where the metrics and pictures go (wandb and mlflow: their extras; default: %(default)s)",
    )
    args = p.parse_args(argv)
    if args.logger == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI"):
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
            p.error(
                "--logger mlflow writes MLflow's local file store (./mlruns), which MLflow 3 opens only with "
                "MLFLOW_ALLOW_FILE_STORE=true: run `MLFLOW_ALLOW_FILE_STORE=true python examples/train_vit.py "
                "--logger mlflow` (or set MLFLOW_TRACKING_URI to a tracking server)"
            )
    if args.pretrained and (args.patch_size is not None or args.depth is not None):
        p.error("--patch-size/--depth cannot change a pretrained model: drop them, or drop --pretrained")
    if not args.pretrained:
        args.patch_size = args.patch_size or SCRATCH_PATCH_SIZE
        args.depth = args.depth or SCRATCH_DEPTH
        args.img_size = args.img_size or SCRATCH_IMG_SIZE
    if args.fast:
        args.epochs = 1
        args.num_train = min(args.num_train or 64, 64)
        args.num_val = min(args.num_val or 32, 32)
        args.batch_size = min(args.batch_size, 16)
    return args


LOGGERS = ("tensorboard", "csv", "wandb", "mlflow")


def make_logger(kind: str, logdir: Path, name: str) -> Logger:
    """The run's logger: TensorBoard (the default), CSV, Weights & Biases or MLflow, each under its usual place."""
    if kind == "csv":
        return CSVLogger(logdir, name=name)
    if kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        logdir.mkdir(parents=True, exist_ok=True)
        return WandbLogger(project="lightning-attn", name=name, save_dir=str(logdir))  # WANDB_MODE=offline works
    if kind == "mlflow":
        from lightning.pytorch.loggers import MLFlowLogger

        # MLFLOW_TRACKING_URI, when set, points at a server; otherwise ./mlruns (`mlflow ui` shows it)
        return MLFlowLogger(
            experiment_name=f"lightning-attn-{name}", tracking_uri=os.environ.get("MLFLOW_TRACKING_URI")
        )
    return TensorBoardLogger(logdir, name=name)


def _first(dataset: Dataset, n: int | None) -> Dataset:
    return dataset if n is None or n >= len(dataset) else Subset(dataset, range(n))


def shapes_data(
    args: argparse.Namespace, img_size: int, mean: Sequence[float], std: Sequence[float]
) -> tuple[DataLoader, DataLoader, dict]:
    """Generated shapes, rendered once into memory; probes: fixed images covering every class, with their masks."""
    num_train = 4000 if args.num_train is None else args.num_train
    num_val = 800 if args.num_val is None else args.num_val
    # Distinct seeds for train and val; the probes come from make_probes' own stream, so they are in neither.
    train_x, train_y, _ = ShapesDataset(num_train, img_size, seed=2 * args.seed, mean=mean, std=std).tensors()
    val_x, val_y, _ = ShapesDataset(num_val, img_size, seed=2 * args.seed + 1, mean=mean, std=std).tensors()
    train = DataLoader(TensorDataset(train_x, train_y), batch_size=args.batch_size, shuffle=True, drop_last=True)
    val = DataLoader(TensorDataset(val_x, val_y), batch_size=4 * args.batch_size)
    # Probes: `args.probes` fixed images, classes in turn (circle, square, triangle, cross, circle, ...), normalised
    # like the training data; their labels and object masks go to the monitor with them.
    images, labels, masks = make_probes(args.probes, img_size, seed=args.seed, mean=mean, std=std)
    return train, val, {"probes": images, "labels": labels, "masks": masks}


def folder_classes(root: Path) -> list[str]:
    """Class names of an ImageFolder root with train/ and val/; exits with a message when the layout is wrong."""
    from torchvision.datasets.folder import find_classes

    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise SystemExit(f"--data {root}: expected an ImageFolder with {split}/ inside (one folder per class)")
    classes = find_classes(root / "train")[0]
    if len(classes) < 2:
        raise SystemExit(f"--data {root}: train/ needs at least two class folders, found {classes}")
    return classes


def folder_data(args: argparse.Namespace, data_cfg: dict) -> tuple[DataLoader, DataLoader, dict]:
    """An ImageFolder with train/ and val/, preprocessed as the timm model expects; probes: first validation images."""
    from torchvision.datasets import ImageFolder

    train_set = ImageFolder(args.data / "train", transform=timm.data.create_transform(**data_cfg, is_training=True))
    val_set = ImageFolder(args.data / "val", transform=timm.data.create_transform(**data_cfg, is_training=False))
    # Shuffle before truncating the training set (ImageFolder lists class by class); keep val in order for probes.
    if args.num_train is not None and args.num_train < len(train_set):
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(args.seed))
        train_set = Subset(train_set, order[: args.num_train].tolist())
    val_set = _first(val_set, args.num_val)
    loader = dict(batch_size=args.batch_size, num_workers=args.workers, persistent_workers=args.workers > 0)
    train = DataLoader(train_set, shuffle=True, drop_last=len(train_set) > args.batch_size, **loader)
    val = DataLoader(val_set, **loader)
    # Probes: the first `args.probes` validation images (the monitor takes them from the loader once).
    return train, val, {"probes": args.probes}


def main(argv: Sequence[str] | None = None) -> L.Trainer:
    """Parse ``argv`` (default: the command line), train, and return the fitted trainer."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    L.seed_everything(args.seed, verbose=False)

    num_classes = len(CLASSES) if args.data is None else len(folder_classes(args.data))
    module = ViTClassifier(
        args.model,
        num_classes,
        img_size=args.img_size,
        pretrained=args.pretrained,
        lr=args.lr,
        patch_size=args.patch_size,
        depth=args.depth,
    )
    # The model's data config gives mean/std/interpolation/crop. It reports the hub input size (224) even for a
    # model built for another size, so an --img-size is passed in explicitly.
    size = {} if args.img_size is None else {"input_size": (3, args.img_size, args.img_size)}
    data_cfg = timm.data.resolve_data_config(size, model=module.model)
    img_size, mean, std = data_cfg["input_size"][-1], data_cfg["mean"], data_cfg["std"]

    if args.data is None:
        train, val, probes = shapes_data(args, img_size, mean, std)
        name = "shapes"
    else:
        train, val, probes = folder_data(args, data_cfg)
        name = args.data.resolve().name

    # mean/std: the normalisation the probes went through, so the monitor shows them in their own colours.
    # All four maps; faithfulness (deletion AUCs) costs a few extra forwards of the probes per epoch. With the
    # generated shapes the probes carry masks, so the pointing game shows localisation rising as the model learns.
    monitor = AttentionMonitor(
        **probes,
        module="model",
        methods=("raw", "rollout", "grad_rollout", "relevance"),
        faithfulness=True,
        every_n_epochs=1,
        mean=mean,
        std=std,
    )
    callbacks = [LearningRateMonitor(logging_interval="step")] + ([] if args.no_monitor else [monitor])
    # Lightning's checkpoint of the latest epoch and a last.ckpt, under the logger's run folder (`lightning-attn
    # render` and `replay` read them)
    callbacks.append(ModelCheckpoint(save_last=True))
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator=args.accelerator,
        devices=int(args.devices) if args.devices.isdigit() else args.devices,
        precision=args.precision,
        logger=make_logger(args.logger, args.logdir, name),
        callbacks=callbacks,
        log_every_n_steps=1 if args.fast else 10,
        limit_train_batches=4 if args.fast else None,
        limit_val_batches=2 if args.fast else None,
        num_sanity_val_steps=0 if args.fast else 2,
    )
    with warnings.catch_warnings():
        if args.data is None:  # the shapes live in memory as tensors: loader workers would only add start-up time
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(module, train, val)

    if trainer.is_global_zero:
        metrics = {k: f"{float(v):.3f}" for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        print(f"\nFinished in {time.perf_counter() - start:.0f} s; last validation: {metrics}")
        if args.logger == "tensorboard":
            print(f"TensorBoard logs: {trainer.log_dir}")
            print(f"View them with:\n    tensorboard --logdir {args.logdir}")
        else:
            print(f"Logged with {args.logger}: {trainer.log_dir or trainer.default_root_dir}")
        if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.last_model_path:
            print(f"Last checkpoint: {trainer.checkpoint_callback.last_model_path}")
        # training must not depend on the monitor: this digest is the same with --no-monitor
        print(f"Final weights digest: {weights_digest(module)}")
        if args.report and not args.no_monitor and args.logger == "tensorboard":
            print("\n" + report(trainer.log_dir))
        if args.docs is not None and not args.no_monitor and args.logger == "tensorboard":
            for path in export_images(trainer.log_dir, args.docs):
                print(f"wrote {path}")
    return trainer


def export_images(log_dir: str | Path, directory: Path) -> list[Path]:
    """The last logged rollout and relevance grids and the filmstrip, from the event file, as PNG files."""
    import io

    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    acc.Reload()
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for tag, name in (
        ("attention/rollout", "example_rollout.png"),
        ("attention/relevance", "example_relevance.png"),
        ("attention/filmstrip", "example_filmstrip.png"),
    ):
        if tag in acc.Tags()["images"]:
            image = Image.open(io.BytesIO(acc.Images(tag)[-1].encoded_image_string)).convert("RGB")
            image.save(directory / name)
            written.append(directory / name)
    return written


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer, bit for bit: equal digests mean identical training."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def report(log_dir: str | Path) -> str:
    """README's table from a run's event file: the pointing game per method at the first, second and last logged
    steps, and the deletion AUCs (most / least important first) with the random map's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])

    def series(tag: str) -> dict[int, float]:
        return {e.step: e.value for e in acc.Scalars(tag)} if tag in scalars else {}

    methods = ("raw", "rollout", "grad_rollout", "relevance")
    steps = sorted(series(f"attention_pointing_game/{methods[0]}"))
    picked = steps[:2] + steps[-1:] if len(steps) > 2 else steps
    fmt = lambda values, step: f"{values[step]:.3f}" if step in values else "—"  # noqa: E731
    head = " / ".join(map(str, picked))
    lines = [
        f"| method | pointing game at step {head} | deletion AUC, most important first (lower = more faithful): "
        f"step {head} | least important first (higher = more faithful): step {head} |",
        "|---|---|---|---|",
    ]
    for method in (*methods, "random"):
        game = series(f"attention_pointing_game/{method}")
        most = series(f"attention_faithfulness/most_first_auc/{method}")
        least = series(f"attention_faithfulness/least_first_auc/{method}")
        label = "random map" if method == "random" else method
        lines.append(
            f"| {label} | {' / '.join(fmt(game, s) for s in picked)} | {' / '.join(fmt(most, s) for s in picked)} | "
            f"{' / '.join(fmt(least, s) for s in picked)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
