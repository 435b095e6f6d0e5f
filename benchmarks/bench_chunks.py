"""How big a chunk of probes the CPU probe pass should rebuild the softmax in; prints a markdown table (run by hand).

    python benchmarks/bench_chunks.py            # ~2 min on 2 CPU cores
    python benchmarks/bench_chunks.py --quick

One timm attention layer, 16 probes, random weights: the layer's plain forward (its fused kernel) against the same
forward while the probe pass streams its weights into the maps' reducer (head fusion, query rows, rollout steps),
with the weights rebuilt for every probe at once (what the probe pass did before chunks) or in chunks of at most
``--sizes`` KiB of float32 weights. Each cell is the median over alternating repeats of (streamed / plain) for the
layer; the last row is the whole ViT-S/16 probe pass against a plain forward, per chunk size. The probe pass uses
``CPU_CHUNK_BYTES`` (the ``*`` column).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import date

import torch
from timm.layers.attention import Attention

import lightning_attn.maps as maps_module
from lightning_attn.backends.base import CPU_CHUNK_BYTES
from lightning_attn.capture import stream_chunks
from lightning_attn.layout import TokenLayout

# (name, heads, tokens): ViT-Ti/S/B/16 at 224, ViT-L/14 at 224, ViT-S/16 at 384
SHAPES = (
    ("ViT-Ti/16 layer (3 heads, 197 tokens)", 3, 197),
    ("ViT-S/16 layer (6 heads, 197 tokens)", 6, 197),
    ("ViT-B/16 layer (12 heads, 197 tokens)", 12, 197),
    ("ViT-L/14 layer (16 heads, 257 tokens)", 16, 257),
    ("ViT-S/16 at 384 layer (6 heads, 577 tokens)", 6, 577),
)


def _ratios(plain: Callable[[], None], others: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median over repeats of each function's time over the plain one's, run alternately after a warm-up."""
    for f in (plain, *others.values()):
        f()
    ratios: dict[str, list[float]] = {name: [] for name in others}
    for _ in range(repeats):
        for name, f in others.items():
            start = time.perf_counter()
            plain()
            base = time.perf_counter() - start
            start = time.perf_counter()
            f()
            ratios[name].append((time.perf_counter() - start) / base)
    return {name: statistics.median(r) for name, r in ratios.items()}


def _layer_row(heads: int, tokens: int, sizes: list[int | None], probes: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    layer = Attention(64 * heads, num_heads=heads, qkv_bias=True).eval()
    x = torch.randn(probes, tokens, 64 * heads)
    side = int(round((tokens - 1) ** 0.5))
    layout = TokenLayout(1, (side, side), "cls", (16, 16))

    def plain() -> None:
        with torch.no_grad():
            layer(x)

    def streamed(size: int | None) -> Callable[[], None]:
        def run() -> None:
            reducer = maps_module._Reducer(layout, ("raw", "rollout"), "mean", 0.0, (), keep_steps=True)
            with torch.no_grad(), stream_chunks(layer, [layer], reducer.chunk, None, size):
                layer(x)
            reducer.rollout_rows()

        return run

    return _ratios(plain, {str(size): streamed(size) for size in sizes}, repeats)


def _model_row(sizes: list[int | None], probes: int, repeats: int) -> dict[str, float]:
    import timm

    from lightning_attn import attention_maps

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    x = torch.randn(probes, 3, 224, 224, generator=torch.Generator().manual_seed(1))

    def plain() -> None:
        with torch.no_grad():
            model(x)

    def probe_pass(size: int | None) -> Callable[[], None]:
        def run() -> None:
            maps_module.CPU_CHUNK_BYTES = size  # type: ignore[assignment]  (None: every probe at once)
            try:
                attention_maps(model, x)
            finally:
                maps_module.CPU_CHUNK_BYTES = CPU_CHUNK_BYTES

        return run

    return _ratios(plain, {str(size): probe_pass(size) for size in sizes}, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--probes", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", default="256,512,1024,2048,4096", help="chunk sizes in KiB")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes: list[int | None] = [None, *(int(s) * 1024 for s in args.sizes.split(","))]
    repeats = 5 if args.quick else 15
    print(
        f"{date.today()}, {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({args.threads} threads), {args.probes} probes; streamed / plain, median of {repeats} alternating repeats\n"
    )
    names = ["every probe"] + [f"{s // 1024} KiB{' *' if s == CPU_CHUNK_BYTES else ''}" for s in sizes if s is not None]
    print("| | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for name, heads, tokens in SHAPES:
        row = _layer_row(heads, tokens, sizes, args.probes, repeats)
        print(f"| {name} | " + " | ".join(f"{row[str(s)]:.2f}" for s in sizes) + " |", flush=True)
    row = _model_row(sizes, args.probes, max(3, repeats // 3))
    print("| ViT-S/16 probe pass / plain forward | " + " | ".join(f"{row[str(s)]:.2f}" for s in sizes) + " |")


if __name__ == "__main__":
    main()
