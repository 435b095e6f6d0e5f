"""``lightning-attn``: render and compare attention maps from checkpoints, and replay a run's history.

    lightning-attn render  MODEL IMAGES... -o DIR
    lightning-attn compare MODEL_A MODEL_B IMAGES... -o DIR
    lightning-attn replay  LOGDIR -o DIR
    lightning-attn sanity  MODEL IMAGES... -o DIR

Each writes PNG files, a JSON file of the numbers and a one-page ``index.html``; see ``lightning-attn CMD --help``.
A bad input ends with one line naming the problem and the fix, and exit status 2 (``--debug`` shows the
traceback).
"""

from __future__ import annotations

import argparse
import html
import json
import math
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from .backends import backend_for, find_vision_transformers
from .diagnostics import attention_drift
from .layout import QUERIES
from .loading import find_images, load_checkpoint_state, load_model
from .maps import METHODS
from .options import ProbeOptions
from .probes import Probes, display_stats, load_images
from .render import make_grid, overlay, to_display
from .runner import Panel, ProbeRunner, redraw
from .sanity import sanity_check
from .writers.files import file_name, save_gif

__all__ = ["main"]

EXAMPLES = {
    "render": "lightning-attn render lightning_logs/version_0/checkpoints/last.ckpt --model-class my_project.LitViT "
    "photos/ -o maps/\n  lightning-attn render timm:vit_small_patch16_224 --pretrained cat.jpg dog.jpg -o maps/",
    "compare": "lightning-attn compare timm:vit_small_patch16_224 finetuned.ckpt --pretrained --model-class "
    "my_project.LitViT photos/ -o compare/",
    "replay": "lightning-attn replay lightning_logs/version_0 -o replay/",
    "sanity": "lightning-attn sanity lightning_logs/version_0/checkpoints/last.ckpt --model-class my_project.LitViT "
    "photos/ -o sanity/ --methods raw rollout grad_rollout relevance",
}


class UsageError(ValueError):
    """Bad input from the command line; printed as one line."""


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-class",
        help="the checkpoint's LightningModule as pkg.mod.Class (LightningCLI checkpoints name it themselves)",
    )
    parser.add_argument("--module", help="attribute path of the ViT inside the LightningModule when it holds several")
    parser.add_argument("--pretrained", action="store_true", help="load hub weights for a timm: model")


def _map_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=["raw", "rollout"], help="maps to draw")
    parser.add_argument("--layers", nargs="+", type=int, help="layer indices shown as columns (default all)")
    parser.add_argument("--head-fusion", choices=("mean", "max", "min"), default="mean")
    parser.add_argument("--discard-ratio", type=float, default=0.0)
    parser.add_argument("--query", choices=QUERIES, default="auto")
    parser.add_argument("--target", type=int, help="class explained by grad_rollout/relevance (default: predicted)")
    parser.add_argument("--tile-size", type=int, default=96)
    parser.add_argument("--cmap", default="jet")
    parser.add_argument("--device", default="cpu", help="e.g. cpu, cuda, cuda:1")
    parser.add_argument("--batch-size", type=int, default=16, help="images per probe pass")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-attn",
        description="Render, compare and replay ViT attention maps.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  " + "\n  ".join(EXAMPLES.values()),
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    render = sub.add_parser(
        "render",
        help="attention grids and scalars of one model on image files",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  " + EXAMPLES["render"],
        description="MODEL: a Lightning checkpoint (.ckpt), timm:<name>, or a Hugging Face folder.",
    )
    render.add_argument("model")
    render.add_argument("images", nargs="+", help="image files or folders")
    render.add_argument("-o", "--output", required=True, help="folder for the PNGs, scalars.json and index.html")
    _model_arguments(render)
    _map_arguments(render)
    compare = sub.add_parser(
        "compare",
        help="side-by-side rollout and per-layer drift of two models",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  " + EXAMPLES["compare"],
        description="e.g. the pretrained model against the fine-tuned checkpoint.",
    )
    compare.add_argument("model_a")
    compare.add_argument("model_b")
    compare.add_argument("images", nargs="+", help="image files or folders")
    compare.add_argument("-o", "--output", required=True)
    _model_arguments(compare)
    _map_arguments(compare)
    replay = sub.add_parser(
        "replay",
        help="filmstrip and evolution GIFs of a run, from its checkpoint, no model",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  " + EXAMPLES["replay"],
    )
    replay.add_argument("logdir", help="a run's log folder (its newest .ckpt is read) or a .ckpt file")
    replay.add_argument("-o", "--output", required=True)
    sanity = _sanity_parser(sub)
    for command in (render, compare, replay, sanity):
        # SUPPRESS: a subcommand's default must not undo `lightning-attn --debug CMD`
        command.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error"
        )
    replay.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    return parser


