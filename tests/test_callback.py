from __future__ import annotations

import copy
import csv
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

from lightning_attn import AttentionMonitor, find_attention_modules
from lightning_attn.render import COLOUR_BAR_HEIGHT, grid_shape

import lit

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def _probes(n=3, seed=7):
    return torch.randn(n, 3, lit.IMG, lit.IMG, generator=torch.Generator().manual_seed(seed))


def test_fit_logs_grids_and_entropy_at_the_trainers_steps(tmp_path):
    monitor = AttentionMonitor(_probes(3), labels=[0, 1, 2], mean=MEAN, std=STD, tile_size=32)
    trainer = lit.trainer(tmp_path, [monitor])
    trainer.fit(lit.LitViT(depth=3), *lit.loaders())
    acc = lit.read_events(trainer.logger.log_dir)

    image_tags = set(acc.Tags()["images"])
    assert {"attention/raw", "attention/rollout", "attention/raw_aggregates"} <= image_tags
    assert "attention/matrix" not in image_tags  # off by default
    steps = [0, 4, 8]  # baseline before any update, then the end of each epoch (4 train batches per epoch)
    assert trainer.global_step == 8
    for tag, cols in (("attention/raw", 4), ("attention/rollout", 4), ("attention/raw_aggregates", 4)):
        events = acc.Images(tag)
        assert [e.step for e in events] == steps
        height, width = grid_shape(3, cols, 32, 32, has_col_labels=True, has_row_labels=True)
        height += COLOUR_BAR_HEIGHT  # the key to the colours under every grid
        assert all((e.height, e.width) == (height, width) for e in events)
    for method in ("raw", "rollout"):
        for layer in range(3):
            scalars = acc.Scalars(f"attention_entropy/{method}/layer_{layer:02d}")
            assert [s.step for s in scalars] == steps
            assert all(0.0 <= s.value <= 1.0 for s in scalars)
    entropy = {k for k in monitor.last_metrics if k.startswith("attention_entropy/")}
    assert entropy == {f"attention_entropy/{m}/layer_{l:02d}" for m in ("raw", "rollout") for l in range(3)}


def test_grid_pixels_are_the_overlay_of_the_probe(tmp_path):
    # one probe, constant grey: every image tile pixel is grey; every heat tile is a blend with it
    probes = torch.zeros(1, 3, lit.IMG, lit.IMG)  # normalised 0 -> display 0.5
    monitor = AttentionMonitor(
        probes, mean=MEAN, std=STD, tile_size=32, methods=("raw",), aggregates=(), scale="per_map"
    )
    trainer = lit.trainer(tmp_path, [monitor], max_epochs=1, logger=False)
    trainer.fit(lit.LitViT(), *lit.loaders())
    grid = np.asarray(Image.open(tmp_path / "attention" / "attention__raw_step0000004.png"))
    top, pad = 24, 2
    image_tile = grid[top + pad : top + pad + 32, 24 + pad : 24 + pad + 32]
    assert np.abs(image_tile.astype(int) - 128).max() <= 1
    heat = grid[top + pad : top + pad + 32, 24 + 2 * pad + 32 : 24 + 2 * pad + 64].astype(float)
    # stretched per tile, jet at 0 is dark blue, at 1 dark red: blended 50/50 with grey, both extremes are present
    # (the top-left corner holds the tile's peak-ratio note: white box, dark text)
    assert heat[14:, ..., 2].max() > 150 and heat[14:, ..., 0].max() > 150


def test_probes_from_image_paths_use_the_models_transform(tmp_path):
    paths = []
    for i in range(2):
        rgb = (np.random.default_rng(i).random((50, 70, 3)) * 255).astype(np.uint8)
        path = tmp_path / f"probe{i}.png"
        Image.fromarray(rgb).save(path)
        paths.append(str(path))
    monitor = AttentionMonitor(paths, tile_size=32, aggregates=())
    trainer = lit.trainer(tmp_path, [monitor], max_epochs=1)
    trainer.fit(lit.LitViT(), *lit.loaders())
    assert monitor._probes.images.shape == (2, 3, lit.IMG, lit.IMG)
    events = lit.read_events(trainer.logger.log_dir).Images("attention/rollout")
    assert [e.step for e in events] == [0, 4]
    assert events[0].height == grid_shape(2, 3, 32, 32, True, True)[0] + COLOUR_BAR_HEIGHT


