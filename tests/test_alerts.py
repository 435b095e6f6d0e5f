"""Attention-health alerts: each rule on hand-made histories, then provoked in real tiny fits (uniform attention
from zeroed and frozen q/k, a constructed token that takes the attention, a map that leaves the object, a learning
rate 1000x too high), the stop mode, the checkpoint, and what each logger gets."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_attn import AlertBook, AlertThresholds, AttentionMonitor
from lightning_attn.alerts import (
    ArtifactRule,
    ChanceRule,
    CollapseRule,
    OverwriteRule,
    PointingRule,
    UniformRule,
    rules_for,
)

import lit

# ---------------------------------------------------------------------------------------------------- pure rules


def _history(*passes):
    """(step, scalars) of passes at steps 0, 4, 8, ..., the first being the baseline."""
    return [(4 * i, dict(p)) for i, p in enumerate(passes)]


def _entropy(late, early=0.9, method="raw", layers=3):
    out = {f"attention_entropy/{method}/layer_{l:02d}": early for l in range(layers - 1)}
    out[f"attention_entropy/{method}/layer_{layers - 1:02d}"] = late
    out[f"attention_entropy_median/{method}"] = late
    return out


def _drift(early, late, layers=3):
    out = {f"attention_drift_baseline/raw/layer_{l:02d}": (early + late) / 2 for l in range(layers)}
    out["attention_drift_baseline/raw/layer_00"] = early
    out[f"attention_drift_baseline/raw/layer_{layers - 1:02d}"] = late
    return out


@pytest.mark.parametrize("patience", [0, 4, 8])
def test_collapse_needs_patience_steps_after_the_baseline(patience):
    rule = CollapseRule(entropy=0.05, patience=patience)
    low, high = _entropy(0.01), _entropy(0.9)
    assert rule.check(_history(low)) is None  # the baseline alone never fires
    assert rule.check(_history(low, *[high] * 3)) is None
    passes = patience // 4 + 1  # passes 4 steps apart covering `patience` steps
    assert rule.check(_history(high, *[low] * (passes - 1))) is None
    found = rule.check(_history(high, *[low] * passes))
    assert found.layers == (2,) and found.curve == "attention_entropy_median/raw" and found.methods == ("raw",)
    assert rule.check(_history(high, *[low] * passes, high)) is None  # cleared


def test_collapse_of_any_layer_mean_over_probes():
    # a learning-rate blow-up can collapse an early layer (the corpus's "lr x300" run collapses layer 0)
    rule = CollapseRule(entropy=0.05, patience=4)
    early = {**_entropy(0.9), "attention_entropy/raw/layer_00": 0.0}
    found = rule.check(_history(_entropy(0.9), early, early))
    assert found.layers == (0,) and found.curve == "attention_entropy/raw" and "layer 0 0.000" in found.detail


def test_patience_is_in_steps_not_passes():
    """Validating 4x as often must not make a rule fire sooner (the issue's `uniform` at step 30 of a run
    validated every 10 steps)."""
    rule = CollapseRule(entropy=0.05, patience=40)
    low, high = _entropy(0.01), _entropy(0.9)
    for every in (5, 10, 20, 40):
        history = [(0, high)] + [(every * i, low) for i in range(1, 200 // every + 1)]
        fired = next(s for i, (s, _) in enumerate(history) if rule.check(history[: i + 1]) is not None)
        assert fired == every + 40  # the first collapsed pass plus 40 steps, however often the passes come


def _layers(*values, method="raw"):
    return {f"attention_entropy/{method}/layer_{l:02d}": v for l, v in enumerate(values)}


def _uniform_pass(*values, rollout=None):
    return {**_layers(*values), **_layers(*(rollout or values), method="rollout")}


def test_uniform_needs_every_layer_and_the_rollout_near_uniform_and_not_forming():
    rule = UniformRule(entropy=0.98, patience=8, change=0.002)
    flat = _uniform_pass(0.999, 0.999, 0.999)
    found = rule.check(_history(flat, flat, flat, flat))  # steps 4 -> 12: 8 steps
    assert found.layers == (0, 1, 2) and found.curve == "attention_entropy/raw" and found.methods == ("raw", "rollout")
    assert rule.check(_history(flat, flat, flat)) is None  # 4 steps only
    # one layer attends selectively: the network learned where to look, even if its late layers average
    routed = _uniform_pass(0.61, 0.985, 0.99)
    assert rule.check(_history(flat, routed, routed, routed)) is None
    # the rollout attends selectively: the same
    assert rule.check(_history(flat, *[_uniform_pass(0.99, 0.99, 0.99, rollout=(0.99, 0.95, 0.9))] * 3)) is None
    # still forming (1 - entropy grows: 0.9999 -> 0.985), all layers above 0.98 yet
    forming = [_uniform_pass(*[v] * 3) for v in (0.9999, 0.999, 0.99, 0.985)]
    assert rule.check(_history(flat, *forming)) is None
    # settled: near uniform, no longer changing
    assert rule.check(_history(flat, *forming, *[forming[-1]] * 2, _uniform_pass(0.9845, 0.985, 0.986))) is not None


def test_uniform_reads_raw_alone_when_no_rollout_is_logged():
    rule = UniformRule(entropy=0.98, patience=0)
    assert rule.check(_history(_layers(1.0, 1.0), _layers(1.0, 1.0))).methods == ("raw",)
    assert rule.check(_history(_layers(1.0, 1.0), _layers(0.9, 1.0))) is None


def test_overwrite_only_when_fine_tuning_and_early_layers_drift_as_much():
    rule = OverwriteRule(ratio=1.0, min_drift=0.05, patience=4)
    pretrained, fresh = _entropy(0.6), _entropy(0.995, early=0.995)
    bad, healthy, tiny = _drift(0.4, 0.35), _drift(0.05, 0.4), _drift(0.02, 0.01)
    found = rule.check(_history(pretrained, {**pretrained, **bad}, {**pretrained, **bad}))
    assert found.layers == (0,) and found.curve == "attention_drift_baseline/raw" and "0.400 bits" in found.detail
    assert rule.check(_history(pretrained, {**pretrained, **bad})) is None  # patience 4 steps
    assert rule.check(_history(pretrained, {**pretrained, **healthy}, {**pretrained, **healthy})) is None
    assert rule.check(_history(pretrained, {**pretrained, **tiny}, {**pretrained, **tiny})) is None  # noise floor
    # from scratch the baseline is uniform: every layer moves, nothing pretrained is lost; the rule cannot fire
    assert rule.check(_history(fresh, {**fresh, **bad}, {**fresh, **bad})) is None
    assert not rule.applies(_history(fresh, {**fresh, **bad})) and rule.applies(_history(pretrained, bad))


def test_artifacts_must_grow_in_a_middle_or_late_layer():
    rule = ArtifactRule(share=0.6, growth=0.1, patience=4)
    share = lambda *v: {f"attention_artifacts/share/layer_{l:02d}": x for l, x in enumerate(v)}  # noqa: E731
    assert rule.check(_history(share(0, 0, 0), share(0, 0.7, 0.1), share(0, 0.8, 0))).layers == (1,)
    assert rule.check(_history(share(0, 0.7, 0), share(0, 0.7, 0), share(0, 0.75, 0))) is None  # not growing
    assert rule.check(_history(share(0, 0, 0), share(0.9, 0, 0), share(0.9, 0, 0))) is None  # early layer
    assert rule.check(_history(share(0, 0, 0), share(0, 0.7, 0))) is None
    # a layer looking at a background patch or two is no artifact: the corpus's healthy runs hold up to 0.46
    assert rule.check(_history(share(0, 0, 0), *[share(0, 0.5, 0)] * 5)) is None


def test_pointing_game_falling_below_its_best():
    rule = PointingRule(drop=0.5, patience=4)
    game = lambda v: {"attention_pointing_game/rollout": v, "attention_pointing_game/raw": 0.5}  # noqa: E731
    found = rule.check(_history(game(0.1), game(0.8), game(0.3), game(0.2)))
    assert found.methods == ("rollout",) and "best 0.800" in found.detail
    assert rule.check(_history(game(0.1), game(0.8), game(0.3))) is None
    assert rule.check(_history(game(0.8), game(0.3))) is None  # one pass
    # the final layer's raw attention is read only when it is the only map
    raw_falls = lambda v: {"attention_pointing_game/raw": v, "attention_pointing_game/rollout": 0.5}  # noqa: E731
    assert rule.check(_history(*map(raw_falls, (0.1, 0.8, 0.3, 0.2)))) is None
    only_raw = lambda v: {"attention_pointing_game/raw": v}  # noqa: E731
    assert rule.check(_history(*map(only_raw, (0.1, 0.8, 0.3, 0.2)))).methods == ("raw",)


def _auc(raw, rollout, rnd, drop=0.5):
    return {
        "attention_faithfulness/most_first_auc/raw": raw,
        "attention_faithfulness/most_first_auc/rollout": rollout,
        "attention_faithfulness/most_first_auc/random": rnd,
        "attention_faithfulness/score_drop/mean": drop,
    }


def test_chance_compares_each_method_with_the_random_map():
    rule = ChanceRule(margin=0.02, patience=4, min_drop=0.2)
    found = rule.check(_history(_auc(0.3, 0.3, 0.3), _auc(0.2, 0.29, 0.3), _auc(0.2, 0.31, 0.3)))
    assert found.methods == ("rollout",) and "lowers the score by 0.500" in found.detail
    assert rule.check(_history(_auc(0.3, 0.3, 0.3), _auc(0.3, 0.3, 0.3))) is None


def test_chance_has_no_verdict_while_the_score_does_not_depend_on_the_image():
    # a model that has not learned yet: every deletion curve is flat near 1/classes, no map can beat a random one
    rule = ChanceRule(margin=0.02, patience=4, min_drop=0.2)
    flat = _auc(0.25, 0.25, 0.25, drop=0.01)
    assert rule.check(_history(flat, flat, flat, flat)) is None
    old = {k: v for k, v in flat.items() if "score_drop" not in k}  # a history from before the drop was logged
    assert rule.check(_history(old, old, old)) is None


def test_alert_book_fires_once_per_episode_and_round_trips():
    book = AlertBook(rules_for(AlertThresholds(collapse_patience=0)))
    low, high = _entropy(0.01), _entropy(0.9)
    history = _history(high, low)
    (alert,) = book.update(history)
    assert (alert.rule, alert.step, alert.layers) == ("collapse", 4, (2,))
    assert (
        "Open the curve `attention_entropy_median/raw`" in alert.message
        and "Try: lower the learning rate" in alert.message
    )
    assert book.update(history + [(8, low)]) == []  # the same episode
    assert book.update(history + [(8, low), (12, high)]) == []  # cleared
    assert [a.step for a in book.update(history + [(8, low), (12, high), (16, low)])] == [16]  # a new episode
    assert book.markers([alert]) == {"attention_alerts/collapse": 1.0, "attention_alerts/uniform": 0.0}
    other = AlertBook()
    other.load_state_dict(book.state_dict())
    assert other.alerts == book.alerts and other.active == book.active == {"collapse"}


def test_markers_only_for_rules_that_can_fire_in_the_run():
    """No `chance` curve without faithfulness, no `pointing` curve without masks, no `overwrite` curve from
    scratch: a marker logged as 0 at every pass says "checked, fine" of a rule that was never checked."""
    book = AlertBook()
    assert len(book.markers([])) == 6  # before any pass: not known yet
    scratch = {**_entropy(0.999, early=0.999), **_drift(0.0, 0.0), "attention_artifacts/share/layer_00": 0.0}
    book.update(_history(scratch))
    assert sorted(book.markers([])) == [f"attention_alerts/{r}" for r in ("artifacts", "collapse", "uniform")]
    pretrained = {**scratch, **_entropy(0.6), **_auc(0.3, 0.3, 0.3), "attention_pointing_game/raw": 0.5}
    book = AlertBook()
    book.update(_history(pretrained))
    assert len(book.markers([])) == 6


def test_thresholds_and_mode_are_checked_at_construction():
    with pytest.raises(ValueError, match=r"`alerts` must be True, False or 'stop'"):
        AttentionMonitor(2, alerts="on")
    with pytest.raises(ValueError, match=r"unknown keys \['collapse'\]; valid keys: artifact_growth"):
        AttentionMonitor(2, alert_thresholds={"collapse": 0.1})
    with pytest.raises(ValueError, match=r"`alert_thresholds\['uniform_patience'\]` must be an int >= 0 \(optim"):
        AttentionMonitor(2, alert_thresholds={"uniform_patience": -1})
    with pytest.raises(ValueError, match=r"`alert_thresholds\['collapse_entropy'\]` must be a number in \(0, 1\]"):
        AttentionMonitor(2, alert_thresholds={"collapse_entropy": 1.5})
    with pytest.raises(ValueError, match="must be None, a dict"):
        AttentionMonitor(2, alert_thresholds=0.1)


# ---------------------------------------------------------------------------------------------------- real fits


#: The patience of every rule in the runs below: 8 optimiser steps (passes every 4 steps)
_SHORT = {f"{rule}_patience": 8 for rule in ("collapse", "uniform", "overwrite", "artifact", "pointing", "chance")}
_FOUR = {tag: 4 for tag in _SHORT}


def _probes(n=2, seed=5):
    return torch.randn(n, 3, lit.IMG, lit.IMG, generator=torch.Generator().manual_seed(seed))


def _freeze_uniform(module: lit.LitViT) -> lit.LitViT:
    """Zero every block's q and k projections and keep them at zero (a gradient hook): attention is uniform
    whatever training does, while the values, MLPs and head still learn."""
    for block in module.model.blocks:
        qkv, dim = block.attn.qkv, block.attn.qkv.in_features
        with torch.no_grad():
            qkv.weight[: 2 * dim] = 0
            qkv.bias[: 2 * dim] = 0
        keep = torch.ones_like(qkv.weight[:, :1])
        keep[: 2 * dim] = 0
        qkv.weight.register_hook(lambda grad, keep=keep: grad * keep)
        qkv.bias.register_hook(lambda grad, keep=keep[:, 0]: grad * keep)
    return module


def _learnable(n, seed):
    """Images whose class shifts every pixel: learnable through attention that averages the patches."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 3, lit.IMG, lit.IMG, generator=g) + (y.float() - 1).view(-1, 1, 1, 1)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=seed == 0)


