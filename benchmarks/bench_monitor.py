"""Cost of AttentionMonitor, measured side by side in one run; prints markdown tables (run by hand, not a test).

    python benchmarks/bench_monitor.py            # everything, ~10 min on 2 CPU cores
    python benchmarks/bench_monitor.py --quick    # fewer repeats, smaller scaling table
    python benchmarks/bench_monitor.py --device cuda --device-only   # the GPU rows alone (a few minutes)

Every figure is a ratio of two things measured in the same process (or, for memory, in fresh subprocesses of the
same script), alternating the two to spread drift in machine load over both. Models are built with
`pretrained=False`: weights do not change the cost.

1. training step with the monitor attached vs without (hooks exist only during the probe pass);
2. probe pass (capture + raw and rollout maps) vs a plain fused forward of the same probes;
3. drawing and writing one pass at the defaults (on the training loop, and on the writer thread), TensorBoard
   event-file growth per pass, and the end-of-fit GIFs;
4. peak extra memory of the probe pass beyond a plain forward, across depth and heads;
5. the copied approach (hooks on attn_drop kept for the run, fused attention off, every attention copied to the
   CPU, rollout image by image on the CPU), reimplemented here: probe-pass speed-up and training slowdown;
6. scaling with the number of probes (1 to 256), the input size and the model (ViT-S, ViT-B, ViT-L): probe pass,
   plain forward, the copied approach, extra memory, drawing and writing, event bytes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import date
from pathlib import Path

import lightning.pytorch as pl
import timm
import torch

from lightning_attn import AttentionMonitor, attention_maps, find_attention_modules

MODEL = "vit_small_patch16_224"


def _vit(name: str = MODEL, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def _images(n: int, size: int = 224) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def _alternate(a, b, repeats: int) -> tuple[float, float]:
    """Median seconds of a and b, run alternately after one warm-up each."""
    a(), b()
    ta, tb = [], []
    for _ in range(repeats):
        ta += _time(a, 1)
        tb += _time(b, 1)
    return statistics.median(ta), statistics.median(tb)


# ----------------------------------------------------------------------------- the copied approach


class CopiedRollout:
    """The widely copied vit-explain recipe, as the README and issues describe it, with its row normalisation
    fixed (``keepdim``) so its maps can be compared: hooks on every ``attn_drop`` kept for the model's lifetime,
    fused attention switched off for good, each attention copied to the CPU on every forward, and the rollout
    computed image by image on the CPU."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.attentions: list[torch.Tensor] = []
        for _, module in find_attention_modules(model):
            module.fused_attn = False
            module.attn_drop.register_forward_hook(lambda m, i, o: self.attentions.append(o.cpu()))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        maps = []
        for image in images:
            self.attentions = []
            with torch.no_grad():
                self.model(image[None])
            result = torch.eye(self.attentions[0].size(-1))
            with torch.no_grad():
                for attention in self.attentions:
                    fused = attention.mean(dim=1)
                    a = (fused + torch.eye(fused.size(-1))) / 2
                    a = a / a.sum(dim=-1, keepdim=True)  # the fix: the copied code omits keepdim
                    result = torch.matmul(a, result)
            maps.append(result[0, 0, 1:])
        return torch.stack(maps)


# ----------------------------------------------------------------------------- 1 and 5: training steps


class _Lit(pl.LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, _):
        return torch.nn.functional.cross_entropy(self.model(batch[0]), batch[1])

    def validation_step(self, batch, _):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class _StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self._start)


