"""``lightning-attn``: render and compare attention maps from checkpoints, and replay a run's history.

    lightning-attn render  MODEL IMAGES... -o DIR
    lightning-attn compare MODEL_A MODEL_B IMAGES... -o DIR
    lightning-attn replay  LOGDIR -o DIR
    lightning-attn report  LOGDIR -o FILE.html   (or MODEL IMAGES... -o FILE.html)
    lightning-attn sanity  MODEL IMAGES... -o DIR

The first three write PNG files, a JSON file of the numbers and a one-page ``index.html``; ``report`` writes one
self-contained interactive page (:mod:`lightning_attn.html_report`); see ``lightning-attn CMD --help``.
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
from typing import TYPE_CHECKING, Any

# torch, Lightning and the modules built on them are imported by the commands that use them: `--help` and a bad
# argument answer at once
from .names import DEFAULT_COLOUR_RANGE, METHODS, PREDICTIONS, QUERIES, SCALES

if TYPE_CHECKING:
    from torch import Tensor, nn

    from .options import ProbeOptions
    from .runner import Panel

__all__ = ["main"]

EXAMPLES = {
    "render": "lightning-attn render lightning_logs/version_0/checkpoints/last.ckpt --model-class my_project.LitViT "
    "photos/ -o maps/\n  lightning-attn render timm:vit_small_patch16_224 --pretrained cat.jpg dog.jpg -o maps/",
    "compare": "lightning-attn compare timm:vit_small_patch16_224 finetuned.ckpt --pretrained --model-class "
    "my_project.LitViT photos/ -o compare/",
    "replay": "lightning-attn replay lightning_logs/version_0 -o replay/",
    "report": "lightning-attn report lightning_logs/version_0 -o report.html\n  lightning-attn report "
    "timm:vit_small_patch16_224 --pretrained cat.jpg dog.jpg -o report.html",
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
    _trust_argument(parser)


def _trust_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="load checkpoints that hold more than tensors and plain values: a pickle, which can run code; "
        "only for files from a source you trust (default: refused)",
    )


def _map_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=["raw", "rollout"], help="maps to draw")
    parser.add_argument("--layers", nargs="+", type=int, help="layer indices shown as columns (default all)")
    parser.add_argument("--head-fusion", choices=("mean", "max", "min"), default="mean")
    parser.add_argument("--discard-ratio", type=float, default=0.0)
    parser.add_argument("--query", choices=QUERIES, default="auto")
    parser.add_argument("--target", type=int, help="class explained by grad_rollout/relevance (default: predicted)")
    parser.add_argument("--tile-size", type=int, default=96)
    parser.add_argument("--cmap", default="jet")
    parser.add_argument(
        "--scale",
        choices=SCALES,
        default="relative",
        help="heatmap colours: share vs uniform on one log scale for every tile (relative), or each tile stretched",
    )
    parser.add_argument(
        "--colour-range", type=float, default=DEFAULT_COLOUR_RANGE, help="relative scale: 1/R to R times uniform"
    )
    parser.add_argument(
        "--predictions",
        choices=PREDICTIONS,
        default="always",
        help="name each image's predicted class on its row when the model has class logits (default: always)",
    )
    parser.add_argument("--device", default="cpu", help="e.g. cpu, cuda, cuda:1")
    parser.add_argument("--batch-size", type=int, default=16, help="images per probe pass")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--class-names",
        nargs="+",
        metavar="NAME",
        help="one name per class, in class-index order, or a text file with one per line: shown instead of indices",
    )


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
    _trust_argument(replay)
    sanity = _sanity_parser(sub)
    for command in (render, compare, replay, sanity):
        # SUPPRESS: a subcommand's default must not undo `lightning-attn --debug CMD`
        command.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error"
        )
    replay.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    _report_parser(sub)
    return parser


# ----------------------------------------------------------------------------- shared steps


def _vit(spec: str, args: argparse.Namespace) -> nn.Module:
    from .backends import backend_for, find_vision_transformers
    from .loading import load_model

    root = load_model(
        spec, model_class=args.model_class, pretrained=args.pretrained, trust_checkpoint=args.trust_checkpoint
    )
    if spec.startswith("timm:") and not args.pretrained:
        # maps of an untrained model look like something: say what they are, here and on the page
        _note(args, f"{spec} has random weights (no `--pretrained`): its maps show an untrained model")
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


def _note(args: argparse.Namespace, text: str) -> None:
    """Say ``text`` at the top of the page and, once the command succeeded, on stderr (an error stays one line)."""
    args.notes = [*getattr(args, "notes", []), text]


def _class_names(args: argparse.Namespace) -> tuple[str, ...] | None:
    names = args.class_names
    if names and len(names) == 1 and Path(names[0]).is_file():
        names = [line.strip() for line in Path(names[0]).read_text().splitlines() if line.strip()]
    return tuple(names) if names else None


def _image_table(paths: list[Path], predicted: list[int] | None, names: Sequence[str] | None) -> list[list[Any]]:
    """The page's table of images: the number on the rows of the pictures, the file, the predicted class."""
    rows: list[list[Any]] = [["#", "file", *(["predicted"] if predicted is not None else [])]]
    for i, path in enumerate(paths):
        row: list[Any] = [f"#{i}", str(path)]
        if predicted is not None:
            k = predicted[i]
            row.append(f"{names[k]} ({k})" if names is not None and 0 <= k < len(names) else k)
        rows.append(row)
    return rows


