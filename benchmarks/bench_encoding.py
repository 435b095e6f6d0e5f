"""Bytes a probe pass adds to TensorBoard, PNG vs JPEG, at several tile sizes; prints a markdown table (by hand).

    python benchmarks/bench_encoding.py                  # ~2 min on 2 CPU cores
    python benchmarks/bench_encoding.py --picture docs/encoding_side_by_side.png

One pass at the defaults in the steady state of a long run: vit_small_patch16_224 (12 layers, 6 heads,
``pretrained=False``), the example's 8 shape probes at 224 px, grids of raw, rollout, aggregates, the per-head
grid of the last layer and a full filmstrip (baseline + 8 recent passes), plus the layers x steps pictures after
20 passes. Each configuration writes the same pass through :class:`lightning_attn.writers.TensorBoardWriter`
into its own event file, several times, on the calling thread; the table gives the event-file growth per pass and
the median time of writing one pass (encoding and event records, the callback's writer-thread work). The
side-by-side picture shows the same probe rows of the rollout grid at each configuration, decoded as TensorBoard's
browser would.
"""

from __future__ import annotations

import argparse
import io
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.tensorboard import SummaryWriter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lightning_attn import ProbeOptions, ProbeRunner, Probes  # noqa: E402
from lightning_attn.render import _font  # noqa: E402
from lightning_attn.writers import TensorBoardWriter  # noqa: E402

from bench_monitor import _shape_probes, _vit  # noqa: E402

CONFIGS = [(tile, fmt, q) for tile in (56, 64, 96, 112) for fmt, q in (("png", 0), ("jpeg", 90), ("jpeg", 75))]


def _pass_at_steady_state(tile: int):
    """One pass of the example's 8 shape probes, drawn as late in a run: a full filmstrip (baseline + 8 recent
    passes) and 20 passes in the layers x steps pictures."""
    runner = ProbeRunner(_vit(), Probes(_shape_probes()), ProbeOptions(tile_size=tile, mean=(0.5,) * 3, std=(0.5,) * 3))
    first = runner.run(0, render=False)
    final = runner.history[0][1]
    runner.history = [(100 * i, final.roll(i, dims=-1)) for i in range(runner.options.filmstrip_length)]
    rng = np.random.default_rng(0)
    runner.scalar_history = [
        (100 * i, {k: v * (1 + 0.1 * rng.random()) for k, v in first.scalars.items()}) for i in range(19)
    ]
    return runner.run(2000)  # the 20th pass, the 9th of the filmstrip


def measure(repeats: int) -> tuple[list[tuple[int, str, int, int, float]], dict[tuple[int, str, int], np.ndarray]]:
    rows, crops = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for tile in sorted({t for t, _, _ in CONFIGS}):
            result = _pass_at_steady_state(tile)
            for _, fmt, quality in [c for c in CONFIGS if c[0] == tile]:
                folder = Path(tmp, f"{tile}_{fmt}_{quality}")
                experiment = SummaryWriter(str(folder))
                writer = TensorBoardWriter(experiment, image_format=fmt, quality=quality or 90)
                experiment.flush()
                events = next(folder.glob("events.out.tfevents.*"))
                result.write(writer)  # warm-up: first-call costs (and the chart layout) are not per pass
                experiment.flush()
                before, times = events.stat().st_size, []
                for _ in range(repeats):
                    start = time.perf_counter()
                    result.write(writer)
                    experiment.flush()
                    times.append(time.perf_counter() - start)
                experiment.close()
                growth = (events.stat().st_size - before) // repeats
                rows.append((tile, fmt, quality, growth, statistics.median(times)))
                # what TensorBoard will show: the stored bytes of the rollout grid, decoded
                from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

                acc = EventAccumulator(str(folder), size_guidance={"images": 1})
                acc.Reload()
                encoded = acc.Images("attention/rollout")[-1].encoded_image_string
                grid = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))
                top = 24 + 2  # header strip + padding
                crops[(tile, fmt, quality)] = grid[: top + 2 * (tile + 2), : 24 + 2 + 5 * (tile + 2)]
    return rows, crops


def side_by_side(crops: dict, chosen: list[tuple[int, str, int]], path: Path) -> None:
    """The same two probe rows of the rollout grid at each chosen configuration, scaled to one height."""
    height = max(crops[c].shape[0] for c in chosen)
    panels = []
    for tile, fmt, quality in chosen:
        crop = Image.fromarray(crops[(tile, fmt, quality)])
        # nearest: show the stored pixels as they are, only larger, like a browser zooming in
        crop = crop.resize((round(crop.width * height / crop.height), height), Image.NEAREST)
        label = Image.new("RGB", (crop.width, 28), (255, 255, 255))
        text = f"tile {tile}, {fmt.upper()}" + (f" q{quality}" if fmt == "jpeg" else "")
        ImageDraw.Draw(label).text((6, 6), text, fill=(0, 0, 0), font=_font())
        panel = Image.new("RGB", (crop.width, crop.height + 28), (255, 255, 255))
        panel.paste(label, (0, 0))
        panel.paste(crop, (0, 28))
        panels.append(panel)
    out = Image.new("RGB", (sum(p.width for p in panels) + 12 * (len(panels) - 1), panels[0].height), (255, 255, 255))
    x = 0
    for panel in panels:
        out.paste(panel, (x, 0))
        x += panel.width + 12
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--picture", type=Path, help="write the side-by-side picture here")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    rows, crops = measure(args.repeats)
    print("| tile (px) | encoding | bytes per pass | MiB per pass | ≤ 2 MB (2,000,000 bytes) | write (s) |")
    print("|---|---|---|---|---|---|")
    for tile, fmt, quality, growth, seconds in rows:
        name = "PNG" if fmt == "png" else f"JPEG q{quality}"
        ok = "yes" if growth <= 2_000_000 else "no"
        print(f"| {tile} | {name} | {growth:,} | {growth / 2**20:.2f} | {ok} | {seconds:.3f} |")
    if args.picture:
        side_by_side(crops, [(56, "png", 0), (96, "png", 0), (96, "jpeg", 90), (96, "jpeg", 75)], args.picture)
        print(f"\nwrote {args.picture}")


if __name__ == "__main__":
    main()
