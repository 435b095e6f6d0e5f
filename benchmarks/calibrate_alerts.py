"""Calibrate the attention alerts on a corpus of small runs this script trains itself: healthy and broken.

    python benchmarks/calibrate_alerts.py                       # the whole corpus, ~5 min on 2 idle CPU cores
    python benchmarks/calibrate_alerts.py --json corpus.json    # ... and keep every run's scalar history
    python benchmarks/calibrate_alerts.py --replay corpus.json  # the table again from kept histories (seconds)
    python benchmarks/calibrate_alerts.py --fast                # a smoke run (the tests)

Every run trains a tiny timm ViT (``vit_tiny_patch16_224`` shrunk: 32 x 32 images in 8 x 8 patches, 4 blocks of
width 48, random init, AdamW with a 20-step warm-up; nothing downloaded) on images drawn in code, with
:class:`~lightning_attn.AttentionMonitor` attached as a user would attach it (8 probes with labels and object
masks, ``faithfulness=True``, the default rules and thresholds), one probe pass per validation.

Healthy runs: the square-finding run of issue 20 (class = the colour of a square, validated every 10 steps for
300 steps) and a second seed of it; from scratch on shapes (``examples/shapes.py``) validated every 10 steps with
three seeds and every 100 steps; the square-finding model fine-tuned to four new colours at a sane learning rate;
a run without labels (contrastive: two noisy, shifted views of each image find each other; the classifier head
is never used, the probes have no labels). Broken runs, each with the rule it must raise: q and k frozen at zero
(``uniform``; validated every 10 and every 100 steps), the learning rate raised 100x at step 150 (``collapse``),
the fine-tune at 1000x the sane learning rate (``overwrite``), two background patches made to take the class
token's attention in a middle layer from step 150 (``artifacts``), and a task whose evidence is in every patch
alike (class = the background's colour), where no map can rank patches better than a random one (``chance``).

It prints, per run, the step at which each rule first fired (``-``: never; ``n/a``: the rule cannot fire in that
run's configuration, e.g. ``overwrite`` from scratch) and a verdict: a false alarm on a healthy run or a missed
fault is marked. The rules are replayed on each run's scalar history with :class:`~lightning_attn.AlertBook`,
exactly as the callback checks them after each pass (the callback's own alerts are checked to be the same).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import timm
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_attn import AlertBook, AlertThresholds, AttentionMonitor
from lightning_attn.alerts import RULES, rules_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from shapes import ShapesDataset, make_probes  # noqa: E402

IMG, PATCH, DEPTH, WIDTH, HEADS = 32, 8, 4, 48, 3
History = Sequence[tuple[int, dict[str, float]]]
#: The square-finding task's classes: a square of one of these colours (RGB in [0, 1]) on a dark background;
#: the fine-tunes learn another four.
PALETTE = ((0.95, 0.2, 0.2), (0.2, 0.9, 0.2), (0.25, 0.4, 1.0), (0.95, 0.9, 0.2))
PALETTE_2 = ((0.2, 0.9, 0.9), (0.9, 0.3, 0.9), (1.0, 0.6, 0.1), (0.95, 0.95, 0.95))
#: Per-channel mean and std of the square images (0 in normalised space is the mean colour: what faithfulness's
#: deletion puts in place of a patch, close to the background).
SQUARES_MEAN, SQUARES_STD = (0.21, 0.21, 0.19), (0.18, 0.18, 0.16)


# ---------------------------------------------------------------------------------------------------- data


def squares(
    n: int, seed: int, palette: Sequence[Sequence[float]] = PALETTE, tint: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """``n`` images of a coloured square (side 6-10 px) on a dark noisy background: (images normalised with
    :data:`SQUARES_MEAN` and :data:`SQUARES_STD`, labels = the square's colour in ``palette``, masks). ``tint``:
    the label is the background's hue instead (a dim ``palette`` colour over the whole image, the square drawn in
    it, unseen): the evidence is in every patch alike, so no map can rank patches better than a random one."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(PALETTE), (n,), generator=g)
    side = torch.randint(6, 11, (n,), generator=g)
    top = (torch.rand(n, generator=g) * (IMG - side + 1)).long()
    left = (torch.rand(n, generator=g) * (IMG - side + 1)).long()
    ys, xs = torch.arange(IMG).view(1, -1, 1), torch.arange(IMG).view(1, 1, -1)
    rows = (ys >= top.view(-1, 1, 1)) & (ys < (top + side).view(-1, 1, 1))
    masks = rows & (xs >= left.view(-1, 1, 1)) & (xs < (left + side).view(-1, 1, 1))
    background = 0.35 * torch.rand(n, 3, 1, 1, generator=g) + 0.08 * torch.randn(n, 3, IMG, IMG, generator=g)
    colour = torch.tensor(palette)[labels].view(n, 3, 1, 1)
    if tint:
        background = 0.4 * colour + 0.08 * torch.randn(n, 3, IMG, IMG, generator=g)
        colour = 0.4 * colour
    images = torch.where(masks.unsqueeze(1), colour, background).clamp(0, 1)
    mean, std = torch.tensor(SQUARES_MEAN).view(1, 3, 1, 1), torch.tensor(SQUARES_STD).view(1, 3, 1, 1)
    return (images - mean) / std, labels, masks