def test_probes_from_the_validation_loader_are_taken_once_and_kept(tmp_path):
    monitor = AttentionMonitor(5, tile_size=32)
    trainer = lit.trainer(tmp_path, [monitor], num_sanity_val_steps=0)
    _, val = lit.loaders()
    trainer.fit(lit.LitViT(), lit.loaders()[0], val)
    expected = torch.cat([x for x, _ in val])[:5]
    torch.testing.assert_close(monitor._probes.images, expected)
    torch.testing.assert_close(monitor._probes.labels, torch.cat([y for _, y in val])[:5])
    events = lit.read_events(trainer.logger.log_dir).Images("attention/raw")
    assert [e.step for e in events] == [0, 4, 8]


def test_csv_logger_gets_scalars_in_metrics_csv_and_pngs_in_its_log_dir(tmp_path):
    monitor = AttentionMonitor(_probes(2), tile_size=32)
    csv_logger = pl.loggers.CSVLogger(tmp_path, name="csv")
    trainer = lit.trainer(tmp_path, [monitor], logger=csv_logger, max_epochs=1)
    trainer.fit(lit.LitViT(), *lit.loaders())
    files = {p.name for p in (Path(csv_logger.log_dir) / "attention").glob("*.png")}
    tags = ("raw", "raw_aggregates", "rollout", "filmstrip", "heads__layer_01")
    assert {f"attention__{t}_step{s:07d}.png" for t in tags for s in (0, 4)} <= files
    assert "attention_layers_steps__entropy__raw_step0000004.png" in files
    with open(Path(csv_logger.log_dir) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for tag in ("attention_entropy/raw/layer_00", "attention_distance/layer_01"):
        assert [int(r["step"]) for r in rows if r.get(tag)] == [0, 4]


def test_logger_false_writes_pngs_under_default_root_dir(tmp_path):
    monitor = AttentionMonitor(_probes(2), tile_size=32, methods=("rollout",))
    trainer = lit.trainer(tmp_path, [monitor], logger=False, max_epochs=1)
    with pytest.warns(RuntimeWarning, match="no logger in `trainer.loggers`"):
        trainer.fit(lit.LitViT(), *lit.loaders())
    png = tmp_path / "attention" / "attention__rollout_step0000004.png"
    assert png.is_file()
    height, width = grid_shape(2, 3, 32, 32, True, True)
    assert Image.open(png).size[::-1] == (height + COLOUR_BAR_HEIGHT, width)
    with open(tmp_path / "attention" / "scalars.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows if r["tag"] == "attention_entropy/rollout/layer_00"] == [0, 4]


def test_probe_pass_changes_nothing(tmp_path):
    model = lit.LitViT(drop=0.1)
    trainer = lit.trainer(tmp_path, [], max_epochs=1)
    trainer.fit(model, *lit.loaders())  # attach the model to a trainer as in real use
    monitor = AttentionMonitor(_probes(3), tile_size=32, matrix_layers=[0])
    monitor.setup(trainer, model, "fit")
    model.train()
    probes = monitor._probes.images.clone()
    state = copy.deepcopy(model.state_dict())
    x = _probes(2, seed=3)
    torch.manual_seed(0)
    rng = torch.get_rng_state()
    with torch.no_grad():
        model.eval()
        before = model(x)
        model.train()
    grads = [p.requires_grad for p in model.parameters()]
    monitor._run(trainer, model)
    assert torch.equal(torch.get_rng_state(), rng), "the probe pass must not consume global RNG"
    assert model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == grads
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert torch.equal(monitor._probes.images, probes)
    assert all(m.fused_attn for _, m in find_attention_modules(model))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x), before)
    assert monitor.last_metrics


