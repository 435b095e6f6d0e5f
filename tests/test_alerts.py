"""Attention-health alerts: each rule on hand-made histories, then provoked in real tiny fits (uniform attention
from zeroed and frozen q/k, a constructed token that takes the attention, a map that leaves the object, a learning
rate 1000x too high), the stop mode, the checkpoint, and what each logger gets."""

from __future__ import annotations

import warnings

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


@pytest.mark.parametrize("patience", [1, 2])
def test_collapse_needs_patience_passes_after_the_baseline(patience):
    rule = CollapseRule(entropy=0.05, patience=patience)
    low, high = _entropy(0.01), _entropy(0.9)
    assert rule.check(_history(low)) is None  # the baseline alone never fires
    assert rule.check(_history(low, *[high] * 3)) is None
    assert rule.check(_history(high, *[low] * (patience - 1))) is None
    found = rule.check(_history(high, *[low] * patience))
    assert found.layers == (2,) and found.curve == "attention_entropy_median/raw" and found.methods == ("raw",)
    assert rule.check(_history(high, *[low] * patience, high)) is None  # cleared


def test_uniform_reads_the_late_layers_after_the_baseline():
    rule = UniformRule(entropy=0.98, patience=3)
    flat, learned = _entropy(0.99, early=0.5, layers=6), _entropy(0.7, layers=6)
    for l in range(4, 6):
        flat[f"attention_entropy/raw/layer_{l:02d}"] = 0.995
    assert rule.check(_history(flat, flat, flat)) is None  # baseline + 2 passes
    found = rule.check(_history(flat, flat, flat, flat))
    assert found.layers == (4, 5) and found.curve == "attention_entropy/raw"
    assert rule.check(_history(flat, flat, learned, flat)) is None


def test_overwrite_only_when_fine_tuning_and_early_layers_drift_as_much():
    rule = OverwriteRule(ratio=1.0, min_drift=0.05, patience=2)
    pretrained, fresh = _entropy(0.6), _entropy(0.995, early=0.995)
    bad, healthy, tiny = _drift(0.4, 0.35), _drift(0.05, 0.4), _drift(0.02, 0.01)
    found = rule.check(_history(pretrained, {**pretrained, **bad}, {**pretrained, **bad}))
    assert found.layers == (0,) and found.curve == "attention_drift_baseline/raw" and "0.400 bits" in found.detail
    assert rule.check(_history(pretrained, {**pretrained, **bad})) is None  # patience 2
    assert rule.check(_history(pretrained, {**pretrained, **healthy}, {**pretrained, **healthy})) is None
    assert rule.check(_history(pretrained, {**pretrained, **tiny}, {**pretrained, **tiny})) is None  # noise floor
    # from scratch the baseline is uniform: every layer moves, nothing pretrained is lost
    assert rule.check(_history(fresh, {**fresh, **bad}, {**fresh, **bad})) is None


def test_artifacts_must_grow_in_a_middle_or_late_layer():
    rule = ArtifactRule(share=0.3, growth=0.1, patience=2)
    share = lambda *v: {f"attention_artifacts/share/layer_{l:02d}": x for l, x in enumerate(v)}  # noqa: E731
    assert rule.check(_history(share(0, 0, 0), share(0, 0.5, 0.1), share(0, 0.6, 0))).layers == (1,)
    assert rule.check(_history(share(0, 0.5, 0), share(0, 0.5, 0), share(0, 0.55, 0))) is None  # not growing
    assert rule.check(_history(share(0, 0, 0), share(0.9, 0, 0), share(0.9, 0, 0))) is None  # early layer
    assert rule.check(_history(share(0, 0, 0), share(0, 0.5, 0))) is None


def test_pointing_game_falling_below_its_best():
    rule = PointingRule(drop=0.5, patience=2)
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


def test_chance_compares_each_method_with_the_random_map():
    rule = ChanceRule(margin=0.02, patience=2)
    auc = lambda raw, rollout, rnd: {  # noqa: E731
        "attention_faithfulness/most_first_auc/raw": raw,
        "attention_faithfulness/most_first_auc/rollout": rollout,
        "attention_faithfulness/most_first_auc/random": rnd,
    }
    found = rule.check(_history(auc(0.3, 0.3, 0.3), auc(0.2, 0.29, 0.3), auc(0.2, 0.31, 0.3)))
    assert found.methods == ("rollout",)
    assert rule.check(_history(auc(0.3, 0.3, 0.3), auc(0.3, 0.3, 0.3))) is None


def test_alert_book_fires_once_per_episode_and_round_trips():
    book = AlertBook(rules_for(AlertThresholds(collapse_patience=1)))
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
    assert book.markers([alert])["attention_alerts/collapse"] == 1.0
    assert set(book.markers([]).values()) == {0.0} and len(book.markers([])) == 6
    other = AlertBook()
    other.load_state_dict(book.state_dict())
    assert other.alerts == book.alerts and other.active == book.active == {"collapse"}