def _options(args: argparse.Namespace, **extra: Any) -> ProbeOptions:
    from .options import ProbeOptions

    return ProbeOptions(
        class_names=_class_names(args),
        methods=tuple(args.methods),
        layers=args.layers,
        head_fusion=args.head_fusion,
        discard_ratio=args.discard_ratio,
        query=args.query,
        tile_size=args.tile_size,
        cmap=args.cmap,
        scale=args.scale,
        colour_range=args.colour_range,
        predictions=args.predictions,
        **extra,
    )


def _batches(args: argparse.Namespace, model: nn.Module) -> tuple[list[Path], list[Tensor]]:
    from .backends import backend_for
    from .loading import find_images
    from .probes import load_images

    if args.batch_size < 1:
        raise UsageError(f"`--batch-size` must be >= 1, got {args.batch_size}")
    paths = find_images(args.images)
    transform = backend_for(model).transform()
    batches = []
    for start in range(0, len(paths), args.batch_size):
        chunk = paths[start : start + args.batch_size]
        try:
            batches.append(load_images(chunk, transform))
        except (OSError, ValueError) as err:  # names the file
            raise UsageError(str(err)) from None
    return paths, batches


def _device(model: nn.Module, device: str) -> nn.Module:
    import torch

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
    from PIL import Image

    from .writers.files import file_name

    name = file_name(panel.tag) + suffix + ".png"
    Image.fromarray(panel.image).save(directory / name)
    return name


