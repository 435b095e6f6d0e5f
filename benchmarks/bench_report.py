"""How big the interactive report gets: bytes the monitor keeps per pass and bytes of the page, by passes, probes
and layers.

    python benchmarks/bench_report.py            # ~2 min on 2 CPU cores

The model is the example's (``examples/train_vit.py``: a ViT-Tiny width of 192 with 3 heads on 64 x 64 images in
8 x 8 patches, 65 tokens) with its four methods, at its depth (4) and deeper; each row changes one thing from the
example's defaults (8 probes, 4 layers, 7 passes: the baseline and 6 epochs). Sizes depend on shapes only (float16
arrays, base64 in the page), not on what the weights are. The last rows are ViT-S/16 at 224 with 16 probes, where
the default keeps no token x token attention (it would take more than 4 MiB a pass) unless ``report_layers`` asks
(these two rows with ``raw`` and ``rollout`` only, to keep the script short).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable

import timm
import torch

from lightning_attn import ProbeOptions, ProbeRunner, Probes
from lightning_attn.html_report import report_html

METHODS = ("raw", "rollout", "grad_rollout", "relevance")


def _runner(
    name: str, img: int, depth: int | None, probes: int, methods: tuple[str, ...] = METHODS, **options: object
) -> ProbeRunner:
    kwargs = {"img_size": img, "num_classes": 4}
    if depth is not None:
        kwargs.update(patch_size=8, depth=depth)
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    images = torch.randn(probes, 3, img, img)
    labels = torch.arange(probes) % 4
    return ProbeRunner(model, Probes(images, labels), ProbeOptions(methods=methods, tile_size=32, **options))


def _stored(entry: dict) -> int:
    return sum(
        t.numel() * t.element_size()
        for kind in ("maps", "heads", "matrices", "head_matrices")
        for t in entry[kind].values()
    )


def _rows(make: Callable[[], ProbeRunner], label: str, probes: int, layers: int, counts: list[int]) -> list[str]:
    out = []
    for count in counts:
        # a run of exactly `count` passes: a longer run keeps the token x token attention of a spread of its passes
        # only (runner.REPORT_ROW_PASSES), so its first passes are not what a short run keeps
        runner = make()
        for step in range(count):
            runner.run(step=step, render=False)
        state = runner.state_dict()
        per_pass = _stored(state["report"][0]) / 1e6
        # what storing a pass costs on the training loop: the float16 copy to the host of what the report keeps
        maps, _ = runner.compute()
        start = time.perf_counter()
        for _ in range(5):
            runner._report_entry(0, maps)
        store_ms = (time.perf_counter() - start) / 5 * 1e3
        kept = ",".join(map(str, runner.report_layers)) or "none"
        page = report_html(state).encode()
        out.append(
            f"| {label} | {probes} | {layers} | {count} | {kept} | {per_pass:.2f} | {store_ms:.1f} | "
            f"{len(page) / 1e6:.2f} |"
        )
    return out


def main() -> None:
    torch.set_num_threads(1)  # sizes do not depend on it; on a busy machine one thread is many times faster
    print(
        f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(
        "| model | probes | layers | passes | token matrices kept (layers) | kept per pass (MB) | storing a pass (ms) "
        "| page (MB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    tiny = "vit_tiny_patch16_224"
    rows = _rows(lambda: _runner(tiny, 64, 4, 8), "example (ViT-Ti, 64 px, 8x8 patches)", 8, 4, [7, 25, 100])
    rows += _rows(lambda: _runner(tiny, 64, 4, 16), "example", 16, 4, [7])
    rows += _rows(lambda: _runner(tiny, 64, 4, 32), "example", 32, 4, [7])
    rows += _rows(lambda: _runner(tiny, 64, 8, 8), "example, deeper", 8, 8, [7])
    rows += _rows(lambda: _runner(tiny, 64, 12, 8), "example, deeper", 8, 12, [7])
    small = "vit_small_patch16_224"
    fast = ("raw", "rollout")  # no backward pass: the maps of two more methods add 0.15 MB a pass
    rows += _rows(lambda: _runner(small, 224, None, 16, fast), "ViT-S/16, 224 px (raw, rollout)", 16, 12, [7])
    rows += _rows(
        lambda: _runner(small, 224, None, 16, fast, report_layers=(-1,)), "ViT-S/16, 224 px (raw, rollout)", 16, 12, [7]
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
