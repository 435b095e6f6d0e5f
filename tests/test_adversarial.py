"""The adversarial cases that held, kept holding: training bitwise unchanged by the monitor in more configurations
(Hugging Face with gradient accumulation, torchvision under bf16-mixed, timm with dropout, loader workers and a
probe pass that fails half-way), hooks and attention flags restored after that fault, and ``kill -9`` mid-run
followed by ``lightning-attn replay``, which finds every pass up to the last checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_attn import AttentionMonitor, find_attention_modules

import families
import lit

TESTS = Path(__file__).parent


class _Any(pl.LightningModule):
    """Any classifier (a timm, Hugging Face or torchvision ViT), its losses recorded."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.train_losses: list[float] = []

    def forward(self, x):
        out = self.model(x)
        return getattr(out, "logits", out)

    def training_step(self, batch, batch_idx):
        loss = torch.nn.functional.cross_entropy(self(batch[0]), batch[1] % 3)
        self.train_losses.append(loss.detach().float().item())
        return loss

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _models():
    return {
        "hf_accumulate": lambda: families.make_hf("vit_cls"),
        "torchvision_bf16": lambda: families.make_torchvision(),
        "timm_workers_fault": lambda: lit.LitViT(drop=0.1).model,  # dropout: training draws from the RNG
    }


_SETTINGS = {
    "hf_accumulate": dict(accumulate_grad_batches=2),
    "torchvision_bf16": dict(precision="bf16-mixed"),
    "timm_workers_fault": dict(),
}


def _fit(tmp_path, key, monitor):
    pl.seed_everything(0, verbose=False)
    module = _Any(_models()[key]())
    workers = 1 if key == "timm_workers_fault" else 0
    train = DataLoader(lit.dataset(32, seed=0), batch_size=8, shuffle=True, num_workers=workers)
    val = DataLoader(lit.dataset(16, seed=1), batch_size=8, shuffle=True)
    callbacks = [] if monitor is None else [monitor]
    lit.trainer(tmp_path, callbacks, max_epochs=2, **_SETTINGS[key]).fit(module, train, val)
    return module


@pytest.mark.parametrize("key", ["hf_accumulate", "torchvision_bf16", "timm_workers_fault"])
def test_training_is_bitwise_identical_in_more_configurations_and_after_a_failed_pass(tmp_path, key):
    if key == "hf_accumulate":
        pytest.importorskip("transformers")
    calls = []

    def target(output):  # explains class 0; raises in the middle of the second pass (its backward has begun)
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a fault inside the probe pass")
        return output[:, 0]

    methods = ("raw", "rollout", "grad_rollout") if key == "timm_workers_fault" else ("raw", "rollout")
    kwargs = dict(target=target) if key == "timm_workers_fault" else {}
    monitor = AttentionMonitor(3, tile_size=16, methods=methods, mean=(0.5,) * 3, std=(0.5,) * 3, **kwargs)
    plain = _fit(tmp_path / "plain", key, None)
    if key == "timm_workers_fault":
        with pytest.warns(RuntimeWarning, match="skipped the probe pass at step 4: RuntimeError: a fault inside"):
            watched = _fit(tmp_path / "watched", key, monitor)
    else:
        watched = _fit(tmp_path / "watched", key, monitor)
    assert monitor.last_metrics, "the monitor ran"
    assert plain.train_losses == watched.train_losses
    for (name, a), (_, b) in zip(plain.state_dict().items(), watched.state_dict().items()):
        assert torch.equal(a, b), name
    # nothing of the passes is left on the model: no hook anywhere, fused attention as it was
    for name, module in watched.model.named_modules():
        hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks)
        assert not any(hooks), name
    assert all(getattr(m, "fused_attn", True) for _, m in find_attention_modules(watched.model))


_KILLED_RUN = """
import os, signal, sys, torch, lightning.pytorch as pl
import lit
from lightning_attn import AttentionMonitor

class Killed(lit.LitViT):
    def training_step(self, batch, batch_idx):
        if self.global_step == 10:  # mid-epoch 3, after the checkpoints of epochs 1 and 2
            os.kill(os.getpid(), signal.SIGKILL)
        return super().training_step(batch, batch_idx)

root = sys.argv[1]
ckpt = pl.callbacks.ModelCheckpoint(dirpath=root + "/ckpt", save_last=True, save_top_k=-1)
monitor = AttentionMonitor(torch.randn(2, 3, lit.IMG, lit.IMG), tile_size=16)
lit.trainer(root, [monitor, ckpt], enable_checkpointing=True, max_epochs=5).fit(Killed(), *lit.loaders())
"""


def test_kill_9_mid_run_then_replay_finds_every_pass_up_to_the_last_checkpoint(tmp_path, capsys):
    from lightning_attn.cli import main

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_RUN, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    # everything already written survives: the passes of steps 0, 4 and 8 in TensorBoard
    (log_dir,) = {p.parent for p in (tmp_path / "tb").rglob("events.out.tfevents.*")}
    assert [e.step for e in lit.read_events(log_dir).Images("attention/raw")] == [0, 4, 8]
    assert main(["replay", str(tmp_path), "-o", str(tmp_path / "replay")]) == 0
    assert "wrote 3 files from" in capsys.readouterr().out  # the filmstrip and one GIF per probe
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    (runner,) = [s["runner"] for k, s in state["callbacks"].items() if k.startswith("AttentionMonitor")]
    assert [step for step, _ in runner["history"]] == [0, 4, 8]
    assert (tmp_path / "replay" / "attention__filmstrip.png").is_file()