def shapes(n: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """``n`` drawn shapes (``examples/shapes.py``: class = circle, square, triangle or cross): (images, labels,
    masks)."""
    return ShapesDataset(n, IMG, seed=seed).tensors()


def shape_probes() -> tuple[Tensor, Tensor, Tensor]:
    return make_probes(8, IMG, seed=0)


# ---------------------------------------------------------------------------------------------------- model


class Net(L.LightningModule):
    """A tiny timm ViT trained with AdamW: classification (``objective="classify"``) or, without labels,
    contrastive (``"contrast"``: two noisy, shifted views of each image must find each other among the batch by
    their class-token features, InfoNCE; the classifier head is never used). ``lr_at(step)`` scales the learning
    rate (warm-up, a blow-up)."""

    def __init__(
        self,
        lr: float = 1e-3,
        objective: str = "classify",
        lr_at: Callable[[int], float] | None = None,
        weight_decay: float = 0.05,
    ) -> None:
        super().__init__()
        self.model = timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            img_size=IMG,
            patch_size=PATCH,
            depth=DEPTH,
            embed_dim=WIDTH,
            num_heads=HEADS,
            num_classes=len(PALETTE),
        )
        self.lr, self.objective, self.weight_decay = lr, objective, weight_decay
        self.lr_at = lr_at or (lambda step: min(1.0, (step + 1) / 20))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def _loss(self, batch: Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
        x, y = batch[0], batch[1]
        if self.objective == "classify":
            logits = self(x)
            return F.cross_entropy(logits, y), (logits.argmax(-1) == y).float().mean()
        views = [torch.roll(x, tuple(torch.randint(-3, 4, (2,)).tolist()), (2, 3)) for _ in range(2)]
        views = [v + 0.3 * torch.randn_like(v) for v in views]
        a, b = (F.normalize(self.model.forward_features(v)[:, 0], dim=-1) for v in views)
        logits = a @ b.T / 0.1
        return F.cross_entropy(logits, torch.arange(len(x), device=x.device)), None

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        return self._loss(batch)[0]

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        loss, acc = self._loss(batch)
        self.log("val_loss", loss)
        if acc is not None:
            self.log("val_acc", acc)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_at), "interval": "step"},
        }