# ----------------------------------------------------------------------------- shared steps


def _vit(spec: str, args: argparse.Namespace) -> nn.Module:
    root = load_model(spec, model_class=args.model_class, pretrained=args.pretrained)
    if args.module:
        try:
            root = root.get_submodule(args.module)
        except AttributeError as err:
            raise UsageError(f"`--module {args.module}` is not a submodule of {type(root).__name__}: {err}") from None
    found = find_vision_transformers(root)
    if len(found) == 1:
        return found[0][1]
    if not found:
        backend_for(root)  # raises with what is supported
    names = [n or "<the model>" for n, _ in found]
    raise UsageError(f"{spec} holds several ViTs {names}: pass `--module {names[-1]}`")


def _options(args: argparse.Namespace, **extra: Any) -> ProbeOptions:
    return ProbeOptions(
        methods=tuple(args.methods),
        layers=args.layers,
        head_fusion=args.head_fusion,
        discard_ratio=args.discard_ratio,
        query=args.query,
        tile_size=args.tile_size,
        cmap=args.cmap,
        **extra,
    )


def _batches(args: argparse.Namespace, model: nn.Module) -> tuple[list[Path], list[Tensor]]:
    if args.batch_size < 1:
        raise UsageError(f"`--batch-size` must be >= 1, got {args.batch_size}")
    paths = find_images(args.images)
    transform = backend_for(model).transform()
    batches = []
    for start in range(0, len(paths), args.batch_size):
        chunk = paths[start : start + args.batch_size]
        try:
            batches.append(load_images(chunk, transform))
        except (OSError, ValueError) as err:
            raise UsageError(f"cannot read an image among {[str(p) for p in chunk]}: {err}") from None
    return paths, batches


def _device(model: nn.Module, device: str) -> nn.Module:
    try:
        return model.to(torch.device(device))
    except (RuntimeError, AssertionError) as err:
        raise UsageError(f"cannot use device {device!r} ({err}): pass `--device cpu`") from None


def _progress(items: Sequence[Any], quiet: bool, what: str) -> Any:
    if quiet or len(items) < 2:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=what, unit="batch", file=sys.stderr)


def _save(panel: Panel, directory: Path, suffix: str = "") -> str:
    name = file_name(panel.tag) + suffix + ".png"
    Image.fromarray(panel.image).save(directory / name)
    return name


def _index(
    directory: Path,
    title: str,
    pictures: list[tuple[str, str]],
    tables: list[tuple[str, list[list[Any]]]],
    tables_first: bool = False,
) -> None:
    """A one-page ``index.html``: the pictures, and the tables (folded unless ``tables_first``)."""
    parts = [
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}img{max-width:100%;image-rendering:pixelated}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}summary{cursor:pointer;font-size:1.3em}</style>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    folded = []
    for caption, rows in tables:
        body = ["<table>"]
        for i, row in enumerate(rows):
            cell = "th" if i == 0 else "td"
            body.append("<tr>" + "".join(f"<{cell}>{html.escape(str(v))}</{cell}>" for v in row) + "</tr>")
        body.append("</table>")
        if tables_first:
            parts += [f"<h2>{html.escape(caption)}</h2>", *body]
        else:
            folded += [f"<details><summary>{html.escape(caption)}</summary>", *body, "</details>"]
    for caption, name in pictures:
        parts.append(f"<h2>{html.escape(caption)}</h2><img src='{html.escape(name)}' alt='{html.escape(caption)}'>")
    (directory / "index.html").write_text("\n".join(parts + folded) + "\n")


# ----------------------------------------------------------------------------- commands