def test_thresholds_and_mode_are_checked_at_construction():
    with pytest.raises(ValueError, match=r"`alerts` must be True, False or 'stop'"):
        AttentionMonitor(2, alerts="on")
    with pytest.raises(ValueError, match=r"unknown keys \['collapse'\]; valid keys: artifact_growth"):
        AttentionMonitor(2, alert_thresholds={"collapse": 0.1})
    with pytest.raises(ValueError, match=r"`alert_thresholds\['uniform_patience'\]` must be an int >= 1"):
        AttentionMonitor(2, alert_thresholds={"uniform_patience": 0})
    with pytest.raises(ValueError, match=r"`alert_thresholds\['collapse_entropy'\]` must be a number in \(0, 1\]"):
        AttentionMonitor(2, alert_thresholds={"collapse_entropy": 1.5})
    with pytest.raises(ValueError, match="must be None, a dict"):
        AttentionMonitor(2, alert_thresholds=0.1)


# ---------------------------------------------------------------------------------------------------- real fits


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
    monitor = AttentionMonitor(_probes(), tile_size=16, alerts="stop", faithfulness=True, faithfulness_steps=2)
    trainer = lit.trainer(tmp_path, [monitor, ckpt], max_epochs=8, enable_checkpointing=True)
    module = _freeze_uniform(lit.LitViT())
    with pytest.warns(RuntimeWarning, match=r"alert 'uniform' at step 12: the late layers never learned"):
        trainer.fit(module, _learnable(32, 0), _learnable(16, 1))
    # stopped at the third pass after the baseline (patience 3), as EarlyStopping would
    assert trainer.global_step == 12 and trainer.should_stop
    rules = {a.rule: a for a in monitor.alerts}
    assert rules["uniform"].step == 12 and rules["uniform"].layers == (1,) and rules["uniform"].probes == (0, 1)
    assert "chance" in rules and rules["chance"].step == 12  # a uniform map finds nothing the model uses
    assert monitor.stop_reason == monitor.alerts[0].message
    assert sum(module.train_losses[-4:]) < 0.5 * sum(module.train_losses[:4])  # while the loss falls
    acc = lit.read_events(trainer.logger.log_dir)
    assert [(s.step, s.value) for s in acc.Scalars("attention_alerts/uniform")] == [(0, 0), (4, 0), (8, 0), (12, 1)]
    assert [s.value for s in acc.Scalars("attention_alerts/collapse")] == [0, 0, 0, 0]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    text = EventAccumulator(trainer.logger.log_dir, size_guidance={"tensors": 0})
    text.Reload()
    (event,) = text.Tensors("attention/alerts/uniform/text_summary")
    assert (
        event.step == 12
        and "Try: check that the attention receives gradient" in event.tensor_proto.string_val[0].decode()
    )

    # resume: the alerts come back from the checkpoint and the ongoing episode is not said again
    second = AttentionMonitor(_probes(), tile_size=16, alerts="stop", faithfulness=True, faithfulness_steps=2)
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
    monitor = AttentionMonitor(_probes(), masks=masks, tile_size=16, on_error="raise")
    # epoch 1: all attention on patch 0 (the object); then on patch 15 (background)
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
    monitor = AttentionMonitor(_probes(), tile_size=16, on_error="raise", alerts=True)
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
        monitor = AttentionMonitor(_probes(4), tile_size=16, on_error="raise", alerts=True)
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
    monitor = AttentionMonitor(_probes(), tile_size=16, alerts="stop", alert_thresholds={"uniform_patience": 1})
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
    book = AlertBook(rules_for(AlertThresholds(collapse_patience=1)))
    low, high = _entropy(0.01), _entropy(0.9)
    assert [a.step for a in book.update(_history(high, low))] == [4]
    book.restart(2)  # e.g. resumed with other probes: the next pass is a new baseline
    assert book.active == set() and book.update(_history(high, low, low)) == []  # a baseline alone never fires
    assert [a.step for a in book.update(_history(high, low, low, low))] == [12]
    other = AlertBook()
    other.load_state_dict(book.state_dict())
    assert other.start == 2
    monitor = AttentionMonitor(_probes(), tile_size=16, alert_thresholds={"uniform_patience": 1})
    for run in ("a", "b"):  # a monitor reused for another Trainer starts a new run, alerts included
        lit.trainer(tmp_path / run, [monitor], max_epochs=1, logger=False).fit(lit.LitViT(), *lit.loaders())
        assert [(a.rule, a.step) for a in monitor.alerts] == [("uniform", 4)]
