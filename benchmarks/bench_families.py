"""Probe-pass cost per model family, side by side in one run; prints a markdown table (run by hand, not a test).

    python benchmarks/bench_families.py            # ~4 min on 2 CPU cores
    python benchmarks/bench_families.py --quick    # fewer repeats

    python benchmarks/bench_families.py --only swin    # the Swin-T rows alone
    python benchmarks/bench_families.py --only "timm vit_small" --runs 10   # the spread over 10 independent runs

For a ViT-S-sized timm model, a ViT-S-sized Hugging Face ``ViTForImageClassification`` (default ``sdpa``) and
torchvision's ``vit_b_16``, and Swin-T in each of the three (windowed, 4 stages), all with random weights at
224x224 and 16 probes: the probe pass (capture + raw and
rollout maps, ``attention_maps``) against a plain forward of the same probes, timed alternately (median), and the
peak extra memory of each beyond the plain forward, measured in fresh subprocesses as ``bench_monitor.py`` does.
With ``--runs K`` the timing is repeated in K fresh processes (independent runs: the model, its memory layout and
the machine's state drawn anew) and the ratio column gives their mean ± standard deviation and range.

``--allocator pinned`` runs those processes with glibc told never to give freed memory back to the system
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``): with the default allocator either side of the comparison
may pay for fresh pages, depending on what the allocator has just given back (the page-fault column: medians of
each call's minor faults); pinned, both sides compute on memory already mapped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

from lightning_attn import attention_maps, backend_for

sys.path.insert(0, str(Path(__file__).parent))
from bench_monitor import _rss_kib  # noqa: E402  (the same memory probe)

FAMILIES = (
    "timm vit_small_patch16_224",
    "transformers ViTForImageClassification (ViT-S size)",
    "torchvision vit_b_16",
    "timm swin_tiny_patch4_window7_224",
    "transformers SwinForImageClassification (Swin-T size)",
    "torchvision swin_t",
)


def _swin(name: str) -> torch.nn.Module:
    """Swin-T in each stack: 4 stages of (2, 2, 6, 2) windowed blocks, windows of 7 x 7 tokens, 56 x 56 at stage 1."""
    if name.startswith("timm"):
        import timm

        return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval()
    if name.startswith("transformers"):
        from transformers import SwinConfig, SwinForImageClassification

        return SwinForImageClassification(SwinConfig(num_labels=1000)).eval()  # the defaults are Swin-T's
    from torchvision.models import swin_t

    return swin_t().eval()


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if "swin" in name.lower():
        return _swin(name)
    if name.startswith("timm"):
        import timm

        return timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    if name.startswith("transformers"):
        from transformers import ViTConfig, ViTForImageClassification

        config = ViTConfig(
            hidden_size=384,
            num_hidden_layers=12,
            num_attention_heads=6,
            intermediate_size=1536,
            image_size=224,
            patch_size=16,
            num_labels=1000,
        )
        return ViTForImageClassification(config).eval()
    from torchvision.models import vit_b_16

    return vit_b_16().eval()


def _images(n: int) -> torch.Tensor:
    return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(1))


def _timing(family: str, probes: int, repeats: int) -> tuple[float, float, float, float]:
    """Median seconds of the probe pass and of a plain forward of the same probes, run alternately after a warm-up,
    and the median minor page faults of each call (fresh pages the allocator had to map)."""
    model = _model(family)
    backend = backend_for(model)
    x = _images(probes)

    def plain() -> None:
        with torch.no_grad():
            backend.forward(x)

    def probe_pass() -> None:
        attention_maps(model, x)

    probe_pass(), plain()
    seconds: dict[str, list[float]] = {"ours": [], "base": []}
    faults: dict[str, list[int]] = {"ours": [], "base": []}
    for _ in range(repeats):
        for name, f in (("ours", probe_pass), ("base", plain)):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            f()
            seconds[name].append(time.perf_counter() - start)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return (
        statistics.median(seconds["ours"]),
        statistics.median(seconds["base"]),
        statistics.median(faults["ours"]),
        statistics.median(faults["base"]),
    )


def _child(spec: dict) -> None:
    torch.set_num_threads(spec.get("threads", 2))
    if spec["what"] == "timing":
        ours, base, ours_faults, base_faults = _timing(spec["family"], spec["probes"], spec["repeats"])
        print(json.dumps({"ours": ours, "base": base, "ours_faults": ours_faults, "base_faults": base_faults}))
        return
    model = _model(spec["family"])
    backend = backend_for(model)
    x = _images(spec["probes"])
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak mark: count only the work below
    base = _rss_kib("VmRSS")
    if spec["what"] == "plain":
        with torch.no_grad():
            backend.forward(x)
    else:
        attention_maps(model, x)
    print(json.dumps({"extra_kib": _rss_kib("VmHWM") - base}))


#: glibc settings under which freed memory stays mapped (``--allocator pinned``)
PINNED = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**32)}


def _run_child(spec: dict, env: dict | None = None) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, check=True, env=env
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _peak(spec: dict) -> float:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed blocks go back: RSS follows live tensors
    return _run_child(spec, env)["extra_kib"] / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--probes", type=int, default=16)
    parser.add_argument("--only", default="", help="only the families whose name contains this (e.g. swin)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (1 on a shared, busy machine)")
    parser.add_argument("--runs", type=int, default=1, help="independent timing runs, each in a fresh process")
    parser.add_argument(
        "--allocator",
        choices=("default", "pinned"),
        default="default",
        help="pinned: the timing processes keep freed memory mapped (glibc), so page faults do not enter the ratio",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(json.loads(args.child))
        return
    torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else 7
    import transformers

    print(
        f"{date.today()}, {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({args.threads} threads), "
        f"transformers {transformers.__version__}, {args.probes} probes at 224x224, pretrained=False, "
        f"{args.allocator} allocator\n"
    )
    print(
        "| model | probe pass (s) | plain forward (s) | ratio | minor page faults a call, plain / pass "
        "| extra peak memory (MiB) | plain forward peak (MiB) |"
    )
    print("|---|---|---|---|---|---|---|")
    for family in (f for f in FAMILIES if args.only.lower() in f.lower()):
        if args.runs == 1 and args.allocator == "default":
            runs = [_timing(family, args.probes, repeats)]
        else:
            spec = dict(family=family, probes=args.probes, what="timing", threads=args.threads, repeats=repeats)
            env = {**os.environ, **PINNED} if args.allocator == "pinned" else None
            runs = [
                (t["ours"], t["base"], t["ours_faults"], t["base_faults"])
                for t in (_run_child(spec, env) for _ in range(args.runs))
            ]
        ours = statistics.median(r[0] for r in runs)
        base = statistics.median(r[1] for r in runs)
        ratios = [r[0] / r[1] for r in runs]
        faults = f"{statistics.median(r[3] for r in runs):,.0f} / {statistics.median(r[2] for r in runs):,.0f}"
        if len(ratios) == 1:
            ratio = f"{ratios[0]:.2f}"
        else:
            ratio = (
                f"{statistics.mean(ratios):.2f} ± {statistics.stdev(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f}, "
                f"{len(ratios)} runs)"
            )
        memory = {
            what: statistics.median(
                _peak(dict(family=family, probes=args.probes, what=what, threads=args.threads))
                for _ in range(1 if args.quick else 3)
            )
            for what in ("plain", "maps")
        }
        print(
            f"| {family} | {ours:.3f} | {base:.3f} | {ratio} | {faults} | {memory['maps'] - memory['plain']:.1f} "
            f"| {memory['plain']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