def test_validate_alone_logs_and_sanity_check_does_not(tmp_path):
    monitor = AttentionMonitor(_probes(2), tile_size=32)
    trainer = lit.trainer(tmp_path, [monitor])
    trainer.validate(lit.LitViT(), lit.loaders()[1])
    events = lit.read_events(trainer.logger.log_dir).Images("attention/raw")
    assert [e.step for e in events] == [0]

    monitor = AttentionMonitor(_probes(2), tile_size=32, log_baseline=False, every_n_epochs=2)
    trainer = lit.trainer(tmp_path / "b", [monitor], max_epochs=4, num_sanity_val_steps=2)
    trainer.fit(lit.LitViT(), *lit.loaders())
    events = lit.read_events(trainer.logger.log_dir).Images("attention/raw")
    assert [e.step for e in events] == [8, 16]  # epochs 2 and 4 only; nothing from the sanity check


def test_matrix_view_and_chosen_layers(tmp_path):
    monitor = AttentionMonitor(_probes(2), tile_size=32, layers=[-1, 0], matrix_layers=[1])
    trainer = lit.trainer(tmp_path, [monitor], max_epochs=1)
    trainer.fit(lit.LitViT(depth=3), *lit.loaders())
    acc = lit.read_events(trainer.logger.log_dir)
    raw = acc.Images("attention/raw")[-1]
    assert raw.width == grid_shape(2, 3, 32, 32, True, True)[1]  # image + 2 chosen layers
    matrix = acc.Images("attention/matrix")[-1]
    height, width = grid_shape(2, 1, 64, 64, True, True)
    assert (matrix.height, matrix.width) == (height + COLOUR_BAR_HEIGHT, width)


def _nan_model() -> lit.LitViT:
    model = lit.LitViT()
    with torch.no_grad():
        model.model.pos_embed[0, 1, 0] = float("nan")  # a weight gone NaN (e.g. an fp16 overflow) -> NaN attention
    return model


def test_failing_probe_pass_warns_once_and_training_goes_on(tmp_path):
    bad = _probes(2)
    monitor = AttentionMonitor(bad, tile_size=32)
    trainer = lit.trainer(tmp_path, [monitor], max_epochs=3)
    with pytest.warns(RuntimeWarning, match="skipped the probe pass at step 0: FloatingPointError") as record:
        trainer.fit(_nan_model(), *lit.loaders())
    assert sum("skipped the probe pass" in str(w.message) for w in record) == 1
    assert trainer.global_step == 12  # all three epochs ran
    assert "attention/raw" not in lit.read_events(trainer.logger.log_dir).Tags()["images"]

    strict = AttentionMonitor(bad, tile_size=32, on_error="raise")
    with pytest.raises(FloatingPointError, match="NaN"):
        lit.trainer(tmp_path / "s", [strict]).fit(_nan_model(), *lit.loaders())


def test_bf16_mixed_precision(tmp_path):
    monitor = AttentionMonitor(_probes(2), tile_size=32, on_error="raise")
    trainer = lit.trainer(tmp_path, [monitor], max_epochs=1, precision="bf16-mixed")
    trainer.fit(lit.LitViT(), *lit.loaders())
    entropy = [v for k, v in monitor.last_metrics.items() if k.startswith("attention_entropy/")]
    assert len(entropy) == 4 and all(0 <= v <= 1 for v in entropy)


class TwoViTs(lit.LitViT):
    def __init__(self):
        super().__init__()
        self.teacher = copy.deepcopy(self.model)


class NoViT(lit.LitViT):
    def __init__(self):
        super().__init__()
        self.model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * lit.IMG * lit.IMG, 3))


@pytest.mark.parametrize(
    "module, kwargs, match",
    [
        (TwoViTs, {}, r"several ViTs: \['model', 'teacher'\].*module="),
        (NoViT, {}, "no attention layers"),
        (lit.LitViT, dict(module="backbone"), "`module='backbone'` is not a submodule"),
        (lit.LitViT, dict(layers=[5]), r"`layers` \[5\] out of range: the model has 2"),
        (lit.LitViT, dict(probes=torch.randn(2, 1, lit.IMG, lit.IMG)), "1 channels but VisionTransformer expects 3"),
        (lit.LitViT, dict(probes=torch.randn(2, 3, 48, 48)), "48x48 but VisionTransformer takes 32x32"),
    ],
)
def test_setup_errors_name_the_fix(tmp_path, module, kwargs, match):
    monitor = AttentionMonitor(**{"probes": _probes(2), **kwargs})
    with pytest.raises(ValueError, match=match):
        lit.trainer(tmp_path, [monitor], max_epochs=1).fit(module(), *lit.loaders())


