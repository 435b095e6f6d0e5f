"""The callback's class-targeted maps, faithfulness, localisation and fine-tuning diagnostics, on real fits."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_attn import AttentionMonitor, attention_maps, find_attention_modules, jaccard_index, pointing_game
from lightning_attn.render import COLOUR_BAR_HEIGHT, grid_shape
from lightning_attn.runner import row_labels

import lit

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def _probes(n=3, seed=7):
    return torch.randn(n, 3, lit.IMG, lit.IMG, generator=torch.Generator().manual_seed(seed))


def _masks(n=3):
    masks = torch.zeros(n, lit.IMG, lit.IMG, dtype=torch.bool)
    masks[:, 8:24, 4:20] = True
    return masks


ALL = ("raw", "rollout", "grad_rollout", "relevance")


def test_class_targeted_maps_faithfulness_and_localisation_are_logged(tmp_path):
    labels = torch.tensor([0, 2, 1])
    monitor = AttentionMonitor(
        _probes(),
        labels=labels,
        masks=_masks(),
        methods=ALL,
        faithfulness=True,
        faithfulness_steps=4,
        tile_size=16,
        mean=MEAN,
        std=STD,
        on_error="raise",
    )
    trainer = lit.trainer(tmp_path, [monitor])
    model = lit.LitViT()
    trainer.fit(model, *lit.loaders())
    acc = lit.read_events(trainer.logger.log_dir)
    for method in ALL:
        assert [e.step for e in acc.Images(f"attention/{method}")] == [0, 4, 8]
        assert [s.step for s in acc.Scalars(f"attention_pointing_game/{method}")] == [0, 4, 8]
        assert [s.step for s in acc.Scalars(f"attention_jaccard/{method}")] == [0, 4, 8]
        for curve in ("most_first_auc", "least_first_auc"):
            values = [s.value for s in acc.Scalars(f"attention_faithfulness/{curve}/{method}")]
            assert len(values) == 3 and all(0 <= v <= 1 for v in values)
    assert len(acc.Scalars("attention_faithfulness/most_first_auc/random")) == 3

    # the last pass explained the labels: recompute independently from the trained model
    expected = attention_maps(model.model, _probes(), methods=("relevance",), target=labels)
    game = pointing_game(expected.relevance[:, -1], _masks()).mean().item()
    assert monitor.last_metrics["attention_pointing_game/relevance"] == pytest.approx(game, abs=1e-5)
    jaccard = jaccard_index(expected.relevance[:, -1], _masks()).mean().item()
    assert monitor.last_metrics["attention_jaccard/relevance"] == pytest.approx(jaccard, abs=1e-5)


def test_gradient_methods_leave_grads_alone_under_fit_and_validate(tmp_path):
    monitor = AttentionMonitor(_probes(), methods=ALL, tile_size=16, on_error="raise")
    model = lit.LitViT()
    trainer = lit.trainer(tmp_path, [monitor])
    trainer.validate(model, lit.loaders()[1])  # inference_mode: autograd must be switched on locally
    assert "attention_pointing_game/relevance" not in monitor.last_metrics  # no masks given
    assert np.isfinite(list(monitor.last_metrics.values())).all()

    grads = {n: torch.full_like(p, 0.25) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    model.model.head.weight.grad = None
    state = copy.deepcopy(model.state_dict())
    monitor._last_step = None
    with torch.no_grad():  # as during fit's validation
        monitor._run(trainer, model)
    for n, p in model.named_parameters():
        if n == "model.head.weight":
            assert p.grad is None
        else:
            assert torch.equal(p.grad, grads[n]), n
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(not m._forward_hooks for m in model.modules())
    assert all(m.fused_attn for _, m in find_attention_modules(model))


def test_gradient_rows_show_the_explained_class(tmp_path):
    monitor = AttentionMonitor(_probes(2), labels=[1, 2], methods=("relevance",), tile_size=16, aggregates=())
    trainer = lit.trainer(tmp_path, [monitor], max_epochs=1, logger=False)
    trainer.fit(lit.LitViT(), *lit.loaders())
    maps = attention_maps(
        trainer.lightning_module.model, _probes(2), methods=("relevance",), target=torch.tensor([1, 2])
    )
    probes = monitor._probes
    assert row_labels(len(probes), probes.labels, maps, "relevance") == ["#0 t1", "#1 t2"]
    assert row_labels(len(probes), probes.labels, maps, "raw")[0].startswith("#0 y1 p")


def test_drift_is_zero_without_learning_and_positive_with(tmp_path):
    frozen = AttentionMonitor(_probes(), tile_size=16)
    lit.trainer(tmp_path / "frozen", [frozen]).fit(lit.LitViT(lr=0.0), *lit.loaders())
    drift = {k: v for k, v in frozen.last_metrics.items() if k.startswith("attention_drift_")}
    assert len(drift) == 2 * 2 * (2 + 1)  # baseline and previous x raw and rollout x (2 layers + mean)
    assert max(drift.values()) < 1e-9

    learning = AttentionMonitor(_probes(), tile_size=16)
    lit.trainer(tmp_path / "learning", [learning]).fit(lit.LitViT(lr=0.5), *lit.loaders())
    # fresh attention is near uniform, so drift is small in absolute terms: compare with the frozen run's zero
    assert learning.last_metrics["attention_drift_baseline/rollout/mean"] > 1e-6
    assert learning.last_metrics["attention_drift_previous/raw/mean"] > 1e-6


def test_diagnostic_scalars_heads_filmstrip_and_gif(tmp_path):
    monitor = AttentionMonitor(_probes(2), tile_size=16, filmstrip_length=1, head_layers=[0, -1], on_error="raise")
    trainer = lit.trainer(tmp_path, [monitor], max_epochs=3)
    trainer.fit(lit.LitViT(reg_tokens=4), *lit.loaders())
    m = monitor.last_metrics
    for layer in range(2):
        assert 0 <= m[f"attention_register_share/layer_{layer:02d}"] <= 1
        assert m[f"attention_artifacts/count/layer_{layer:02d}"] >= 0
        assert 0 <= m[f"attention_artifacts/share/layer_{layer:02d}"] <= 1
        # 4x4 grid of 8-pixel patches: distances lie between 0 and the grid's diagonal
        heads = [m[f"attention_head_distance/layer_{layer:02d}/head_{h:02d}"] for h in range(3)]
        assert all(0 <= d <= 8 * 3 * 2**0.5 for d in heads)
        assert m[f"attention_distance/layer_{layer:02d}"] == pytest.approx(sum(heads) / 3, rel=1e-5)

    acc = lit.read_events(trainer.logger.log_dir)
    for layer in (0, 1):
        heads = acc.Images(f"attention/heads/layer_{layer:02d}")
        assert [e.step for e in heads] == [0, 4, 8, 12]
        height, width = grid_shape(2, 4, 16, 16, True, True)  # image + 3 heads, and the colour bar under them
        assert (heads[-1].height, heads[-1].width) == (height + COLOUR_BAR_HEIGHT, width)
    strips = acc.Images("attention/filmstrip")
    # image, baseline, then at most `filmstrip_length` recent passes
    assert [e.width for e in strips] == [grid_shape(2, c, 16, 16, True, True)[1] for c in (2, 3, 3, 3)]

    gifs = sorted((tmp_path / "tb" / "version_0" / "attention").glob("*.gif"))
    assert [g.name for g in gifs] == [f"attention__rollout_evolution__probe_{i:02d}.gif" for i in range(2)]
    with Image.open(gifs[0]) as gif:
        assert gif.n_frames == 4  # baseline + 3 epochs
        height, width = grid_shape(1, 2, 32, 32, has_col_labels=True)
        assert gif.size[::-1] == (height + COLOUR_BAR_HEIGHT, width)
    # the same animation in TensorBoard's images tab, at the final step
    (animation,) = lit.read_events(trainer.logger.log_dir).Images("attention/rollout_evolution/probe_00")
    assert animation.step == 12 and animation.encoded_image_string == gifs[0].read_bytes()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(head_layers=[0, 0]), "repeated"),
        (dict(faithfulness_steps=0), "`faithfulness_steps`"),
        (dict(filmstrip_length=0), "`filmstrip_length`"),
        (dict(artifact_threshold=1.0), "`artifact_threshold`"),
    ],
)
def test_new_options_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttentionMonitor(**kwargs)
