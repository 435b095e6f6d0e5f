"""The monitor never changes what training computes, survives resume, strategies, precisions and compile."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_attn import AttentionMonitor, attention_maps, find_attention_modules, normalized_entropy

import lit


def _fit(tmp_path, callbacks, seed=0, **kwargs):
    pl.seed_everything(seed, verbose=False)
    model = lit.LitViT(depth=2, drop=0.1)  # dropout: training draws from the RNG on every step
    train, val = lit.loaders()
    train = torch.utils.data.DataLoader(lit.dataset(32, seed=0), batch_size=8, shuffle=True)
    val = torch.utils.data.DataLoader(lit.dataset(16, seed=1), batch_size=8, shuffle=True)
    trainer = lit.trainer(tmp_path, callbacks, max_epochs=3, **kwargs)
    trainer.fit(model, train, val)
    return model


def test_training_is_bitwise_identical_with_and_without_the_monitor(tmp_path):
    plain = _fit(tmp_path / "plain", [])
    # probes from a shuffled validation loader: taking them must not consume the global RNG either
    monitor = AttentionMonitor(4, tile_size=16, matrix_layers=[0])
    watched = _fit(tmp_path / "watched", [monitor])
    assert monitor.last_metrics, "the monitor must have run"
    assert plain.train_losses == watched.train_losses
    for (name, a), (_, b) in zip(plain.state_dict().items(), watched.state_dict().items()):
        assert torch.equal(a, b), name


def test_resume_restores_probes_and_baseline_and_continues_the_steps(tmp_path):
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = AttentionMonitor(5, tile_size=16)
    trainer = lit.trainer(tmp_path, [first, ckpt], enable_checkpointing=True)
    trainer.fit(lit.LitViT(), *lit.loaders())
    steps_first = [e.step for e in lit.read_events(trainer.logger.log_dir).Images("attention/raw")]
    assert steps_first == [0, 4, 8]

    second = AttentionMonitor(5, tile_size=16)
    # a different validation loader: the probes must still be the ones from the first run
    other_val = torch.utils.data.DataLoader(lit.dataset(16, seed=99), batch_size=8)
    trainer = lit.trainer(tmp_path, [second, ckpt], enable_checkpointing=True, max_epochs=4)
    trainer.fit(lit.LitViT(), lit.loaders()[0], other_val, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    steps_second = [e.step for e in lit.read_events(trainer.logger.log_dir).Images("attention/raw")]
    assert steps_second == [12, 16], "no second baseline at the resume step"
    assert torch.equal(second._probes.images.cpu(), first._probes.images.cpu())
    # drift keeps measuring from the first run's baseline; the filmstrip/GIF history continues
    for method in ("raw", "rollout"):
        assert torch.equal(second.runner.baseline[method].cpu(), first.runner.baseline[method].cpu())
    assert [step for step, _ in second.runner.history] == [0, 4, 8, 12, 16]
    assert second.last_metrics["attention_drift_baseline/raw/mean"] > 0


def test_state_dict_round_trip_and_tolerant_load(tmp_path):
    monitor = AttentionMonitor(3)
    assert monitor.state_dict() == {
        "baseline_done": False,
        "last_step": None,
        "runner": None,
        "alerts": {"alerts": [], "active": [], "start": 0},
    }
    monitor.load_state_dict({})  # a checkpoint from an older version: defaults
    assert not monitor._baseline_done
    # format 1 kept the runner's fields at the top level: they are taken as they are
    maps = {"raw": torch.rand(2, 2, 4, 4)}
    old = AttentionMonitor(torch.randn(2, 3, lit.IMG, lit.IMG))
    old.load_state_dict(
        {
            "baseline_done": True,
            "last_step": 8,
            "baseline_maps": maps,
            "previous_maps": maps,
            "history": [(0, maps["raw"][:, -1]), (8, maps["raw"][:, -1])],
            "scalar_history": [],
        }
    )
    old.setup(lit.trainer(tmp_path, [old]), lit.LitViT(), "fit")
    assert [s for s, _ in old.runner.history] == [0, 8] and torch.equal(old.runner.baseline["raw"], maps["raw"])
    assert AttentionMonitor(3).state_key == monitor.state_key != AttentionMonitor(3, every_n_epochs=2).state_key
    # unnamed: the key of earlier versions (their checkpoints resume); a name makes it distinct
    assert monitor.state_key == "AttentionMonitor{'methods': ('raw', 'rollout'), 'every_n_epochs': 1}"
    assert AttentionMonitor(3, name="student").state_key not in (
        monitor.state_key,
        AttentionMonitor(3, name="t").state_key,
    )


def test_bf16_true_parameters(tmp_path):
    monitor = AttentionMonitor(torch.randn(2, 3, lit.IMG, lit.IMG), tile_size=16, on_error="raise")
    trainer = lit.trainer(tmp_path, [monitor], max_epochs=1, precision="bf16-true")
    trainer.fit(lit.LitViT(), *lit.loaders())
    entropy = [v for k, v in monitor.last_metrics.items() if k.startswith("attention_entropy/")]
    assert len(entropy) == 4 and all(0 <= v <= 1 for v in entropy)


def test_compiled_model_is_not_recompiled_by_the_probe_pass(tmp_path):
    import torch._dynamo

    class Compiled(lit.LitViT):
        def __init__(self):
            super().__init__()
            # backend="eager": Dynamo's tracing and guards are what a probe pass could disturb; no codegen needed
            self.model = torch.compile(self.model, backend="eager")

    torch._dynamo.reset()
    monitor = AttentionMonitor(torch.randn(2, 3, lit.IMG, lit.IMG), tile_size=16, on_error="raise")
    model = Compiled()
    trainer = lit.trainer(tmp_path, [monitor], max_epochs=3, num_sanity_val_steps=0)
    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=False):
        trainer.fit(model, *lit.loaders())
    assert monitor._vit is model.model._orig_mod  # hooks go on the eager module
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    # train (grad) and val (no_grad) forwards, each compiled once at most per mode; a recompilation storm after
    # every probe pass would add graphs for every epoch
    assert frames <= 4, dict(torch._dynamo.utils.counters["stats"])
    assert not torch._dynamo.utils.counters["graph_break"]
    assert all(m.fused_attn for _, m in find_attention_modules(model.model._orig_mod))


@pytest.mark.parametrize("strategy", ["ddp_spawn"])
def test_ddp_two_cpu_processes_write_once(tmp_path, strategy):
    monitor = AttentionMonitor(torch.randn(2, 3, lit.IMG, lit.IMG), tile_size=16)
    trainer = lit.trainer(tmp_path, [monitor], strategy=strategy, devices=2, max_epochs=2)
    trainer.fit(lit.LitViT(), *lit.loaders())
    # the spawned ranks chose the version directory; the main process's logger may name the next one
    (log_dir,) = {p.parent for p in (tmp_path / "tb").rglob("events.out.tfevents.*")}
    acc = lit.read_events(log_dir)
    steps = [e.step for e in acc.Images("attention/raw")]
    # 32 samples / (2 ranks x batch 8) = 2 steps per epoch; one image per step, written by rank 0 only
    assert steps == [0, 2, 4]
    assert [s.step for s in acc.Scalars("attention_entropy/raw/layer_00")] == [0, 2, 4]


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_every_method_and_faithfulness_under_bf16(tmp_path, precision):
    # "bf16-true" makes bfloat16 the default dtype inside the forward context: every tensor we create must say
    # float32, and autocast must not turn the rollout products back into bf16
    masks = torch.zeros(2, lit.IMG, lit.IMG, dtype=torch.bool)
    masks[:, 8:24, 8:24] = True
    monitor = AttentionMonitor(
        torch.randn(2, 3, lit.IMG, lit.IMG),
        labels=[0, 1],
        masks=masks,
        faithfulness=True,
        faithfulness_steps=3,
        methods=("raw", "rollout", "grad_rollout", "relevance"),
        tile_size=16,
        on_error="raise",
    )
    lit.trainer(tmp_path, [monitor], max_epochs=1, precision=precision).fit(lit.LitViT(), *lit.loaders())
    values = monitor.last_metrics
    assert 0 <= values["attention_pointing_game/relevance"] <= 1
    assert 0 <= values["attention_faithfulness/most_first_auc/grad_rollout"] <= 1
    assert all(v == v for v in values.values())  # no NaN


_MODEL_PARALLEL_FIT = """
import sys, torch, lightning.pytorch as pl
from lightning.pytorch.strategies import ModelParallelStrategy
import lit
from lightning_attn import AttentionMonitor