def render(args: argparse.Namespace) -> int:
    model = _device(_vit(args.model, args), args.device)
    options = _options(args, diagnostics=True, head_layers=(-1,))
    paths, batches = _batches(args, model)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    pictures: list[tuple[str, str]] = []
    results: list[dict[str, Any]] = []
    for index, images in enumerate(_progress(batches, args.quiet, "render")):
        labels = None if args.target is None else torch.full((images.shape[0],), args.target)
        runner = ProbeRunner(model, Probes(images, labels), options, first_index=index * args.batch_size)
        result = runner.run(step=0, history_panels=False)
        chunk = paths[index * args.batch_size : index * args.batch_size + images.shape[0]]
        for panel in result.panels:
            pictures.append((f"{panel.tag} (images {index * args.batch_size}..)", _save(panel, out, f"_{index:03d}")))
        results.append({"images": [str(p) for p in chunk], "scalars": result.scalars})
    (out / "scalars.json").write_text(json.dumps({"model": args.model, "batches": results}, indent=1) + "\n")
    scalars = sorted(results[0]["scalars"].items())
    _index(
        out,
        f"lightning-attn render {args.model}",
        pictures,
        [("scalars (first batch, means over its images)", [["tag", "value"], *[[k, f"{v:.4f}"] for k, v in scalars]])],
    )
    print(f"wrote {len(pictures)} PNG files, scalars.json and index.html to {out}")
    return 0


def compare(args: argparse.Namespace) -> int:
    model_a = _device(_vit(args.model_a, args), args.device)
    model_b = _device(_vit(args.model_b, args), args.device)
    options = _options(args, diagnostics=False, head_layers=(), aggregates=())
    paths, batches = _batches(args, model_a)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    drift_sum: dict[str, np.ndarray] = {}
    pictures = []
    for index, images in enumerate(_progress(batches, args.quiet, "compare")):
        a = ProbeRunner(model_a, Probes(images), options)
        b = ProbeRunner(model_b, Probes(images), options)
        maps_a, _ = a.compute()
        maps_b, _ = b.compute()
        for method in options.methods:
            if maps_a[method].shape != maps_b[method].shape:
                raise UsageError(
                    f"the models' maps differ in shape ({tuple(maps_a[method].shape)} vs "
                    f"{tuple(maps_b[method].shape)}): compare models of one architecture and input size"
                )
            drift = attention_drift(maps_b[method], maps_a[method].to(maps_b[method].device))  # (L,)
            drift_sum[method] = drift_sum.get(method, 0) + drift.cpu().double().numpy() * images.shape[0]
        film = options.film_method
        both = torch.cat([maps_a[film][:, a.layers], maps_b[film][:, b.layers].to(maps_a[film].device)], dim=1)
        tiles = overlay(a.display(), both, options.tile_size, options.cmap, options.alpha)
        header = ["image"] + [f"A L{l}" for l in a.layers] + [f"B L{l}" for l in b.layers]
        rows = [f"#{index * args.batch_size + i}" for i in range(images.shape[0])]
        panel = Panel(f"compare/{film}", make_grid(tiles, header, rows), rows)
        pictures.append(
            (f"{film}: A (left) and B (right), images {index * args.batch_size}..", _save(panel, out, f"_{index:03d}"))
        )
    count = len(paths)
    table: list[dict[str, Any]] = []
    for method, total in drift_sum.items():
        for layer, value in enumerate(total / count):
            table.append({"method": method, "layer": layer, "drift": float(value)})
    table.sort(key=lambda row: -row["drift"])  # the layers that moved most first
    (out / "drift.json").write_text(
        json.dumps({"model_a": args.model_a, "model_b": args.model_b, "images": count, "drift": table}, indent=1) + "\n"
    )
    lines = ["| method | layer | drift (JSD, bits) |", "|---|---|---|"]
    lines += [f"| {row['method']} | {row['layer']} | {row['drift']:.4f} |" for row in table]
    print("\n".join(lines))
    (out / "drift.md").write_text("\n".join(lines) + "\n")
    _index(
        out,
        f"lightning-attn compare {args.model_a} {args.model_b}",
        pictures,
        [
            (
                "drift from A to B per layer, most first (Jensen–Shannon divergence, bits, mean over images)",
                [["method", "layer", "drift"], *[[r["method"], r["layer"], f"{r['drift']:.4f}"] for r in table]],
            )
        ],
        tables_first=True,
    )
    return 0


def _states_in(checkpoint: Path) -> list[tuple[str, dict[str, Any]]]:
    callbacks = load_checkpoint_state(checkpoint).get("callbacks") or {}
    return [
        (key, state["runner"])
        for key, state in callbacks.items()
        if isinstance(state, dict) and isinstance(state.get("runner"), dict)
    ]


