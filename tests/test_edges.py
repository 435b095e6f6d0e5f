"""The edges of a run, tried as a new user and as an adversary would: a run's end, a run after another, a resume
with a changed configuration, bad input caught at construction or setup, batches of every shape, custom ViTs."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset

from lightning_attn import AttentionMonitor, ProbeOptions, ProbeRunner, Probes, TokenLayout
from lightning_attn.render import fit_label
from lightning_attn.runner import MAX_ANIMATED

import lit


def _probes(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, lit.IMG, lit.IMG, generator=torch.Generator().manual_seed(seed))


def _raw_steps(log_dir) -> list[int]:
    return [e.step for e in lit.read_events(log_dir).Images("attention/raw")]


# ----------------------------------------------------------------------------- the end of a run


class _Witness(pl.Callback):
    def __init__(self) -> None:
        self.ended = False

    def on_fit_end(self, trainer, pl_module) -> None:
        self.ended = True


def test_unwritable_log_dir_at_the_end_of_fit_warns_and_the_run_finishes(tmp_path):
    (tmp_path / "tb" / "version_0").mkdir(parents=True)
    (tmp_path / "tb" / "version_0" / "attention").write_text("a file where the GIF folder should go")
    witness = _Witness()
    monitor = AttentionMonitor(_probes(), tile_size=16)
    logger = pl.loggers.TensorBoardLogger(tmp_path, name="tb", version=0)
    trainer = lit.trainer(tmp_path, [monitor, witness], logger=logger, max_epochs=1)
    with pytest.warns(RuntimeWarning, match="AttentionMonitor could not write"):
        trainer.fit(lit.LitViT(), *lit.loaders())
    assert trainer.state.status == "finished" and witness.ended  # later callbacks' on_fit_end still ran
    assert _raw_steps(trainer.logger.log_dir) == [0, 4]  # the grids themselves still reached TensorBoard


class _Flaky(Dataset):
    """A validation set whose storage fails the first two times it is read."""

    def __init__(self) -> None:
        self.data = lit.dataset(16, seed=1)
        self.failures = 2

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        if self.failures > 0 and i == 0:
            self.failures -= 1
            raise OSError("stale file handle")
        return self.data[i]


def test_transient_loader_error_warns_once_and_the_probes_come_at_a_later_pass(tmp_path):
    monitor = AttentionMonitor(2, tile_size=16)
    train, _ = lit.loaders()
    flaky = _Flaky()
    with pytest.warns(RuntimeWarning, match="could not take the probes.*tries again") as record:
        lit.trainer(tmp_path, [monitor], max_epochs=3, num_sanity_val_steps=0).fit(
            lit.LitViT(), train, DataLoader(flaky, batch_size=8)
        )
    assert sum("could not take the probes" in str(w.message) for w in record) == 1
    # probes taken when the data came back; the passes after it logged
    assert _raw_steps(tmp_path / "tb" / "version_0")[-1] == 12


# ----------------------------------------------------------------------------- one monitor, two runs


def test_a_monitor_reused_for_a_second_trainer_starts_a_new_run(tmp_path):
    monitor = AttentionMonitor(_probes(), tile_size=16)
    first = lit.trainer(tmp_path / "one", [monitor], max_epochs=1)
    first.fit(lit.LitViT(), *lit.loaders())
    second = lit.trainer(tmp_path / "two", [monitor], max_epochs=1)
    second.fit(lit.LitViT(lr=0.3), *lit.loaders())
    assert _raw_steps(first.logger.log_dir) == [0, 4]  # run 2 wrote nothing into run 1's folder
    assert _raw_steps(second.logger.log_dir) == [0, 4]  # and got its own baseline
    assert [s for s, _ in monitor.runner.history] == [0, 4]


# ----------------------------------------------------------------------------- resume with another configuration


def _resume(tmp_path, first: AttentionMonitor, second: AttentionMonitor, **val) -> pl.Trainer:
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    lit.trainer(tmp_path, [first, ckpt], enable_checkpointing=True, max_epochs=2).fit(lit.LitViT(), *lit.loaders())
    trainer = lit.trainer(
        tmp_path,
        [second, pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "c2")],
        enable_checkpointing=True,
        max_epochs=3,
    )
    trainer.fit(lit.LitViT(), *lit.loaders(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    return trainer


@pytest.mark.parametrize(
    "first, second, what",
    [
        (dict(probes=_probes(2)), dict(probes=_probes(3)), r"probes \(2 then, 3 now, or other images\)"),
        (dict(probes=2), dict(probes=4), r"probes \(2 then, 4 now, or other images\)"),
        (
            dict(probes=_probes(2)),
            dict(probes=_probes(2), head_fusion="max"),
            r"`head_fusion` \('mean' then, 'max' now\)",
        ),
    ],
)
def test_resume_with_other_probes_or_map_options_starts_a_new_baseline(tmp_path, first, second, what):
    a = AttentionMonitor(**first, tile_size=16)
    b = AttentionMonitor(**second, tile_size=16)
    # one reason, said once, in a sentence that reads
    match = f"resumed with other settings than the checkpoint's \\({what}\\): drift .*new baseline at this step"
    with pytest.warns(RuntimeWarning, match=match):
        trainer = _resume(tmp_path, a, b)
    # the new baseline is taken at the resume step (8) and every later pass logs; nothing skipped
    assert [s for s, _ in b.runner.history] == [8, 12]
    assert len(b.runner.probes) == (len(second["probes"]) if isinstance(second["probes"], torch.Tensor) else 4)
    assert _raw_steps(trainer.logger.log_dir)[-2:] == [8, 12]
    assert b.last_metrics["attention_drift_baseline/raw/mean"] >= 0


def test_resume_with_the_same_configuration_keeps_the_baseline(tmp_path):
    a, b = AttentionMonitor(_probes(), tile_size=16), AttentionMonitor(_probes(), tile_size=16)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*resumed with other.*")
        _resume(tmp_path, a, b)
    assert [s for s, _ in b.runner.history] == [0, 4, 8, 12]


# ----------------------------------------------------------------------------- bad input, caught early


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(masks=torch.full((2, lit.IMG, lit.IMG), 255, dtype=torch.uint8)), r"\[0, 1\].*masks > 127"),
        (dict(masks=torch.full((2, lit.IMG, lit.IMG), float("nan"))), "NaN"),
        (dict(probes=torch.randn(2, 3, 32, 48), masks=torch.ones(2, 48, 32, dtype=torch.bool)), "H and W swapped"),
        (dict(labels=[0.5, 1.0]), "integer class indices.*labels.long"),
        (dict(labels=["cat", "dog"]), "class indices.*class_names"),
        (dict(labels=[-1, 0]), ">= 0"),
        (dict(probes=torch.randint(0, 255, (2, 3, lit.IMG, lit.IMG), dtype=torch.uint8)), "uint8 pixels"),
        (dict(probes=torch.randn(0, 3, lit.IMG, lit.IMG)), "empty batch"),
        (dict(probes=torch.randn(2, 3, lit.IMG, lit.IMG, device="meta")), "meta device"),
        (dict(artifact_threshold=float("nan")), "`artifact_threshold` must be a finite number"),
        (dict(std=(float("inf"),) * 3), "`std` values must be finite"),
        (dict(std=(float("nan"),)), "`std` values must be finite"),
        (dict(mean="abc"), "`mean` must hold 1 or 3 values"),
        (dict(faithfulness_steps=10**9), r"`faithfulness_steps` must be an int in \[1, 100\]"),
        (dict(tile_size=2000), r"`tile_size` must be an int in \[8, 512\]"),
        (dict(head_layers=None), "`head_layers` must be a sequence"),
        (dict(matrix_layers=None), "`matrix_layers` must be a sequence"),
        (dict(aggregates=None), "`aggregates` must be a sequence"),
        (dict(transform="resize"), "`transform` must be a callable"),
        (dict(class_names="cat"), "`class_names` must be a sequence"),
        (dict(batch_to_probes=3), "`batch_to_probes` must be a callable"),
        (dict(layout=(1, (4, 4))), "`layout` must be a lightning_attn.TokenLayout"),
    ],
)
def test_bad_input_fails_at_construction_with_the_fix(kwargs, match):
    kwargs = {"probes": _probes(), **kwargs}
    with pytest.raises(ValueError, match=match):
        AttentionMonitor(**kwargs)


def test_numpy_layer_indices_are_accepted():
    assert AttentionMonitor(_probes(), layers=np.array([0, -1])).options.layers == (0, -1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(labels=[0, 5]), r"`labels` \[5\] are out of range: VisionTransformer has 3 classes"),
        (dict(class_names=["a", "b"]), "`class_names` has 2 names but VisionTransformer has 3 classes"),
    ],
)
def test_labels_and_class_names_checked_against_the_model_at_setup(tmp_path, kwargs, match):
    monitor = AttentionMonitor(_probes(), **kwargs)
    with pytest.raises(ValueError, match=match):
        lit.trainer(tmp_path, [monitor], max_epochs=1).fit(lit.LitViT(), *lit.loaders())


def test_limit_val_batches_zero_names_the_real_cause(tmp_path):
    with pytest.raises(ValueError, match="limit_val_batches=0"):
        lit.trainer(tmp_path, [AttentionMonitor(4)], limit_val_batches=0).fit(lit.LitViT(), *lit.loaders())


def test_too_many_loader_probes_fail_when_training_starts_without_a_baseline(tmp_path):
    model = lit.LitViT()
    with pytest.raises(ValueError, match="has only 16"):
        lit.trainer(tmp_path, [AttentionMonitor(100, log_baseline=False)]).fit(model, *lit.loaders())
    assert model.train_losses == []  # before the first training step, not after an epoch


def test_many_probes_warn_and_animate_a_bounded_number():
    model = lit.LitViT().model.eval()
    with pytest.warns(RuntimeWarning, match="65 probes"):
        runner = ProbeRunner(
            model,
            Probes(torch.randn(65, 3, lit.IMG, lit.IMG)),
            ProbeOptions(tile_size=8, diagnostics=False, head_layers=(), aggregates=()),
        )
    runner.run(0, render=False)
    assert len(runner.animations()) == MAX_ANIMATED


# ----------------------------------------------------------------------------- what the rows say


@pytest.mark.parametrize("label", ["#12 y571 p571", "#3 y=golden retriever p=tabby cat", "#100 t999"])
@pytest.mark.parametrize("width", [16, 24, 56])
def test_row_labels_never_cut_inside_a_word(label, width):
    draw = ImageDraw.Draw(Image.new("RGB", (100, 24)))
    text, font = fit_label(draw, label, width)
    assert draw.textlength(text, font=font) <= width
    words = label.split(" ")
    kept = [w for w in text.split(" ") if w != "…"]
    assert kept == words[: len(kept)], f"{text!r} is not made of whole words of {label!r}"


def test_class_names_on_the_rows(tmp_path):
    monitor = AttentionMonitor(
        _probes(), labels=[0, 2], class_names=["cat", "dog", "bird"], tile_size=48, methods=("raw", "relevance")
    )
    lit.trainer(tmp_path, [monitor], max_epochs=1, logger=False).fit(lit.LitViT(), *lit.loaders())
    from lightning_attn.runner import row_labels

    maps = monitor.runner.compute()[0]
    assert row_labels(2, monitor.runner.probes.labels, maps, "relevance", ["cat", "dog", "bird"]) == [
        "#0 t=cat",
        "#1 t=bird",
    ]
    assert row_labels(2, monitor.runner.probes.labels, maps, "raw", ["cat", "dog", "bird"])[0].startswith("#0 y=cat p=")


# ----------------------------------------------------------------------------- validate from a checkpoint


def test_validate_with_ckpt_path_logs_at_the_checkpoints_step_outside_the_history(tmp_path, caplog):
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit = lit.trainer(
        tmp_path / "fit", [AttentionMonitor(_probes(), tile_size=16), ckpt], enable_checkpointing=True, max_epochs=2
    )
    model = lit.LitViT()
    fit.fit(model, *lit.loaders())
    with caplog.at_level("INFO"):
        fit.validate(model, lit.loaders()[1], verbose=False)  # right after fit: nothing new, and it says so
    assert "AttentionMonitor logs nothing for this validate at step 8" in caplog.text
    monitor = AttentionMonitor(_probes(), tile_size=16)
    trainer = lit.trainer(tmp_path / "val", [monitor])
    trainer.validate(lit.LitViT(), lit.loaders()[1], ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), verbose=False)
    assert _raw_steps(trainer.logger.log_dir) == [8]  # the checkpoint's step, not 0
    # the run's history came back with the checkpoint; the validate-only pass did not add to it
    assert [s for s, _ in monitor.runner.history] == [0, 4, 8]
    # its filmstrip column replaces the recorded step 8 (s0 s4 s8), not repeats it (s0 s4 s8 s8)
    (during_fit,) = [e for e in lit.read_events(fit.logger.log_dir).Images("attention/filmstrip") if e.step == 8]
    (validated,) = lit.read_events(trainer.logger.log_dir).Images("attention/filmstrip")
    assert (validated.width, validated.height) == (during_fit.width, during_fit.height)


# ----------------------------------------------------------------------------- batches of every shape


@dataclasses.dataclass
class _Batch:
    pixels: torch.Tensor
    label: torch.Tensor


class _Shaped(Dataset):
    def __init__(self, kind: str) -> None:
        self.data, self.kind = lit.dataset(16, seed=1), kind

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        mask = torch.zeros(lit.IMG, lit.IMG)
        return {"triple": (x, mask, y), "other_keys": {"img_t": x, "cls": y}, "dataclass": (x, y)}[self.kind]


def _collate_dataclass(items) -> _Batch:
    return _Batch(torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items]))


class _LitAny(lit.LitViT):
    def validation_step(self, batch, _):
        pass


@pytest.mark.parametrize("kind", ["triple", "other_keys", "dataclass"])
def test_validation_batches_of_every_shape_keep_their_labels(tmp_path, kind):
    read = None
    collate = _collate_dataclass if kind == "dataclass" else None
    if kind == "other_keys":
        read = lambda batch: (batch["img_t"], batch["cls"])  # noqa: E731
    elif kind == "dataclass":
        read = None  # dataclass fields are read like a dict: no option needed when the names are common ones
    val = DataLoader(_Shaped(kind), batch_size=8, collate_fn=collate)
    monitor = AttentionMonitor(3, tile_size=16, batch_to_probes=read)
    if kind == "dataclass":
        monitor = AttentionMonitor(3, tile_size=16, batch_to_probes=lambda b: (b.pixels, b.label))
    lit.trainer(tmp_path, [monitor], max_epochs=1).fit(_LitAny(), lit.loaders()[0], val)
    assert torch.equal(monitor.runner.probes.labels.cpu(), lit.dataset(16, seed=1).tensors[1][:3])


def test_a_batch_whose_labels_cannot_be_found_warns_instead_of_dropping_them(tmp_path):
    val = DataLoader(_Shaped("other_keys"), batch_size=8)
    with pytest.raises(ValueError, match="batch_to_probes"):  # no image key: the option is named
        lit.trainer(tmp_path, [AttentionMonitor(3)], max_epochs=1).fit(_LitAny(), lit.loaders()[0], val)
    only_images = DataLoader(
        _Shaped("other_keys"),
        batch_size=8,
        collate_fn=lambda items: {
            "image": torch.stack([d["img_t"] for d in items]),
            "cls": torch.tensor([d["cls"] for d in items]),
        },
    )
    with pytest.warns(RuntimeWarning, match="without labels.*batch_to_probes"):
        lit.trainer(tmp_path / "b", [AttentionMonitor(3, tile_size=16)], max_epochs=1).fit(
            _LitAny(), lit.loaders()[0], only_images
        )


# ----------------------------------------------------------------------------- a custom ViT on nn.MultiheadAttention


class _TutorialViT(torch.nn.Module):
    """The shape of the Lightning tutorials' Vision Transformer: patches by reshaping, a class token, and blocks
    of `nn.MultiheadAttention` in (tokens, batch, dim) layout."""

    def __init__(self, dim: int = 48, heads: int = 3, depth: int = 2, patch: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.patch = patch
        self.embed = torch.nn.Linear(3 * patch * patch, dim)
        self.cls_token = torch.nn.Parameter(torch.randn(1, 1, dim))
        self.pos = torch.nn.Parameter(torch.randn(1, 1 + (lit.IMG // patch) ** 2, dim))
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(dim) for _ in range(depth))
        self.attns = torch.nn.ModuleList(torch.nn.MultiheadAttention(dim, heads) for _ in range(depth))
        self.head = torch.nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.patch
        patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).flatten(1, 2).flatten(2)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), self.embed(patches)], dim=1) + self.pos
        tokens = tokens.transpose(0, 1)
        for norm, attn in zip(self.norms, self.attns):
            inp = norm(tokens)
            tokens = tokens + attn(inp, inp, inp)[0]
        return self.head(tokens[0])


class _LitTutorial(lit.LitViT):
    def __init__(self) -> None:
        super().__init__()
        self.model = _TutorialViT()


def test_a_custom_vit_on_multihead_attention_works_with_layout(tmp_path):
    monitor = AttentionMonitor(
        _probes(),
        labels=[0, 1],
        methods=("raw", "rollout", "relevance"),
        tile_size=16,
        layout=TokenLayout(1, (4, 4), "cls", (8, 8)),
        mean=(0.0,),
        std=(1.0,),
        on_error="raise",
    )
    trainer = lit.trainer(tmp_path, [monitor], max_epochs=1)
    trainer.fit(_LitTutorial(), *lit.loaders())
    assert _raw_steps(trainer.logger.log_dir) == [0, 4]
    assert monitor.last_metrics["attention_entropy/relevance/layer_01"] >= 0
    # without layout: what to do, `layout=` included
    with pytest.raises(
        ValueError, match=r"not a supported Vision Transformer.*`nn\.MultiheadAttention`.*layout=TokenLayout"
    ):
        lit.trainer(tmp_path / "b", [AttentionMonitor(_probes())]).fit(_LitTutorial(), *lit.loaders())


# ----------------------------------------------------------------------------- hygiene


def test_ci_fails_when_no_test_is_collected():
    script = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    # pytest's own exit status, 5 for "no tests collected" included, is CI's: nothing turns it into success
    assert "set -euo pipefail" in script and "exit 0" not in script and '"$rc"' not in script
    assert "set +e" not in script and "|| true" not in script
    # on a line of its own (not in a condition, no `||`): under `set -e` its failure ends the run with its status
    assert "python -m pytest --doctest-modules lightning_attn tests" in script.splitlines()
