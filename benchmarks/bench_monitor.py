"""Cost of AttentionMonitor, measured side by side in one run; prints markdown tables (run by hand, not a test).

    python benchmarks/bench_monitor.py            # everything, ~10 min on 2 CPU cores
    python benchmarks/bench_monitor.py --quick    # fewer repeats, smaller scaling table

Every figure is a ratio of two things measured in the same process (or, for memory, in fresh subprocesses of the
same script), alternating the two to spread drift in machine load over both. Models are built with
`pretrained=False`: weights do not change the cost.

1. training step with the monitor attached vs without (hooks exist only during the probe pass);
2. probe pass (capture + raw and rollout maps) vs a plain fused forward of the same probes;
3. rendering and writing one pass's grids at the defaults, and TensorBoard event-file growth per pass;
4. peak extra memory of the probe pass beyond a plain forward, across depth and heads;
5. the copied approach (hooks on attn_drop kept for the run, fused attention off, every attention copied to the
   CPU, rollout image by image on the CPU), reimplemented here: probe-pass speed-up and training slowdown;
6. scaling of the probe pass with the number of probes and the input size.
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


def bench_render(repeats: int, probes: torch.Tensor, label: str) -> tuple[list[tuple[str, float, float]], int]:
    """Time `_write` of one pass at the defaults (8 probes x 12 layers) and the event-file bytes it adds."""
    model = _vit()
    with tempfile.TemporaryDirectory() as tmp:
        monitor = AttentionMonitor(probes)
        lit = _Lit(model)
        trainer = pl.Trainer(
            logger=pl.loggers.TensorBoardLogger(tmp),
            enable_progress_bar=False,
            callbacks=[monitor],
            enable_model_summary=False,
            limit_val_batches=1,
        )
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(_images(1), torch.zeros(1).long()))
        trainer.validate(lit, loader)  # sets the monitor up and logs one pass
        probes = monitor._probes
        maps, curves = monitor._compute(trainer, probes)
        metrics = dict(monitor.last_metrics)
        # a writer of its own, so the bytes of exactly these passes can be read off its event file
        from torch.utils.tensorboard import SummaryWriter

        from lightning_attn.writers import TensorBoardWriter

        experiment = SummaryWriter(os.path.join(tmp, "growth"))
        monitor._writer = TensorBoardWriter(experiment)
        experiment.flush()
        events = next(Path(tmp, "growth").glob("events.out.tfevents.*"))
        before = events.stat().st_size
        times = _time(lambda: monitor._write(maps, probes, metrics, 1), repeats)
        growth = (events.stat().st_size - before) // repeats
        experiment.close()
        compute = statistics.median(_time(lambda: monitor._compute(trainer, probes), max(2, repeats // 2)))
    return [
        (f"render + write one pass at the defaults / probe pass (8 {label} probes)", statistics.median(times), compute)
    ], growth


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
        attention_maps(model, x)
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


def _memory_extra(model: dict, probes: int, size: int = 224, repeats: int = 3) -> tuple[float, float]:
    plain = statistics.median(
        _peak_extra(dict(model=model, probes=probes, size=size, what="plain")) for _ in range(repeats)
    )
    ours = statistics.median(
        _peak_extra(dict(model=model, probes=probes, size=size, what="maps")) for _ in range(repeats)
    )
    return ours - plain, plain


def bench_memory(repeats: int) -> list[tuple[str, float, float, float]]:
    rows = []
    configs = [
        ("depth 6, heads 6", dict(name=MODEL, depth=6)),
        ("depth 24, heads 6", dict(name=MODEL, depth=24)),
        ("depth 12, heads 3 (dim 192)", dict(name=MODEL, num_heads=3, embed_dim=192)),
        ("depth 12, heads 12 (dim 768)", dict(name=MODEL, num_heads=12, embed_dim=768)),
    ]
    b, n = 16, 197
    for label, model in configs:
        extra, plain = _memory_extra(model, b, repeats=repeats)
        rows.append((label, extra, plain, 16 * b * n * n / 2**20))
    return rows


def bench_scaling(repeats: int, counts: list[int], sizes: list[int]) -> list[tuple[str, float, float, float]]:
    rows = []
    model = _vit(dynamic_img_size=True)
    for size in sizes:
        for b in counts if size == 224 else [16]:
            x = _images(b, size)

            def plain():
                with torch.no_grad():
                    model(x)  # noqa: B023 (timed within this iteration)

            t_ours, t_plain = _alternate(lambda: attention_maps(model, x), plain, repeats)  # noqa: B023 (timed within this iteration)
            extra, _ = _memory_extra(dict(name=MODEL, dynamic_img_size=True), b, size, repeats=1)
            rows.append((f"{b} probes, {size}x{size}", t_ours, t_plain, extra))
    return rows


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _peak_rss_child(json.loads(args.child))
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
    render_noise, growth_noise = bench_render(repeats, _images(8), "noise")
    render_shapes, growth_shapes = bench_render(repeats, _shape_probes(), "shapes")
    for label, a, b in bench_training(max(1, repeats // 3), 12) + rows + render_noise + render_shapes:
        print(f"| {label} | {a:.3f} | {b:.3f} | {a / b:.2f} |")
    print(f"\nmax |copied - ours| over the final rollout maps: {error:.1e}")
    for label, growth in (("noise (worst case for PNG)", growth_noise), ("shapes", growth_shapes)):
        print(
            f"TensorBoard event-file growth per pass at the defaults, {label} probes: "
            f"{growth / 2**20:.2f} MiB ({growth} bytes)"
        )
    print()

    print(
        "| vit_small, 16 probes, 224 | extra peak memory of the probe pass (MiB) | plain forward peak (MiB) "
        "| 16·B·N² (MiB) |"
    )
    print("|---|---|---|---|")
    for label, extra, plain, bound in bench_memory(max(1, repeats // 3)):
        print(f"| {label} | {extra:.1f} | {plain:.1f} | {bound:.1f} |")

    counts, sizes = ([1, 4, 16], [224, 384]) if args.quick else ([1, 4, 16, 64], [224, 384])
    print("\n| scaling | probe pass (s) | plain forward (s) | ratio | extra peak memory (MiB) |\n|---|---|---|---|---|")
    for label, a, b, extra in bench_scaling(max(2, repeats // 2), counts, sizes):
        print(f"| {label} | {a:.3f} | {b:.3f} | {a / b:.2f} | {extra:.1f} |")


if __name__ == "__main__":
    main()
