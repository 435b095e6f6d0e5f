"""The example's findings across seeds: train ``train_vit.py`` with several seeds and print every figure the docs
quote as mean ± standard deviation, then the model-randomisation sanity check of each trained model.

::

    python examples/findings.py --seeds 0 1 2 --threads 1 --out findings_runs --docs docs

One run of the example per seed (a few minutes each on an idle 2-core machine), one after the other; a seed whose
run already finished under ``--out`` (its ``result.json`` and ``model.pt``) is read back instead of trained again,
so an interrupted sweep resumes and the tables can be reprinted. What it prints:

* the pointing game and the Jaccard index (``attention_pointing_game/<method>``, ``attention_jaccard/<method>``)
  at the first, second and last logged steps, and the deletion AUCs (most / least important first, with the
  random map's), mean ± sample standard deviation over the seeds;
* each seed's last-step figures, so a conclusion can be checked seed by seed;
* the cascading and independent randomisation (:func:`lightning_attn.sanity_check`) of every seed's trained model
  on its 8 probes, explaining their labels: Spearman correlation between each method's final map and the map after
  randomising the top block, the top two, ..., every block (and each block alone), mean ± std over the seeds.

The same seed gives other numbers on another machine or thread count: float sums depend on how a CPU kernel splits
them, and the rounding differences grow through training. Hence the spread over seeds, not one run's digits.
``--docs docs`` also saves the first seed's sanity picture (``example_sanity.png``). ``--fast`` is a smoke run
(the example's ``--fast``, 4 probes) used by the tests.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

import timm.data
import torch
from PIL import Image

from lightning_attn.render import to_display

import train_vit
from shapes import make_probes

METHODS = ("raw", "rollout", "grad_rollout", "relevance")
#: the scalars read from each run's event file: (label in the tables, tag prefix)
FIGURES = (
    ("pointing game", "attention_pointing_game"),
    ("Jaccard", "attention_jaccard"),
    ("deletion AUC, most important first (lower = more faithful)", "attention_faithfulness/most_first_auc"),
    ("deletion AUC, least important first (higher = more faithful)", "attention_faithfulness/least_first_auc"),
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="The example's figures as mean ± std over seeds, and its sanity check.")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="default: %(default)s")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads of each run; one is the fastest on a loaded machine (default: %(default)s)",
    )
    p.add_argument("--out", type=Path, default=Path("findings_runs"), help="one folder per seed (default: %(default)s)")
    p.add_argument("--fast", action="store_true", help="smoke run: the example's --fast, 4 probes")
    p.add_argument(
        "--docs",
        type=Path,
        default=None,
        help="save the first seed's sanity picture (its first 4 probes, one per class) as example_sanity.png here",
    )
    return p.parse_args(argv)


def _run_argv(args: argparse.Namespace, seed: int, folder: Path) -> list[str]:
    argv = ["--seed", str(seed), "--threads", str(args.threads), "--logdir", str(folder / "logs")]
    return argv + (["--fast", "--probes", "4"] if args.fast else [])


def read_scalars(log_dir: str | Path) -> dict[str, dict[int, float]]:
    """Every ``attention_*`` and ``val/acc`` scalar of a run's event file: ``{tag: {step: value}}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = [t for t in acc.Tags()["scalars"] if t.startswith("attention_") or t == "val/acc"]
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in tags}


def train(args: argparse.Namespace, seed: int) -> Path:
    """Run the example for ``seed`` unless its result is already under ``--out``; return its folder."""
    folder = args.out / f"seed{seed}"
    if (folder / "result.json").is_file() and (folder / "model.pt").is_file():
        print(f"seed {seed}: read back from {folder}")
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    argv = _run_argv(args, seed, folder)
    trainer = train_vit.main(argv)
    result = {"argv": argv, "scalars": read_scalars(trainer.log_dir)}
    torch.save(trainer.lightning_module.state_dict(), folder / "model.pt")
    (folder / "result.json").write_text(json.dumps(result))
    return folder


def load(folder: Path) -> tuple[dict, train_vit.ViTClassifier, argparse.Namespace]:
    """A finished seed's scalars, its trained model (eval mode) and the example's arguments it ran with."""
    result = json.loads((folder / "result.json").read_text())
    result["scalars"] = {t: {int(s): v for s, v in values.items()} for t, values in result["scalars"].items()}
    run = train_vit.parse_args(result["argv"])
    module = train_vit.ViTClassifier(
        run.model, len(train_vit.CLASSES), img_size=run.img_size, patch_size=run.patch_size, depth=run.depth
    )
    module.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
    return result, module.eval(), run