def _index(
    directory: Path,
    title: str,
    pictures: list[tuple[str, str]],
    tables: list[tuple[str, list[list[Any]]]],
    tables_first: bool = False,
    notes: Sequence[str] = (),
) -> None:
    """A one-page ``index.html``: the notes, the pictures, and the tables (folded unless ``tables_first``)."""
    parts = [
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}img{max-width:100%;image-rendering:pixelated}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}summary{cursor:pointer;font-size:1.3em}"
        ".note{background:#fff3cd;padding:4px 8px}</style>",
        f"<h1>{html.escape(title)}</h1>",
        *[f"<p class='note'><strong>note:</strong> {html.escape(note)}</p>" for note in notes],
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
    import torch

    from .backends import backend_for
    from .probes import Probes
    from .runner import ProbeRunner

    model = _device(_vit(args.model, args), args.device)
    options = _options(args, diagnostics=True, head_layers=(-1,))
    classes = backend_for(model).num_classes
    if args.target is not None and (args.target < 0 or (classes is not None and args.target >= classes)):
        known = f"{args.model} has {classes} classes (0..{classes - 1})" if classes else "class indices are >= 0"
        raise UsageError(
            f"`--target {args.target}` is out of range: {known}; pass a class index, or leave it out to explain "
            "each image's predicted class"
        )
    paths, batches = _batches(args, model)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    pictures: list[tuple[str, str]] = []
    results: list[dict[str, Any]] = []
    predicted: list[int] | None = []
    for index, images in enumerate(_progress(batches, args.quiet, "render")):
        labels = None if args.target is None else torch.full((images.shape[0],), args.target)
        runner = ProbeRunner(model, Probes(images, labels), options, first_index=index * args.batch_size)
        result = runner.run(step=0, history_panels=False)
        chunk = paths[index * args.batch_size : index * args.batch_size + images.shape[0]]
        for panel in result.panels:
            pictures.append((f"{panel.tag} (images {index * args.batch_size}..)", _save(panel, out, f"_{index:03d}")))
        results.append({"images": [str(p) for p in chunk], "scalars": result.scalars})
        logits = result.maps.logits
        predicted = None if logits is None or predicted is None else predicted + logits.argmax(-1).tolist()
    (out / "scalars.json").write_text(json.dumps({"model": args.model, "batches": results}, indent=1) + "\n")
    scalars = sorted(results[0]["scalars"].items())
    _index(
        out,
        f"lightning-attn render {args.model}",
        pictures,
        [
            ("images (the numbers on the rows)", _image_table(paths, predicted, options.class_names)),
            (
                "scalars (first batch, means over its images)",
                [["tag", "value"], *[[k, f"{v:.4f}"] for k, v in scalars]],
            ),
        ],
        notes=getattr(args, "notes", ()),
    )
    print(f"wrote {len(pictures)} PNG files, scalars.json and index.html to {out}")
    return 0


def compare(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from .diagnostics import attention_drift
    from .probes import Probes
    from .runner import Panel, ProbeRunner, overlay_grid

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
        header = ["image"] + [f"A L{l}" for l in a.layers] + [f"B L{l}" for l in b.layers]
        rows = [f"#{index * args.batch_size + i}" for i in range(images.shape[0])]
        panel = Panel(f"compare/{film}", overlay_grid(a.display(), both, header, rows, options.render), rows)
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
            ),
            ("images (the numbers on the rows)", _image_table(paths, None, None)),
        ],
        tables_first=True,
        notes=getattr(args, "notes", ()),
    )
    return 0


def _states_in(checkpoint: Path, trust_checkpoint: bool) -> list[tuple[str, dict[str, Any]]]:
    from .loading import load_checkpoint_state

    callbacks = load_checkpoint_state(checkpoint, trust_checkpoint=trust_checkpoint).get("callbacks") or {}
    return [
        (key, state)
        for key, state in callbacks.items()
        if isinstance(state, dict) and isinstance(state.get("runner"), dict)
    ]