def test_module_option_picks_one_of_several(tmp_path):
    monitor = AttentionMonitor(_probes(2), module="teacher", tile_size=32)
    trainer = lit.trainer(tmp_path, [monitor], max_epochs=1)
    model = TwoViTs()
    trainer.fit(model, *lit.loaders())
    assert monitor._vit is model.teacher


def test_probes_int_without_validation_data(tmp_path):
    monitor = AttentionMonitor(4)
    with pytest.raises(ValueError, match="has none"):
        lit.trainer(tmp_path, [monitor], max_epochs=1).fit(lit.LitViT(), lit.loaders()[0])
    monitor = AttentionMonitor(100)
    with pytest.raises(ValueError, match="has only 16"):
        lit.trainer(tmp_path, [monitor], max_epochs=1).fit(lit.LitViT(), *lit.loaders())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(probes=0), "`probes` as an int must be >= 1"),
        (dict(probes="img.png"), "`probes` must be"),
        (dict(probes=[]), "empty list"),
        (dict(probes=torch.randn(3, 32, 32)), r"\(B, C, H, W\)"),
        (dict(probes=torch.randn(2, 3, 8, 8), labels=[1]), "1 entries for 2 probes"),
        (dict(probes=4, labels=[1, 2, 3, 4]), "labels come from the loader"),
        (dict(methods=("raw", "gradcam")), "`methods`"),
        (dict(methods="raw"), "`methods`"),
        (dict(layers=[]), "`layers` is empty"),
        (dict(layers=[1, 1]), "repeated"),
        (dict(layers=3), "`layers` must be a sequence"),
        (dict(aggregates=("median",)), "`aggregates`"),
        (dict(every_n_epochs=0), "`every_n_epochs` must be an int >= 1"),
        (dict(head_fusion="avg"), "`head_fusion`"),
        (dict(discard_ratio=1.0), "`discard_ratio`"),
        (dict(query="first"), "`query`"),
        (dict(tile_size=4), "`tile_size`"),
        (dict(cmap="not_a_cmap"), "`cmap` must be a matplotlib colormap"),
        (dict(alpha=1.5), "`alpha`"),
        (dict(mean=(0.1, 0.2)), "`mean` must hold 1 or 3"),
        (dict(std=(0.0,)), "`std` values must be > 0"),
        (dict(on_error="ignore"), "`on_error`"),
        (dict(module=3), "`module` must be"),
        (dict(name="my student"), "`name` must be None or a word"),
        (dict(name=""), "`name` must be None or a word"),
        (dict(writer="tb"), "`writer` must be None"),
        (dict(writer=[]), "`writer` must be None"),
    ],
)
def test_constructor_validates_every_option(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttentionMonitor(**kwargs)


def test_writer_option_takes_everything_instead_of_the_loggers(tmp_path):
    from lightning_attn.writers import AttentionWriter

    class Collect(AttentionWriter):
        def __init__(self):
            self.images, self.scalars, self.animations = [], [], []

        def add_image(self, tag, image, step):
            self.images.append((tag, step))

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, step))

        def add_animation(self, tag, frames, step, duration_ms=500):
            self.animations.append((tag, len(frames), step))

    mine = Collect()
    monitor = AttentionMonitor(_probes(2), tile_size=16, writer=mine, name="mine")
    trainer = lit.trainer(tmp_path, [monitor], max_epochs=1)
    trainer.fit(lit.LitViT(), *lit.loaders())
    assert ("attention_mine/raw", 4) in mine.images and ("attention_mine_entropy/raw/layer_00", 0) in mine.scalars
    assert mine.animations == [(f"attention_mine/rollout_evolution/probe_{i:02d}", 2, 4) for i in range(2)]
    assert not [t for t in lit.read_events(trainer.logger.log_dir).Tags()["images"] if t.startswith("attention")]