def freeze_qk(net: Net, scale: float = 0.0) -> Net:
    """q and k of every block multiplied by ``scale`` (0: attention exactly uniform) and kept there (their
    gradient zeroed), while values, MLPs and head learn."""
    for block in net.model.blocks:
        qkv, dim = block.attn.qkv, block.attn.qkv.in_features
        with torch.no_grad():
            qkv.weight[: 2 * dim] *= scale
            qkv.bias[: 2 * dim] *= scale
        keep = torch.ones_like(qkv.weight[:, :1])
        keep[: 2 * dim] = 0
        qkv.weight.register_hook(lambda grad, keep=keep: grad * keep)
        qkv.bias.register_hook(lambda grad, keep=keep[:, 0]: grad * keep)
    return net


class Artifacts(L.Callback):
    """From ``start`` on, before every optimiser step, make two background patches (the image corners) take the
    class token's attention in block ``block``: a big coordinate on their position embeddings and a rank-one q/k
    that reads it (high-attention tokens by construction)."""

    def __init__(self, start: int, block: int = 2, patches: Sequence[int] = (0, 15), big: float = 100.0) -> None:
        self.start, self.block, self.patches, self.big = start, block, list(patches), big

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step < self.start:
            return
        vit = pl_module.model  # type: ignore[attr-defined]
        attn = vit.blocks[self.block].attn
        dim, head_dim = vit.embed_dim, vit.embed_dim // attn.num_heads
        with torch.no_grad():
            vit.cls_token[0, 0, 0] = self.big
            vit.pos_embed[0, 1:, 1] = 0
            vit.pos_embed[0, [1 + p for p in self.patches], 1] = self.big
            attn.qkv.weight[: 2 * dim] = 0
            attn.qkv.bias[: 2 * dim] = 0
            for h in range(attn.num_heads):
                attn.qkv.weight[h * head_dim, 0] = 3.0
                attn.qkv.weight[dim + h * head_dim, 1] = 3.0