def _monitor_states(path: Path, trust_checkpoint: bool) -> tuple[Path, list[tuple[str, dict[str, Any]]]]:
    """The newest checkpoint under ``path`` (or ``path`` itself) that holds AttentionMonitor state, and each
    monitor's state in it (its runner's under ``"runner"``, its alerts under ``"alerts"``); in a folder, unreadable
    or refused checkpoints are skipped with a note."""
    if path.is_dir():
        checkpoints = sorted(path.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
        if not checkpoints:
            raise UsageError(f"no checkpoint (.ckpt) under {path}: enable Lightning's checkpointing, or pass a .ckpt")
    elif path.is_file():
        checkpoints = [path]
    else:
        raise UsageError(f"{str(path)!r} does not exist: pass a run's log folder or a .ckpt file")
    skipped: list[ValueError] = []
    for checkpoint in checkpoints:
        try:
            states = _states_in(checkpoint, trust_checkpoint)
        except ValueError as err:
            if path.is_file():
                raise
            skipped.append(err)  # a file cut short by a crash, or refused: an older one beside it may do
            continue
        if states:
            for reason in skipped:
                print(f"lightning-attn replay: note: skipped a newer checkpoint: {reason}", file=sys.stderr)
            return checkpoint, states
    if skipped and len(skipped) == len(checkpoints):
        raise skipped[0]
    names = ", ".join(c.name for c in checkpoints[:3])
    raise UsageError(f"no AttentionMonitor state in {names}: was the monitor among the run's callbacks?")


def replay(args: argparse.Namespace) -> int:
    from .runner import redraw
    from .writers.files import file_name, save_gif

    checkpoint, states = _monitor_states(Path(args.logdir), args.trust_checkpoint)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    pictures = []
    for _, state in states:
        try:
            strip, animations = redraw(state["runner"])
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


def _report_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "report",
        help="one interactive HTML page of a run (step slider, click a patch, heads, curves) or of a model on images",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  " + EXAMPLES["report"],
        description="SOURCE: a run's log folder (its newest .ckpt holding AttentionMonitor state is read, no model "
        "needed) or a .ckpt file; with IMAGES, a model (a Lightning checkpoint, timm:<name>, a Hugging Face folder) "
        "run once on them. One self-contained file: no network reference, opens from disk.",
    )
    parser.add_argument("source")
    parser.add_argument("images", nargs="*", help="image files or folders: SOURCE is then a model")
    parser.add_argument("-o", "--output", required=True, help="the HTML file (one per monitor when a run has several)")
    parser.add_argument(
        "--report-layers",
        nargs="+",
        type=int,
        help="with a model: layers whose patch rows it keeps (default all)",
    )
    parser.add_argument("--head-layers", nargs="+", type=int, default=[-1], help="with a model: layers shown per head")
    parser.add_argument("--title", help="the page's title (default: the command)")
    _model_arguments(parser)
    _map_arguments(parser)
    parser.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error"
    )


def report(args: argparse.Namespace) -> int:
    import torch

    from .backends import backend_for
    from .html_report import report_html
    from .probes import Probes
    from .runner import ProbeRunner

    out = Path(args.output)
    if out.suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"`-o {out}` must name an .html file (e.g. -o report.html)")
    pages: list[tuple[str, str]] = []  # (runner prefix, page)
    if args.images:
        model = _device(_vit(args.source, args), args.device)
        # asked for a report of this model: every layer by default, whatever it costs
        layers = args.report_layers or range(len(backend_for(model).attention_layers()))
        options = _options(args, diagnostics=True, head_layers=tuple(args.head_layers), report_layers=tuple(layers))
        _, batches = _batches(args, model)
        runner = ProbeRunner(model, Probes(torch.cat(batches)), options)
        runner.run(step=0, render=False)
        title = args.title or f"lightning-attn report {args.source}"
        pages.append((runner.prefix, report_html(runner.state_dict(), title=title)))
    else:
        checkpoint, states = _monitor_states(Path(args.source), args.trust_checkpoint)
        for _, state in states:
            runner_state = state["runner"]
            title = args.title or f"lightning-attn report {checkpoint}"
            try:
                page = report_html(runner_state, (state.get("alerts") or {}).get("alerts") or [], title)
            except ValueError as err:
                raise UsageError(str(err)) from None
            pages.append((str(runner_state.get("prefix", "attention")), page))
    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for prefix, page in pages:
        path = out if len(pages) == 1 else out.with_name(f"{out.stem}_{prefix}{out.suffix}")
        path.write_text(page, encoding="utf-8")
        written.append(f"{path} ({len(page.encode()) / 2**20:.1f} MiB)")
    print("wrote " + ", ".join(written))
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
    import torch
    from PIL import Image

    from .probes import display_stats
    from .render import to_display
    from .sanity import sanity_check

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
    picture, _ = check.picture(display, args.tile_size, args.cmap, scale=args.scale, colour_range=args.colour_range)
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
        commands = {"render": render, "compare": compare, "replay": replay, "report": report, "sanity": sanity}
        status = commands[args.command](args)
        for note in getattr(args, "notes", ()):
            print(f"lightning-attn {args.command}: note: {note}", file=sys.stderr)
        return status
    except (ValueError, OSError) as err:  # bad input: one line, the fix in it
        if args.debug:
            traceback.print_exc()
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"lightning-attn {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