def _monitor_states(path: Path) -> tuple[Path, list[tuple[str, dict[str, Any]]]]:
    """The newest checkpoint under ``path`` (or ``path`` itself) that holds AttentionMonitor state."""
    if path.is_dir():
        checkpoints = sorted(path.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
        if not checkpoints:
            raise UsageError(f"no checkpoint (.ckpt) under {path}: enable Lightning's checkpointing, or pass a .ckpt")
    elif path.is_file():
        checkpoints = [path]
    else:
        raise UsageError(f"{str(path)!r} does not exist: pass a run's log folder or a .ckpt file")
    for checkpoint in checkpoints:
        states = _states_in(checkpoint)
        if states:
            return checkpoint, states
    names = ", ".join(c.name for c in checkpoints[:3])
    raise UsageError(f"no AttentionMonitor state in {names}: was the monitor among the run's callbacks?")


def replay(args: argparse.Namespace) -> int:
    checkpoint, states = _monitor_states(Path(args.logdir))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    pictures = []
    for _, state in states:
        try:
            strip, animations = redraw(state)
        except ValueError as err:
            raise UsageError(str(err)) from None
        pictures.append((strip.tag, _save(strip, out)))
        for tag, frames in animations.items():
            name = file_name(tag) + ".gif"
            save_gif(frames, out / name)
            pictures.append((tag, name))
    _index(out, f"lightning-attn replay {checkpoint}", pictures, [])
    print(f"wrote {len(pictures)} files from {checkpoint} to {out}")
    return 0


def _sanity_parser(sub: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        "sanity",
        help="model-randomisation sanity check: how much of each map survives random weights",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  " + EXAMPLES["sanity"],
        description="MODEL as for render. Re-initialises the blocks of a copy of the model from the top down (and "
        "each alone) and writes the Spearman correlation between the trained and the randomised final maps "
        "(sanity.json, sanity_independent.json), the maps per step (sanity.png) and index.html. A method whose "
        "correlations stay near 1 shows the image, not the model (Adebayo et al. 2018).",
    )
    parser.add_argument("model")
    parser.add_argument("images", nargs="+", help="image files or folders")
    parser.add_argument("-o", "--output", required=True, help="folder for sanity.json, sanity.png and index.html")
    parser.add_argument("--seed", type=int, default=0, help="block i is drawn under torch.manual_seed(seed + i)")
    _model_arguments(parser)
    _map_arguments(parser)
    return parser


def sanity(args: argparse.Namespace) -> int:
    model = _device(_vit(args.model, args), args.device)
    paths, batches = _batches(args, model)
    images = torch.cat(batches)
    target = None if args.target is None else torch.full((images.shape[0],), args.target)
    check = sanity_check(
        model,
        images,
        methods=args.methods,
        target=target,
        seed=args.seed,
        head_fusion=args.head_fusion,
        discard_ratio=args.discard_ratio,
        query=args.query,
    )
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sanity.json").write_text(json.dumps(check.to_json("cascading"), indent=1) + "\n")
    (out / "sanity_independent.json").write_text(json.dumps(check.to_json("independent"), indent=1) + "\n")
    display = to_display(images, *display_stats(model))
    picture, _ = check.picture(display, args.tile_size, args.cmap)
    Image.fromarray(picture).save(out / "sanity.png")
    tables = []
    for kind in ("cascading", "independent"):
        values = getattr(check, kind)
        rows = [[m, *("—" if math.isnan(v) else f"{v:.3f}" for v in values[m])] for m in check.methods]
        tables.append(
            (
                f"{kind} randomisation: Spearman correlation with the trained model's final map, mean over "
                f"{len(paths)} images",
                [["method", *check.step_labels(kind)], *rows],
            )
        )
    _index(
        out,
        f"lightning-attn sanity {args.model}",
        [("trained and randomised final maps (columns: blocks randomised from the top)", "sanity.png")],
        tables,
        tables_first=True,
    )
    print(check.table())
    if check.kept:
        print(f"kept their trained values (no initialisation for them): {', '.join(check.kept)}")
    print(f"wrote sanity.json, sanity_independent.json, sanity.png and index.html to {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return {"render": render, "compare": compare, "replay": replay, "sanity": sanity}[args.command](args)
    except (ValueError, OSError) as err:  # bad input: one line, the fix in it
        if args.debug:
            traceback.print_exc()
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"lightning-attn {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