def _train_step_time(callbacks, steps: int, batch: int, tmp: str, copied: bool = False) -> float:
    model = _vit("vit_tiny_patch16_224", num_classes=10).train()
    if copied:
        CopiedRollout(model)  # its hooks and unfused attention stay for the whole run, as in the notebook
    data = torch.utils.data.TensorDataset(_images(batch * steps), torch.randint(0, 10, (batch * steps,)))
    loader = torch.utils.data.DataLoader(data, batch_size=batch)
    timer = _StepTimer()
    trainer = pl.Trainer(
        max_epochs=2,
        limit_val_batches=1,
        callbacks=[timer, *callbacks],
        logger=pl.loggers.TensorBoardLogger(tmp),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(_Lit(model), loader, loader)
    return statistics.median(timer.times[2:])  # first steps warm up


def bench_training(repeats: int, steps: int) -> list[tuple[str, float, float]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        plain, watched, copied = [], [], []
        for _ in range(repeats):
            plain.append(_train_step_time([], steps, 16, tmp))
            watched.append(_train_step_time([AttentionMonitor(_images(8))], steps, 16, tmp))
            copied.append(_train_step_time([], steps, 16, tmp, copied=True))
    p, w, c = (statistics.median(x) for x in (plain, watched, copied))
    rows.append(("training step, AttentionMonitor attached / none", w, p))
    rows.append(("training step, copied approach's hooks attached / none", c, p))
    return rows


# ----------------------------------------------------------------------------- 2 and 5: probe pass


def bench_probe_pass(repeats: int, probes: int = 16) -> tuple[list[tuple[str, float, float]], float]:
    model = _vit()
    x = _images(probes)
    ours = lambda: attention_maps(model, x)  # noqa: E731

    def plain():
        with torch.no_grad():
            model(x)

    t_ours, t_plain = _alternate(ours, plain, repeats)
    copied_model = _vit()
    copied = CopiedRollout(copied_model)
    t_copied, t_ours2 = _alternate(lambda: copied(x), ours, max(2, repeats // 2))
    error = (copied(x) - attention_maps(model, x).rollout[:, -1].flatten(1)).abs().max().item()
    rows = [
        (f"probe pass ({probes} probes, raw + rollout) / plain fused forward", t_ours, t_plain),
        (f"copied approach's probe pass / ours ({probes} probes)", t_copied, t_ours2),
    ]
    return rows, error


# ----------------------------------------------------------------------------- 3: render and write


def _shape_probes(n: int = 8) -> torch.Tensor:
    """Probe images with the statistics of real pictures: the example's generated shapes, at 224."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from shapes import make_probes

    return make_probes(n, 224, seed=0, mean=(0.5,) * 3, std=(0.5,) * 3)[0]


def _event_bytes(directory: str) -> int:
    return sum(p.stat().st_size for p in Path(directory).glob("events.out.tfevents.*"))


def render_and_write(model: torch.nn.Module, probes: torch.Tensor, passes: int) -> dict[str, float]:
    """Median seconds per pass, at the defaults, over `passes` passes after a baseline (so the filmstrip, the
    layers x steps pictures and the GIF frames grow as in a run): drawing (on the loop), writing through
    TensorBoardWriter on the loop, handing the same pass to a BackgroundWriter (on the loop: it encodes, then
    waits up to its `settle` for the thread to store) and the time its thread still takes after that; plus the
    event-file bytes a pass adds and the end-of-fit GIFs' seconds."""
    from torch.utils.tensorboard import SummaryWriter

    from lightning_attn import ProbeOptions, ProbeRunner, Probes
    from lightning_attn.writers import BackgroundWriter, TensorBoardWriter

    runner = ProbeRunner(model, Probes(probes), ProbeOptions())
    runner.animate = True  # as the callback does with gif=True
    compute = runner.compute
    spent: dict[str, float] = {}

    def timed_compute(*args, **kwargs):
        start = time.perf_counter()
        out = compute(*args, **kwargs)
        spent["compute"] = time.perf_counter() - start
        return out

    runner.compute = timed_compute
    rows: dict[str, list[float]] = {k: [] for k in ("render", "write", "handoff", "thread", "bytes")}
    with tempfile.TemporaryDirectory() as sync_dir, tempfile.TemporaryDirectory() as async_dir:
        sync_events, async_events = SummaryWriter(sync_dir), SummaryWriter(async_dir)
        sync = TensorBoardWriter(sync_events)
        background = BackgroundWriter(TensorBoardWriter(async_events))
        for step in range(passes + 1):
            start = time.perf_counter()
            result = runner.run(step)
            rows["render"].append(time.perf_counter() - start - spent["compute"])
            before = _event_bytes(sync_dir)
            start = time.perf_counter()
            result.write(sync)
            sync_events.flush()
            rows["write"].append(time.perf_counter() - start)
            rows["bytes"].append(_event_bytes(sync_dir) - before)
            start = time.perf_counter()
            result.write(background)
            rows["handoff"].append(time.perf_counter() - start)
            start = time.perf_counter()
            background.drain()  # measured apart: in a run the thread does this while training goes on
            rows["thread"].append(time.perf_counter() - start)  # what is left to store beside training
        start = time.perf_counter()
        for tag, stream in runner.animations().items():
            sync.add_animation(tag, stream, passes)
        gifs = time.perf_counter() - start
        background.close()
        sync_events.close()
        async_events.close()
    out = {k: statistics.median(v[1:]) for k, v in rows.items()}  # the baseline pass draws less
    out["gifs"] = gifs
    return out


def bench_render(passes: int, probes: torch.Tensor, label: str) -> list[tuple[str, float, float]]:
    model = _vit()
    x = probes
    t = render_and_write(model, probes, passes)
    t_pass = statistics.median(_time(lambda: attention_maps(model, x), 3))
    return [
        (
            f"draw + encode + hand to the writer thread, one pass at the defaults / probe pass (8 {label} probes)",
            t["render"] + t["handoff"],
            t_pass,
        ),
        (
            f"draw + write on the loop (no writer thread) / probe pass (8 {label} probes)",
            t["render"] + t["write"],
            t_pass,
        ),
    ], t


# ----------------------------------------------------------------------------- 4 and 6: memory (subprocesses)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def _peak_rss_child(spec: dict) -> None:
    torch.set_num_threads(2)
    model = _vit(**spec["model"])
    x = _images(spec["probes"], spec["size"])
    # Reset the peak-RSS mark (Linux clear_refs "5") so the peak counts only the work below, not model building.
    Path("/proc/self/clear_refs").write_text("5")
    base = _rss_kib("VmRSS")
    if spec["what"] == "plain":
        with torch.no_grad():
            model(x)
    else:
        attention_maps(model, x, memory_budget=spec.get("budget"))
    print(json.dumps({"extra_kib": _rss_kib("VmHWM") - base}))


def _peak_extra(spec: dict) -> float:
    """Peak RSS added by the work in a fresh process, in MiB."""
    # Large blocks straight from mmap and back on free (glibc otherwise raises its mmap threshold and keeps freed
    # blocks in the heap), so resident memory follows the live tensors and the peak mark is their peak.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, check=True, env=env
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_kib"] / 1024


def _memory_extra(
    model: dict, probes: int, size: int = 224, repeats: int = 3, budget: int | None = None
) -> tuple[float, float]:
    plain = statistics.median(
        _peak_extra(dict(model=model, probes=probes, size=size, what="plain")) for _ in range(repeats)
    )
    ours = statistics.median(
        _peak_extra(dict(model=model, probes=probes, size=size, what="maps", budget=budget)) for _ in range(repeats)
    )
    return ours - plain, plain


def bench_memory(repeats: int) -> list[tuple[str, float, float, float]]:
    """Extra peak memory at the default budget (the whole softmax at once; on a CPU every layer's rollout step
    kept) and at ``memory_budget=0`` (one head at a time, nothing kept)."""
    rows = []
    configs = [
        ("depth 6, heads 6", dict(name=MODEL, depth=6)),
        ("depth 24, heads 6", dict(name=MODEL, depth=24)),
        ("depth 12, heads 3 (dim 192)", dict(name=MODEL, num_heads=3, embed_dim=192)),
        ("depth 12, heads 12 (dim 768)", dict(name=MODEL, num_heads=12, embed_dim=768)),
    ]
    b, n = 16, 197
    for budget in (None, 0):
        for label, model in configs:
            extra, plain = _memory_extra(model, b, repeats=repeats, budget=budget)
            name = f"{label}, memory_budget={'default' if budget is None else budget}"
            rows.append((name, extra, plain, 16 * b * n * n / 2**20))
    return rows


SCALING_MODELS = {
    "ViT-S/16": dict(name=MODEL),
    "ViT-B/16": dict(name="vit_base_patch16_224"),
    "ViT-L/16": dict(name="vit_large_patch16_224"),
}


def bench_scaling(repeats: int, rows: list[tuple[str, int, int]], draw: bool) -> list[dict]:
    """Per (model, probes, size): probe pass, plain fused forward, the copied approach, extra peak memory, and
    (``draw``) drawing, writing and event bytes of one pass at the defaults."""
    out = []
    for label, count, size in rows:
        spec = dict(SCALING_MODELS[label], dynamic_img_size=True)
        model = _vit(**spec)
        x = _images(count, size)

        def plain():
            with torch.no_grad():
                model(x)

        reps = repeats if count * (1 if label == "ViT-S/16" else 4) <= 64 else 1
        t_ours, t_plain = _alternate(lambda: attention_maps(model, x), plain, reps)
        copied = CopiedRollout(_vit(**spec))
        t_copied = statistics.median(_time(lambda: copied(x), reps))
        extra, _ = _memory_extra(spec, count, size, repeats=1)
        row = dict(
            label=f"{label}, {count} probes, {size}x{size}", ours=t_ours, plain=t_plain, copied=t_copied, extra=extra
        )
        if draw:
            row.update(render_and_write(model, x, passes=2))
        out.append(row)
    return out


# ----------------------------------------------------------------------------- GPU


def _synced(fn, device: torch.device):
    """``fn`` followed by a device synchronisation, so wall time covers the kernels it queued."""

    def run():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return run


def _peak_allocated(fn, device: torch.device) -> float:
    """Bytes ``torch.cuda.max_memory_allocated`` rose above the memory allocated before ``fn`` (MiB)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def bench_device(device: torch.device, repeats: int) -> None:
    """The rows for an accelerator: probe pass / plain fused forward and the copied approach / ours at 16 probes,
    and the probe pass's extra peak memory (``torch.cuda.max_memory_allocated``) across depth and heads."""
    print(f"\n| {device.type}: measurement | A (s) | B (s) | A / B |\n|---|---|---|---|")
    for probes in (16, 64):
        model = _vit().to(device)
        x = _images(probes).to(device)

        def plain():
            with torch.no_grad():
                model(x)

        ours = _synced(lambda: attention_maps(model, x), device)
        t_ours, t_plain = _alternate(ours, _synced(plain, device), repeats)
        copied = CopiedRollout(_vit().to(device))
        t_copied, t_ours2 = _alternate(_synced(lambda: copied(x), device), ours, repeats)
        print(
            f"| probe pass ({probes} probes, raw + rollout) / plain fused forward | {t_ours:.4f} | {t_plain:.4f} | "
            f"{t_ours / t_plain:.2f} |"
        )
        print(
            f"| copied approach's probe pass / ours ({probes} probes) | {t_copied:.4f} | {t_ours2:.4f} | "
            f"{t_copied / t_ours2:.2f} |"
        )
    if device.type != "cuda":
        return
    print(
        "\n| 16 probes, 224² | extra peak allocated by the probe pass (MiB) | plain forward peak (MiB) |\n|---|---|---|"
    )
    for label, spec in (
        ("depth 6, heads 6", dict(depth=6)),
        ("depth 12, heads 6", dict(depth=12)),
        ("depth 24, heads 6", dict(depth=24)),
        ("depth 12, heads 12 (dim 768)", dict(num_heads=12, embed_dim=768)),
    ):
        model = _vit(**spec).to(device)
        x = _images(16).to(device)
        attention_maps(model, x)  # warm-up: kernels and workspaces

        def plain():
            with torch.no_grad():
                model(x)

        base = _peak_allocated(plain, device)
        print(f"| {label} | {_peak_allocated(lambda: attention_maps(model, x), device) - base:.1f} | {base:.1f} |")


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--device", default=None, help="also measure on this device (e.g. cuda); default: cuda when there is one"
    )
    parser.add_argument("--device-only", action="store_true", help="only the --device rows")
    parser.add_argument("--memory-only", action="store_true", help="only the memory table")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _peak_rss_child(json.loads(args.child))
        return
    device = args.device or ("cuda" if torch.cuda.is_available() else None)
    if args.memory_only:
        print(
            "| vit_small, 16 probes, 224 | extra peak memory of the probe pass (MiB) | plain forward peak (MiB) "
            "| 16·B·N² (MiB) |\n|---|---|---|---|"
        )
        for label, extra, plain, bound in bench_memory(3 if args.quick else 7):
            print(f"| {label} | {extra:.1f} | {plain:.1f} | {bound:.1f} |")
        return
    if args.device_only:
        warnings.filterwarnings("ignore")
        print(
            f"device: {device}, {torch.cuda.get_device_name() if device == 'cuda' else platform.machine()}, "
            f"torch {torch.__version__}, timm {timm.__version__}, {date.today()}"
        )
        bench_device(torch.device(device or "cpu"), 3 if args.quick else 7)
        return
    repeats = 3 if args.quick else 7
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), timm {timm.__version__}, lightning {pl.__version__}, {date.today()}"
    )
    print(f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none (CPU only)'}\n")

    print("| measurement | A (s) | B (s) | A / B |\n|---|---|---|---|")
    rows, error = bench_probe_pass(repeats)
    render_noise, t_noise = bench_render(repeats, _images(8), "noise")
    render_shapes, t_shapes = bench_render(repeats, _shape_probes(), "shapes")
    for label, a, b in bench_training(max(1, repeats // 3), 12) + rows + render_noise + render_shapes:
        print(f"| {label} | {a:.3f} | {b:.3f} | {a / b:.2f} |")
    print(f"\nmax |copied - ours| over the final rollout maps: {error:.1e}")
    print(
        "\n| one pass at the defaults (8 probes, vit_small, tile 96, JPEG) | noise probes | shape probes |"
        "\n|---|---|---|"
    )
    for key, what in (
        ("render", "drawing the grids, pictures and GIF frames (s, on the loop)"),
        ("handoff", "encoding it and handing it to the writer thread, which stores it meanwhile (s, on the loop)"),
        ("thread", "storing left to the writer thread after that (s, beside training)"),
        ("write", "writing it on the loop instead (s)"),
        ("gifs", "end of fit: the GIFs of a run of that many passes (s)"),
    ):
        print(f"| {what} | {t_noise[key]:.3f} | {t_shapes[key]:.3f} |")
    print(
        f"| TensorBoard event-file growth per pass (MiB) | {t_noise['bytes'] / 2**20:.2f} | "
        f"{t_shapes['bytes'] / 2**20:.2f} |"
    )
    print()

    print(
        "| vit_small, 16 probes, 224 | extra peak memory of the probe pass (MiB) | plain forward peak (MiB) "
        "| 16·B·N² (MiB) |"
    )
    print("|---|---|---|---|")
    for label, extra, plain, bound in bench_memory(max(1, repeats // 3)):
        print(f"| {label} | {extra:.1f} | {plain:.1f} | {bound:.1f} |")

    if args.quick:
        scaling = [("ViT-S/16", 1, 224), ("ViT-S/16", 16, 224), ("ViT-S/16", 16, 384), ("ViT-B/16", 8, 224)]
    else:
        scaling = [("ViT-S/16", b, 224) for b in (1, 4, 16, 64, 256)] + [
            ("ViT-S/16", 16, 384),
            ("ViT-B/16", 8, 224),
            ("ViT-L/16", 8, 224),
        ]
    print(
        "\n| scaling (random weights) | probe pass (s) | plain forward (s) | ratio | copied approach (s) "
        "| copied / ours "
        "| extra peak memory (MiB) | draw + hand-off, on the loop (s) | writer thread after it (s) "
        "| event file per pass (MiB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in bench_scaling(max(2, repeats // 2), scaling, draw=True):
        print(
            f"| {r['label']} | {r['ours']:.3f} | {r['plain']:.3f} | {r['ours'] / r['plain']:.2f} | {r['copied']:.3f} | "
            f"{r['copied'] / r['ours']:.2f} | {r['extra']:.1f} | {r['render'] + r['handoff']:.2f} | "
            f"{r['thread']:.2f} | "
            f"{r['bytes'] / 2**20:.1f} |"
        )
    if device is not None:
        bench_device(torch.device(device), repeats)


if __name__ == "__main__":
    main()