def test_a_failing_writer_warns_and_the_other_writers_get_the_whole_pass(tmp_path):
    from lightning_attn.writers import AttentionWriter

    class Collect(AttentionWriter):
        def __init__(self, broken=False):
            self.broken, self.scalar_steps = broken, []

        def add_image(self, tag, image, step):
            if self.broken and step == 0:
                raise OSError("disk full")  # transient: only the baseline pass

        def add_scalar(self, tag, value, step):
            self.scalar_steps.append(step)

    healthy = Collect()
    monitor = AttentionMonitor(_probes(2), tile_size=16, writer=[Collect(broken=True), healthy])
    trainer = lit.trainer(tmp_path, [monitor], max_epochs=2)
    with pytest.warns(
        RuntimeWarning,
        match=r"could not write the pass at step 0: Collect\.add_grid failed: OSError: disk full",
    ):
        trainer.fit(lit.LitViT(), *lit.loaders())
    assert trainer.global_step == 8  # training went on
    assert sorted(set(healthy.scalar_steps)) == [0, 4, 8]  # the healthy writer got every pass, the failed one too


class _SlowThreadSafe:
    """A thread-safe writer that takes its time: what a slow disk or a remote store does to a pass."""

    def __new__(cls):
        import threading
        import time

        from lightning_attn.writers import AttentionWriter

        class Slow(AttentionWriter):
            thread_safe = True

            def __init__(self):
                self.images, self.threads = [], set()

            def add_image(self, tag, image, step):
                time.sleep(0.02)
                self.images.append((tag, step))
                self.threads.add(threading.current_thread().name)

            def add_scalar(self, tag, value, step):
                pass

            def add_animation(self, tag, frames, step, duration_ms=500):
                self.images.append((tag, step))

        return Slow()


def test_thread_safe_writers_write_off_the_loop_and_everything_is_stored_before_a_checkpoint(tmp_path):
    slow = _SlowThreadSafe()
    monitor = AttentionMonitor(_probes(2), tile_size=16, writer=slow)
    seen_at_checkpoint = []

    class Check(pl.Callback):
        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            seen_at_checkpoint.append(
                (trainer.global_step, sorted({s for t, s in slow.images if t == "attention/raw"}))
            )

    trainer = lit.trainer(
        tmp_path,
        [monitor, Check(), pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt")],
        max_epochs=2,
        enable_checkpointing=True,
    )
    trainer.fit(lit.LitViT(), *lit.loaders())
    assert slow.threads == {"lightning-attn-writer"}
    # every pass up to the checkpoint's step was stored when the checkpoint was written
    assert seen_at_checkpoint == [(4, [0, 4]), (8, [0, 4, 8])]
    assert [t for t, s in slow.images if "evolution" in t] == [
        "attention/rollout_evolution/probe_00",
        "attention/rollout_evolution/probe_01",
    ]
    assert monitor._writer.writers[0]._thread is None, "the writer thread stops at teardown"


def test_the_passes_before_a_crash_are_written(tmp_path):
    slow = _SlowThreadSafe()
    monitor = AttentionMonitor(_probes(2), tile_size=16, writer=slow)

    class Crash(lit.LitViT):
        def training_step(self, batch, batch_idx):
            if self.global_step == 6:
                raise KeyError("crash")
            return super().training_step(batch, batch_idx)

    trainer = lit.trainer(tmp_path, [monitor], max_epochs=3)
    with pytest.raises(KeyError, match="crash"):
        trainer.fit(Crash(), *lit.loaders())
    assert sorted({s for t, s in slow.images if t == "attention/raw"}) == [0, 4]


def test_gif_frames_are_drawn_pass_by_pass(tmp_path):
    monitor = AttentionMonitor(_probes(2), tile_size=16, writer=_SlowThreadSafe())
    frames = []

    class Count(pl.Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                frames.append(len(monitor.runner._gifs.get("attention/rollout_evolution/probe_00", ())))

    trainer = lit.trainer(tmp_path, [monitor, Count()], max_epochs=3)
    trainer.fit(lit.LitViT(), *lit.loaders())
    assert frames == [2, 3, 4]  # the baseline and each epoch's pass, added as they ran
    gifs = monitor.runner.animations()
    assert len(gifs["attention/rollout_evolution/probe_01"]) == 4