class Accuracy(L.Callback):
    """Validation accuracy at every validation (the last one is reported)."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and "val_acc" in trainer.callback_metrics:
            self.values.append(float(trainer.callback_metrics["val_acc"]))


# ---------------------------------------------------------------------------------------------------- runs


@dataclass
class Run:
    """One run of the corpus: ``expect`` is empty for a healthy run, else the rules the fault must raise."""

    name: str
    data: str  # "squares", "squares2" (the second palette: the fine-tunes), "tint" (class = background) or "shapes"
    steps: int
    every: int  # validation (and probe pass) every so many optimiser steps
    expect: tuple[str, ...] = ()
    seed: int = 0
    lr: float = 1e-3
    objective: str = "classify"
    init: str = ""  # "" (random), or the name of the run whose final weights to start from
    qk: float | None = None  # freeze q and k at this scale
    blowup: int | None = None  # multiply the learning rate by `factor` from this step on
    factor: float = 100.0
    artifacts: int | None = None  # induce artifact tokens from this step on
    weight_decay: float = 0.05


def corpus(fast: bool = False) -> list[Run]:
    """The runs, in the order they train (a fine-tune after its pretraining)."""
    runs = [
        Run("squares", "squares", 300, 10),  # issue 20's square-finding run: class = the colour of a square
        Run("squares, seed 1", "squares", 300, 10, seed=1),
        Run("shapes, seed 0", "shapes", 400, 10),
        Run("shapes, seed 1", "shapes", 400, 10, seed=1),
        Run("shapes, seed 2", "shapes", 400, 10, seed=2),
        Run("shapes, rare validation", "shapes", 400, 100),
        Run("fine-tune, lr 1e-4", "squares2", 200, 10, lr=1e-4, init="squares"),  # to four new colours
        Run("no labels (contrastive)", "squares", 300, 10, objective="contrast"),
        Run("q, k frozen at 0", "squares", 300, 10, expect=("uniform",), qk=0.0),
        Run("q, k frozen at 0, rare validation", "squares", 300, 100, expect=("uniform",), qk=0.0),
        # without weight decay: AdamW's decay at 100x the rate would shrink q and k to uniform attention instead
        Run("lr x100 at step 150", "squares", 300, 10, expect=("collapse",), blowup=150, weight_decay=0.0),
        Run("fine-tune, lr 0.1", "squares2", 200, 10, expect=("overwrite",), lr=0.1, init="squares"),
        Run("artifact tokens from step 150", "squares", 300, 10, expect=("artifacts",), artifacts=150),
        # the evidence is in every patch alike: no map can rank patches better than a random one
        Run("class in the background colour", "tint", 300, 10, expect=("chance",)),
    ]
    if fast:  # two runs cut to a few passes
        runs = [r for r in runs if r.name in ("squares", "q, k frozen at 0")]
        for r in runs:
            r.steps, r.every = 20, 5
    return runs


def _data(run: Run) -> tuple[DataLoader, DataLoader, tuple[Tensor, Tensor, Tensor]]:
    if run.data != "shapes":
        palette, tint = (PALETTE_2 if run.data == "squares2" else PALETTE), run.data == "tint"
        train, val = squares(2048, 10 * run.seed, palette, tint), squares(256, 10 * run.seed + 1, palette, tint)
        probes = squares(8, 999, palette, tint)
    else:
        train, val, probes = shapes(2048, 10 * run.seed), shapes(256, 10 * run.seed + 1), shape_probes()
    loader = DataLoader(TensorDataset(*train[:2]), batch_size=32, shuffle=True, drop_last=True)
    return loader, DataLoader(TensorDataset(*val[:2]), batch_size=256), probes


def train(run: Run, weights: dict[str, dict[str, Tensor]], root: Path) -> dict[str, Any]:
    """Train one run with an AttentionMonitor; its scalar history, the callback's alerts and the accuracy."""
    L.seed_everything(run.seed, verbose=False)
    blowup, factor = run.blowup, run.factor
    lr_at = None
    if blowup is not None:
        lr_at = lambda step: min(1.0, (step + 1) / 20) * (factor if step >= blowup else 1.0)  # noqa: E731
    net = Net(run.lr, run.objective, lr_at, run.weight_decay)
    if run.init:
        net.model.load_state_dict(weights[run.init])
    if run.qk is not None:
        freeze_qk(net, run.qk)
    train_loader, val_loader, (images, labels, masks) = _data(run)
    labelled = run.objective == "classify"
    monitor = AttentionMonitor(
        images,
        labels=labels if labelled else None,
        masks=None if run.data == "tint" else masks,  # no object to point at
        module="model",
        faithfulness=labelled,
        faithfulness_steps=8,
        mean=None if run.data == "shapes" else SQUARES_MEAN,
        std=None if run.data == "shapes" else SQUARES_STD,
        tile_size=16,
        gif=False,
        on_error="raise",
    )
    accuracy = Accuracy()
    callbacks: list[L.Callback] = [monitor, accuracy]
    if run.artifacts is not None:
        callbacks.append(Artifacts(run.artifacts))
    trainer = L.Trainer(
        max_steps=run.steps,
        val_check_interval=run.every,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=root / run.name.replace(" ", "_").replace(",", ""),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(net, train_loader, val_loader)
    weights[run.name] = {k: v.detach().clone() for k, v in net.model.state_dict().items()}
    assert monitor.runner is not None
    return {
        "every": run.every,
        "expect": list(run.expect),
        "accuracy": accuracy.values[-1] if accuracy.values else None,
        "alerts": [[a.rule, a.step] for a in monitor.alerts],
        **compact(monitor.runner.scalar_history),
    }


# ---------------------------------------------------------------------------------------------------- the table

#: What the rules read of a pass's scalars (the rest is left out of the --json file).
READ = (
    "_entropy/",
    "_entropy_median/",
    "_drift_baseline/",
    "_artifacts/share/",
    "_artifacts/background_share/",
    "_pointing_game/",
    "_faithfulness/most_first_auc/",
    "_faithfulness/score_drop/",
)


def compact(history: History) -> dict[str, Any]:
    """A scalar history as ``steps``, ``tags`` (those the rules read) and one row of ``values`` per pass (5
    decimals; None where a pass lacks a tag)."""
    tags = sorted({t for _, v in history for t in v if any(r in t for r in READ)})
    rows = [[None if t not in v or not math.isfinite(v[t]) else round(v[t], 5) for t in tags] for _, v in history]
    return {"steps": [int(s) for s, _ in history], "tags": tags, "values": rows}


def expand(result: dict[str, Any]) -> list[tuple[int, dict[str, float]]]:
    """The scalar history of :func:`compact`'s record."""
    tags = result["tags"]
    return [
        (step, {t: v for t, v in zip(tags, row) if v is not None})
        for step, row in zip(result["steps"], result["values"])
    ]


def replay(
    history: Sequence[tuple[int, dict[str, float]]], thresholds: AlertThresholds | None = None
) -> dict[str, Any]:
    """Per rule: the step of the first pass at which it fired, None if never, ``"n/a"`` if it cannot fire in the
    run's configuration; the rules checked after each pass, as the callback does."""
    book = AlertBook(rules_for(thresholds))
    for i in range(1, len(history) + 1):
        book.update(history[:i])
    first: dict[str, Any] = {rule.name: None for rule in RULES}
    for alert in book.alerts:
        if first[alert.rule] is None:
            first[alert.rule] = alert.step
    can = book.applicable or []
    return {name: step if name in can else "n/a" for name, step in first.items()}


def table(results: dict[str, dict[str, Any]], thresholds: AlertThresholds | None = None) -> tuple[str, int, int]:
    """The markdown table of the runs' alerts, with the number of false alarms and of missed faults."""
    names = [rule.name for rule in RULES]
    lines = [
        "| run | validated every | val acc | " + " | ".join(f"`{n}`" for n in names) + " | verdict |",
        "|---" * (len(names) + 4) + "|",
    ]
    false_alarms = missed = 0
    for name, result in results.items():
        fired, expect = replay(expand(result), thresholds), result["expect"]
        cells = []
        for rule in names:
            step = fired[rule]
            cell = "n/a" if step == "n/a" else "-" if step is None else str(step)
            cells.append(f"**{cell}**" if rule in expect else cell)
        fires = {n for n, s in fired.items() if isinstance(s, int)}
        if not expect:
            verdict = "healthy: no alert" if not fires else f"FALSE ALARM: {', '.join(sorted(fires))}"
            false_alarms += bool(fires)
        else:
            lost = [n for n in expect if n not in fires]
            verdict = f"{', '.join(expect)} caught" if not lost else f"MISSED: {', '.join(lost)}"
            missed += bool(lost)
        acc = result.get("accuracy")
        acc_cell = "-" if acc is None else f"{acc:.2f}"
        lines.append(f"| {name} | {result['every']} steps | {acc_cell} | " + " | ".join(cells) + f" | {verdict} |")
    healthy = sum(not r["expect"] for r in results.values())
    lines.append("")
    lines.append(
        f"{false_alarms} false alarm(s) on {healthy} healthy runs; {missed} missed fault(s) in "
        f"{len(results) - healthy} broken runs. Cells: the optimiser step at which each rule first fired (bold: the "
        "rule the fault must raise), - never, n/a the rule cannot fire in that run's configuration."
    )
    return "\n".join(lines), false_alarms, missed


def _sustained(steps: Sequence[int], values: Sequence[float], patience: int, fires_above: bool) -> float | None:
    """The value closest to firing that held at every pass over ``patience`` steps: for each pass, the least
    alarming value of the window of passes back to one ``patience`` steps before it, then the most alarming
    window. None when the run is shorter than the patience."""
    out = []
    for i, step in enumerate(steps):
        back = [j for j, s in enumerate(steps[: i + 1]) if s <= step - patience]
        if back:
            window = values[back[-1] : i + 1]
            out.append(min(window) if fires_above else max(window))
    return (max(out) if fires_above else min(out)) if out else None


def margins(results: dict[str, dict[str, Any]]) -> str:
    """How close each healthy run came to each rule, on the number the rule reads, held over the rule's patience
    (the value closest to firing that held at every pass over that many steps; the thresholds are the defaults):
    the lowest layer entropy (collapse), the lowest layer entropy, raw and rollout (uniform: it fires when even
    that one stays near uniform, and stops forming), the highest artifact share of a middle or late layer
    (artifacts), the pointing game over its best so far (pointing), and a map's lead over the random map's
    deletion AUC while the score depends on the image (chance)."""
    t = AlertThresholds()
    lines = [
        f"| healthy run | collapse: lowest entropy (fires <= {t.collapse_entropy:g}) | uniform: lowest entropy "
        f"(fires >= {t.uniform_entropy:g}) | artifacts: share (fires >= {t.artifact_share:g}) | pointing: game / "
        f"best (fires < {1 - t.pointing_drop:g}) | chance: lead over random (fires < {t.chance_margin:g}) |",
        "|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        if result["expect"]:
            continue
        history = expand(result)[1:]
        steps, passes = [s for s, _ in history], [h for _, h in history]
        lowest = [min(v for k, v in h.items() if "_entropy/" in k) for h in passes]
        art = "background_share" if any("background_share" in k for k in passes[-1]) else "/share/"
        share = [max(v for k, v in h.items() if art in k and not k.endswith("layer_00")) for h in passes]
        games = [k for k in passes[-1] if "_pointing_game/" in k and not k.endswith("/raw")]
        ratio = [
            min(h[k] / max(p[k] for p in passes[: i + 1]) for k in games) if games else 1.0
            for i, h in enumerate(passes)
        ]
        auc = "attention_faithfulness/most_first_auc/"
        lead = [
            min(
                (h[auc + "random"] - v for k, v in h.items() if k.startswith(auc) and k != auc + "random"),
                default=math.inf,
            )
            if h.get("attention_faithfulness/score_drop/mean", 0.0) >= t.chance_min_drop
            else math.inf  # no verdict at this pass
            for h in passes
        ]
        values = [
            _sustained(steps, lowest, t.collapse_patience, False),
            _sustained(steps, lowest, t.uniform_patience, True),
            _sustained(steps, share, t.artifact_patience, True),
            _sustained(steps, ratio, t.pointing_patience, False) if games else None,
            _sustained(steps, lead, t.chance_patience, False) if auc + "random" in passes[-1] else None,
        ]
        cells = ["n/a" if v is None else "no verdict" if v == math.inf else f"{v:.3f}" for v in values]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def live_matches_replay(result: dict[str, Any]) -> bool:
    """Whether the callback's own alerts (first step per rule) are those the replay finds."""
    live: dict[str, int] = {}
    for rule, step in result["alerts"]:
        live.setdefault(rule, step)
    replayed = {r: s for r, s in replay(expand(result)).items() if isinstance(s, int)}
    return live == replayed


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="a smoke run: two short runs")
    parser.add_argument("--json", type=Path, default=None, help="write every run's scalar history and alerts here")
    parser.add_argument("--replay", type=Path, default=None, help="the table from a --json file, without training")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.replay is not None:
        results = json.loads(args.replay.read_text())["runs"]
    else:
        results, weights = {}, {}
        with tempfile.TemporaryDirectory() as root:
            for run in corpus(args.fast):
                start = time.perf_counter()
                results[run.name] = train(run, weights, Path(root))
                live = sorted({rule for rule, _ in results[run.name]["alerts"]})
                same = "" if live_matches_replay(results[run.name]) else " (NOT the replayed ones)"
                print(
                    f"{run.name}: {time.perf_counter() - start:.0f} s, alerts {live or 'none'}{same}", file=sys.stderr
                )
        if args.json is not None:
            args.json.write_text(json.dumps({"torch": torch.__version__, "runs": results}, indent=0) + "\n")
    print(table(results)[0])
    print()
    print(margins(results))
    return results


if __name__ == "__main__":
    main()