def mean_std(values: Sequence[float]) -> str:
    """``"0.512 ± 0.034"``: mean and sample standard deviation (n - 1); ``"—"`` without values."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "—"
    spread = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.fmean(values):.3f} ± {spread:.3f}"


def figures_table(results: list[dict]) -> str:
    """One row per method (and the random map), one column per figure and step: mean ± std over the seeds."""
    first = results[0]["scalars"]
    steps = sorted(first.get(f"attention_pointing_game/{METHODS[0]}", {}))
    picked = steps[:2] + steps[-1:] if len(steps) > 2 else steps
    head = " / ".join(map(str, picked))
    lines = [
        "| method | " + " | ".join(f"{label}: step {head}" for label, _ in FIGURES) + " |",
        "|---|" + "---|" * len(FIGURES),
    ]
    for method in (*METHODS, "random"):
        cells = []
        for _, prefix in FIGURES:
            series = [r["scalars"].get(f"{prefix}/{method}", {}) for r in results]
            if not any(series):
                cells.append(" / ".join("—" for _ in picked))
                continue
            cells.append(" / ".join(mean_std([s.get(step, math.nan) for s in series]) for step in picked))
        lines.append(f"| {'random map' if method == 'random' else method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _last(scalars: dict[str, dict[int, float]], tag: str) -> float:
    return scalars[tag][max(scalars[tag])] if scalars.get(tag) else math.nan


def per_seed_table(seeds: Sequence[int], results: list[dict]) -> str:
    """Each seed's last-step figures and validation accuracy, to check a conclusion seed by seed."""
    names = ", ".join(METHODS) + "; random map where logged"
    lines = ["| seed | val acc | " + " | ".join(f"{label} ({names})" for label, _ in FIGURES) + " |"]
    lines.append("|---|---|" + "---|" * len(FIGURES))
    for seed, result in zip(seeds, results):
        scalars = result["scalars"]
        cells = [
            ", ".join(
                f"{_last(scalars, f'{prefix}/{m}'):.3f}" for m in (*METHODS, "random") if f"{prefix}/{m}" in scalars
            )
            for _, prefix in FIGURES
        ]
        lines.append(f"| {seed} | {_last(scalars, 'val/acc'):.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sanity_tables(models: list[tuple[train_vit.ViTClassifier, argparse.Namespace]], docs: Path | None = None) -> str:
    """The cascading and independent randomisation of each seed's model on its probes: mean ± std over seeds;
    with ``docs``, the first seed's picture as ``example_sanity.png`` there."""
    from lightning_attn import sanity_check

    checks = []
    for module, run in models:
        cfg = timm.data.resolve_data_config({"input_size": (3, run.img_size, run.img_size)}, model=module.model)
        images, labels, _ = make_probes(run.probes, run.img_size, seed=run.seed, mean=cfg["mean"], std=cfg["std"])
        checks.append(sanity_check(module.model, images, methods=METHODS, target=labels, independent=True))
        if docs is not None and len(checks) == 1:
            display = to_display(images, cfg["mean"], cfg["std"])
            picture, _ = checks[0].picture(display, tile_size=64, images=range(min(4, len(images))))
            docs.mkdir(parents=True, exist_ok=True)
            Image.fromarray(picture).save(docs / "example_sanity.png")
            print(f"wrote {docs / 'example_sanity.png'}")
    out = []
    for kind in ("cascading", "independent"):
        steps = checks[0].step_labels(kind)
        lines = [f"| {kind}: method | " + " | ".join(steps) + " |", "|---|" + "---|" * len(steps)]
        for method in METHODS:
            columns = zip(*(getattr(c, kind)[method] for c in checks))
            lines.append(f"| {method} | " + " | ".join(mean_std(list(v)) for v in columns) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def main(argv: Sequence[str] | None = None) -> str:
    """Train (or read back) every seed and return the printed tables."""
    args = parse_args(argv)
    folders = [train(args, seed) for seed in args.seeds]
    loaded = [load(folder) for folder in folders]
    results = [result for result, _, _ in loaded]
    n = len(args.seeds)
    text = "\n\n".join(
        [
            f"Figures of the example over {n} seeds ({', '.join(map(str, args.seeds))}), mean ± sample std, "
            f"--threads {args.threads}{' --fast' if args.fast else ''}, torch {torch.__version__}:",
            figures_table(results),
            "Each seed at the last step:",
            per_seed_table(args.seeds, results),
            "Sanity check of each trained model (Spearman correlation with the trained model's final map, mean over "
            "the probes; mean ± std over seeds):",
            sanity_tables([(module, run) for _, module, run in loaded], args.docs),
        ]
    )
    print("\n" + text)
    return text


if __name__ == "__main__":
    main()