def test_uniform_attention_fires_writes_stops_and_is_not_repeated_after_resume(tmp_path):
    pl.seed_everything(0, verbose=False)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    monitor = AttentionMonitor(
        _probes(), tile_size=16, alerts="stop", faithfulness=True, faithfulness_steps=2, alert_thresholds=_SHORT
    )
    trainer = lit.trainer(tmp_path, [monitor, ckpt], max_epochs=8, enable_checkpointing=True)
    module = _freeze_uniform(lit.LitViT())
    with pytest.warns(RuntimeWarning, match=r"alert 'uniform' at step 12: no layer learned where to look"):
        trainer.fit(module, _learnable(32, 0), _learnable(16, 1))
    # stopped when uniform held over 8 steps (passes at 4, 8, 12), as EarlyStopping would
    assert trainer.global_step == 12 and trainer.should_stop
    rules = {a.rule: a for a in monitor.alerts}
    assert rules["uniform"].step == 12 and rules["uniform"].layers == (0, 1) and rules["uniform"].probes == (0, 1)
    # 12 steps in, the model's score hardly depends on the image: no map can beat a random one, no verdict
    # chance: the model answers from its bias at first (deleting the image does not lower its score): no verdict
    drops = [h["attention_faithfulness/score_drop/mean"] for _, h in monitor.runner.scalar_history]
    assert "chance" not in rules and max(drops[1:3]) < 0.2
    assert monitor.stop_reason == monitor.alerts[0].message
    assert sum(module.train_losses[-4:]) < 0.5 * sum(module.train_losses[:4])  # while the loss falls
    acc = lit.read_events(trainer.logger.log_dir)
    assert [(s.step, s.value) for s in acc.Scalars("attention_alerts/uniform")] == [(0, 0), (4, 0), (8, 0), (12, 1)]
    assert [s.value for s in acc.Scalars("attention_alerts/collapse")] == [0, 0, 0, 0]
    # marker curves only for the rules that can fire: faithfulness on, no masks, from scratch
    markers = {t for t in acc.Tags()["scalars"] if t.startswith("attention_alerts/")}
    assert markers == {f"attention_alerts/{r}" for r in ("collapse", "uniform", "artifacts", "chance")}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    text = EventAccumulator(trainer.logger.log_dir, size_guidance={"tensors": 0})
    text.Reload()
    (event,) = text.Tensors("attention/alerts/uniform/text_summary")
    assert (
        event.step == 12
        and "Try: check that the attention receives gradient" in event.tensor_proto.string_val[0].decode()
    )

    # resume: the alerts come back from the checkpoint and the ongoing episode is not said again
    second = AttentionMonitor(
        _probes(), tile_size=16, alerts="stop", faithfulness=True, faithfulness_steps=2, alert_thresholds=_SHORT
    )
    trainer = lit.trainer(tmp_path, [second, ckpt], max_epochs=4, enable_checkpointing=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(
            _freeze_uniform(lit.LitViT()),
            _learnable(32, 0),
            _learnable(16, 1),
            ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"),
        )
    assert trainer.global_step == 16 and not trainer.should_stop
    assert not [w for w in caught if "AttentionMonitor alert" in str(w.message)]
    assert second.alerts == monitor.alerts


class _Route(pl.Callback):
    """From the first epoch on (after the baseline), the last block's class-token query attends to the patches
    ``schedule[epoch]`` only: a big coordinate on their position embeddings and a rank-one q/k that reads it,
    re-applied at every epoch start (a constructed high-attention token)."""

    def __init__(self, schedule, big=100.0, gain=3.0):
        self.schedule, self.big, self.gain = schedule, big, gain

    def on_train_epoch_start(self, trainer, pl_module):
        vit = pl_module.model
        patches = torch.tensor(self.schedule[min(trainer.current_epoch, len(self.schedule) - 1)])
        attn = vit.blocks[-1].attn
        dim, head_dim = vit.embed_dim, vit.embed_dim // attn.num_heads
        with torch.no_grad():
            vit.cls_token[0, 0, 0] = self.big  # the query reads coordinate 0, the keys coordinate 1
            vit.pos_embed[0, 1:, 1] = 0
            vit.pos_embed[0, 1 + patches, 1] = self.big
            attn.qkv.weight[: 2 * dim] = 0
            attn.qkv.bias[: 2 * dim] = 0
            for h in range(attn.num_heads):
                attn.qkv.weight[h * head_dim, 0] = self.gain
                attn.qkv.weight[dim + h * head_dim, 1] = self.gain


def test_collapse_artifact_and_pointing_from_a_constructed_token(tmp_path):
    masks = torch.zeros(2, lit.IMG, lit.IMG, dtype=torch.bool)
    masks[:, :8, :8] = True  # the object: patch 0
    monitor = AttentionMonitor(_probes(), masks=masks, tile_size=16, on_error="raise", alert_thresholds=_FOUR)
    # epoch 1: all attention on patch 0 (the object); then on patch 15 (background); patience 4 steps (1 epoch)
    trainer = lit.trainer(tmp_path, [monitor, _Route([[0], [15]])], max_epochs=3, logger=False)
    with pytest.warns(RuntimeWarning, match="alert 'collapse' at step 8"):
        trainer.fit(lit.LitViT(), *lit.loaders())
    fired = {(a.rule, a.step): a for a in monitor.alerts}
    # the token on the object is no artifact (with masks the rule reads the share outside them); on background it is
    assert set(fired) == {("collapse", 8), ("artifacts", 12), ("pointing", 12)}, monitor.alerts
    assert fired[("collapse", 8)].layers == (1,) and fired[("collapse", 8)].probes == (0, 1)
    assert (
        fired[("artifacts", 12)].layers == (1,)
        and fired[("artifacts", 12)].curve == "attention_artifacts/background_share"
    )
    assert fired[("pointing", 12)].curve == "attention_pointing_game/rollout"
    assert monitor.last_metrics["attention_pointing_game/raw"] < 0.05
    lines = (tmp_path / "attention" / "alerts.txt").read_text().splitlines()  # the files writer
    assert [line.split("\t")[:2] for line in lines] == [
        ["8", "attention/alerts/collapse"],
        ["12", "attention/alerts/artifacts"],
        ["12", "attention/alerts/pointing"],
    ]

    # two constructed tokens: artifacts without collapse (entropy ~ log 2 / log 16)
    monitor = AttentionMonitor(_probes(), tile_size=16, on_error="raise", alert_thresholds=_FOUR)
    lit.trainer(tmp_path / "two", [monitor, _Route([[5, 10]])], max_epochs=2, logger=False).fit(
        lit.LitViT(), *lit.loaders()
    )
    assert [(a.rule, a.step) for a in monitor.alerts] == [("artifacts", 8)]


class _LitAdam(lit.LitViT):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def _pretrained(lr):
    """Sharpened q/k stand in for pretrained attention (a fresh model's is near uniform)."""
    torch.manual_seed(0)
    module = _LitAdam(depth=3, lr=lr)
    with torch.no_grad():
        for block in module.model.blocks:
            block.attn.qkv.weight[: 2 * block.attn.qkv.in_features].mul_(8)
    return module


def test_learning_rate_1000x_too_high_overwrites_pretrained_features(tmp_path):
    runs = {}
    for lr in (1e-4, 1e-1):
        monitor = AttentionMonitor(_probes(4), tile_size=16, on_error="raise", alert_thresholds=_SHORT)
        lit.trainer(tmp_path / str(lr), [monitor], max_epochs=3, logger=False).fit(_pretrained(lr), *lit.loaders())
        runs[lr] = monitor
    assert runs[1e-4].alerts == []
    assert "overwrite" in {a.rule for a in runs[1e-1].alerts}, runs[1e-1].alerts
    (overwrite,) = [a for a in runs[1e-1].alerts if a.rule == "overwrite"]
    assert overwrite.layers == (0,) and overwrite.curve == "attention_drift_baseline/raw"


def test_alerts_off_logs_no_marker(tmp_path):
    monitor = AttentionMonitor(_probes(), tile_size=16, alerts=False)
    lit.trainer(tmp_path, [monitor], max_epochs=1, logger=False).fit(lit.LitViT(), *lit.loaders())
    assert monitor.alerts == [] and not [t for t in monitor.last_metrics if "_alerts/" in t]


def test_stop_under_ddp_every_rank_stops_at_the_same_pass(tmp_path):
    # the pass runs on every rank; each rank's alert decides, and all must stop together (else the run hangs)
    monitor = AttentionMonitor(_probes(), tile_size=16, alerts="stop", alert_thresholds={"uniform_patience": 0})
    trainer = lit.trainer(tmp_path, [monitor], strategy="ddp_spawn", devices=2, max_epochs=4)
    trainer.fit(_freeze_uniform(lit.LitViT()), *lit.loaders())
    (log_dir,) = {p.parent for p in (tmp_path / "tb").rglob("events.out.tfevents.*")}
    acc = lit.read_events(log_dir)
    # 2 steps per epoch on each rank: the baseline, then the first epoch's pass fires and stops the run
    assert [(s.step, s.value) for s in acc.Scalars("attention_alerts/uniform")] == [(0, 0), (2, 1)]
    assert [e.step for e in acc.Images("attention/raw")] == [0, 2]


def test_a_failing_rule_follows_on_error_and_the_pass_is_still_written(tmp_path, monkeypatch):
    def broken(self, history):
        raise KeyError("a rule bug")

    monkeypatch.setattr(UniformRule, "check", broken)
    monitor = AttentionMonitor(_probes(), tile_size=16)
    trainer = lit.trainer(tmp_path, [monitor], max_epochs=1)
    with pytest.warns(RuntimeWarning, match=r"could not check the alerts at step 0: KeyError: 'a rule bug'") as record:
        trainer.fit(lit.LitViT(), *lit.loaders())
    assert sum("could not check the alerts" in str(w.message) for w in record) == 1  # once per kind
    assert trainer.global_step == 4 and monitor.alerts == []
    assert [e.step for e in lit.read_events(trainer.logger.log_dir).Images("attention/raw")] == [0, 4]
    strict = AttentionMonitor(_probes(), tile_size=16, on_error="raise")
    with pytest.raises(KeyError, match="a rule bug"):
        lit.trainer(tmp_path / "strict", [strict], max_epochs=1).fit(lit.LitViT(), *lit.loaders())


def test_a_new_baseline_restarts_the_rules_and_a_reused_monitor_its_alerts(tmp_path):
    book = AlertBook(rules_for(AlertThresholds(collapse_patience=0)))
    low, high = _entropy(0.01), _entropy(0.9)
    assert [a.step for a in book.update(_history(high, low))] == [4]
    book.restart(2)  # e.g. resumed with other probes: the next pass is a new baseline
    assert book.active == set() and book.update(_history(high, low, low)) == []  # a baseline alone never fires
    assert [a.step for a in book.update(_history(high, low, low, low))] == [12]
    other = AlertBook()
    other.load_state_dict(book.state_dict())
    assert other.start == 2
    monitor = AttentionMonitor(_probes(), tile_size=16, alert_thresholds={"uniform_patience": 0})
    for run in ("a", "b"):  # a monitor reused for another Trainer starts a new run, alerts included
        lit.trainer(tmp_path / run, [monitor], max_epochs=1, logger=False).fit(lit.LitViT(), *lit.loaders())
        assert [(a.rule, a.step) for a in monitor.alerts] == [("uniform", 4)]


# ---------------------------------------------------------------------------------------------------- calibration

CORPUS = Path(__file__).resolve().parent / "data" / "alert_corpus.json"


def _calibration():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import calibrate_alerts

    return calibrate_alerts


def test_the_calibration_corpus_raises_no_false_alarm_and_catches_every_fault():
    """The recorded scalar histories of `benchmarks/calibrate_alerts.py --json tests/data/alert_corpus.json`:
    the rules replayed on them as the callback checks them. Among them the issue's square-finding run (4 blocks,
    validated every 10 steps, validation accuracy 1.0), which the pass-counting `uniform` rule flagged at step 30."""
    calibrate = _calibration()
    runs = json.loads(CORPUS.read_text())["runs"]
    assert runs["squares"]["every"] == 10 and runs["squares"]["accuracy"] > 0.95
    healthy = [name for name, run in runs.items() if not run["expect"]]
    assert len(healthy) >= 8 and len(runs) - len(healthy) >= 6
    for name, run in runs.items():
        fired = calibrate.replay(calibrate.expand(run))
        fires = {rule for rule, step in fired.items() if isinstance(step, int)}
        if run["expect"]:
            assert set(run["expect"]) <= fires, (name, fired)
        else:
            assert fires == set(), (name, fired)
    _, false_alarms, missed = calibrate.table(runs)
    assert (false_alarms, missed) == (0, 0)
    # every rule is checked on the healthy runs it can fire in (no `n/a` everywhere)
    for rule in ("collapse", "uniform", "overwrite", "artifacts", "pointing", "chance"):
        assert any(calibrate.replay(calibrate.expand(runs[n]))[rule] != "n/a" for n in healthy), rule


def test_frozen_qk_fires_uniform_however_often_it_is_validated():
    calibrate = _calibration()
    runs = json.loads(CORPUS.read_text())["runs"]
    often, rarely = runs["q, k frozen at 0"], runs["q, k frozen at 0, rare validation"]
    assert (often["every"], rarely["every"]) == (10, 100)
    often_at = calibrate.replay(calibrate.expand(often))["uniform"]
    rarely_at = calibrate.replay(calibrate.expand(rarely))["uniform"]
    # the patience is 100 optimiser steps either way: the first flagged pass + 100
    assert often_at == 110 and rarely_at == 200


def test_calibration_script_fast_mode(capsys):
    calibrate = _calibration()
    results = calibrate.main(["--fast"])
    out = capsys.readouterr().out
    assert out.startswith("| run | validated every | val acc | `collapse` | `uniform` |")
    assert set(results) == {"squares", "q, k frozen at 0"}
    for result in results.values():
        assert calibrate.live_matches_replay(result)  # the replay checks the rules as the callback did
        assert len(result["steps"]) == len(result["values"]) > 2


def test_uniform_is_off_where_the_maps_are_the_mean_over_patch_rows():
    """Swin, GAP ViTs and SigLIP have no query token: their maps are the mean over every patch's row (attention each
    patch receives), which is near uniform in healthy models, so the rule must not read them; a class token's maps
    with the same curves still get it."""
    import timm

    from lightning_attn import attention_maps

    images = torch.rand(2, 3, 32, 32)
    torch.manual_seed(0)
    kwargs = dict(pretrained=False, img_size=32, patch_size=8, depth=2)
    gap = timm.create_model("vit_tiny_patch16_224", class_token=False, global_pool="avg", **kwargs).eval()
    cls = timm.create_model("vit_tiny_patch16_224", **kwargs).eval()
    flat = _uniform_pass(0.999, 0.999)
    history = [(10 * i, dict(flat)) for i in range(30)]
    for model, query, fires in ((gap, "mean", False), (cls, "cls", True)):
        maps = attention_maps(model, images)
        assert maps.layout.query == query
        book = AlertBook(rules_for(AlertThresholds(uniform_patience=100)))
        fired = [a.rule for a in book.update(history, maps)]
        assert ("uniform" in fired) is fires and ("uniform" in book.applicable) is fires
        assert ("attention_alerts/uniform" in book.markers([])) is fires


def test_a_streak_read_from_the_last_pass_back_gives_the_verdict_over_every_pass():
    """`_held_since` stops where the streak breaks or reaches the patience; its verdict and the pass it names are
    those of every pass's flags read in full (`_lasted`, and the latest pass `patience` steps back)."""
    import random

    from lightning_attn.alerts import _held_since, _lasted

    rng = random.Random(0)
    for _ in range(2000):
        n = rng.randint(1, 30)
        steps = sorted(rng.sample(range(0, 400), n))
        flags = [rng.random() < 0.8 for _ in range(n)]
        history = [(step, {"flag": float(flag)}) for step, flag in zip(steps, flags)]
        patience = rng.choice([0, 1, 10, 50, 120])
        found = _held_since(history, lambda h: h["flag"] == 1.0, patience)
        held = _lasted(history, flags[1:], patience)
        assert (found is not None) == held
        if held:
            assert found == max(i for i in range(1, n) if steps[i] <= steps[-1] - patience)