class FullyShardedViT(lit.LitViT):
    # parameters sharded across ranks with FSDP2 (`fully_shard`), as ModelParallelStrategy users do
    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for block in self.model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self, mesh=mesh)


if __name__ == "__main__":
    out = sys.argv[1]
    probes = torch.randn(2, 3, lit.IMG, lit.IMG, generator=torch.Generator().manual_seed(5))
    monitor = AttentionMonitor(probes, tile_size=16, on_error="raise")
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    # no sanity check: the baseline pass comes before any forward, while every parameter is still sharded
    trainer = lit.trainer(out, [monitor], strategy=strategy, devices=2, max_epochs=1, num_sanity_val_steps=0)
    pl.seed_everything(3)
    trainer.fit(FullyShardedViT(), *lit.loaders())
"""


def test_model_parallel_strategy_with_sharded_parameters(tmp_path):
    # Lightning launches ModelParallelStrategy's ranks by running the script again: a script of its own, not pytest
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2").FSDPModule  # noqa: B018
    script = tmp_path / "fit.py"
    script.write_text(_MODEL_PARALLEL_FIT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (log_dir,) = {p.parent for p in (tmp_path / "tb").rglob("events.out.tfevents.*")}
    acc = lit.read_events(log_dir)
    assert [e.step for e in acc.Images("attention/raw")] == [0, 2]  # rank zero wrote once per pass
    # the baseline's maps are those of the whole, unsharded model with the same initial weights
    pl.seed_everything(3)
    probes = torch.randn(2, 3, lit.IMG, lit.IMG, generator=torch.Generator().manual_seed(5))
    reference = attention_maps(lit.LitViT().model.eval(), probes)
    entropy = normalized_entropy(reference.raw).mean(0)
    logged = [acc.Scalars(f"attention_entropy/raw/layer_{l:02d}")[0].value for l in range(2)]
    assert logged == pytest.approx(entropy.tolist(), abs=1e-5)
