"""The README's main job, in its smoke mode: the example trains and the monitor logs every method."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

from lightning_attn import report_html  # noqa: E402

import lit  # noqa: E402
import train_vit  # noqa: E402


def test_example_fast_run_logs_every_method(tmp_path, capsys):
    trainer = train_vit.main(["--fast", "--logdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert f"tensorboard --logdir {tmp_path}" in out
    acc = lit.read_events(trainer.log_dir)
    for method in ("raw", "rollout", "grad_rollout", "relevance"):
        assert len(acc.Images(f"attention/{method}")) == 2  # baseline + 1 epoch
        assert len(acc.Scalars(f"attention_pointing_game/{method}")) == 2
        assert len(acc.Scalars(f"attention_faithfulness/most_first_auc/{method}")) == 2
    assert len(list((Path(trainer.log_dir) / "attention").glob("*.gif"))) == 8
    # the interactive report beside the logs; a default run (the baseline and 6 epochs: 7 passes) stays under 20 MB
    page = (Path(trainer.log_dir) / "attention" / "attention__report.html").read_bytes()
    (monitor,) = [c for c in trainer.callbacks if type(c).__name__ == "AttentionMonitor"]
    state = monitor.runner.state_dict()
    first = report_html({**state, "report": state["report"][:1], "scalar_history": state["scalar_history"][:1]})
    per_pass = len(page) - len(first.encode())
    assert 0 < per_pass and len(page) + 5 * per_pass < 20e6
    # a last.ckpt, which docs/cli.md's command for the example's own checkpoint renders
    last = Path(trainer.log_dir) / "checkpoints" / "last.ckpt"
    assert f"Last checkpoint: {last}" in out
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(EXAMPLES), os.environ.get("PYTHONPATH", "")])}
    command = [
        "lightning-attn",
        "render",
        str(last),
        "--model-class",
        "train_vit.ViTClassifier",
        str(tmp_path / "a.png"),
    ]
    done = subprocess.run(
        [*command, "-o", str(tmp_path / "maps")], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "maps" / "attention__rollout_000.png").is_file()


def test_example_logger_choice(tmp_path, capsys, monkeypatch):
    assert isinstance(train_vit.make_logger("csv", tmp_path, "shapes"), pl.loggers.CSVLogger)
    assert isinstance(train_vit.make_logger("tensorboard", tmp_path, "shapes"), pl.loggers.TensorBoardLogger)
    assert train_vit.parse_args([]).logger == "tensorboard"
    # MLflow 3's local file store needs its opt-in: refused with the fix before anything trains
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(SystemExit):
        train_vit.parse_args(["--logger", "mlflow"])
    assert "MLFLOW_ALLOW_FILE_STORE=true python examples/train_vit.py --logger mlflow" in capsys.readouterr().err
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert train_vit.parse_args(["--logger", "mlflow"]).logger == "mlflow"


def test_example_trains_the_same_weights_with_and_without_the_monitor_and_reports(tmp_path, capsys):
    def digest(out: str) -> str:
        return next(line.split(": ")[1] for line in out.splitlines() if line.startswith("Final weights digest"))

    train_vit.main(["--fast", "--logdir", str(tmp_path / "with"), "--report", "--docs", str(tmp_path / "docs")])
    watched = capsys.readouterr().out
    train_vit.main(["--fast", "--logdir", str(tmp_path / "without"), "--no-monitor"])
    plain = capsys.readouterr().out
    assert digest(watched) == digest(plain)  # the monitor changes nothing in training, bit for bit
    assert "| relevance | " in watched and "| random map | — / — |" in watched
    assert sorted(p.name for p in (tmp_path / "docs").iterdir()) == [
        "example_filmstrip.png",
        "example_relevance.png",
        "example_rollout.png",
    ]


def test_finetune_example_fast_healthy_run_fires_no_alert(tmp_path, capsys):
    import finetune

    runs = finetune.main(["--fast", "--logdir", str(tmp_path)])
    healthy, too_high = runs.values()
    assert healthy.alerts == []
    assert len(healthy.runner.scalar_history) == 3  # baseline + 2 fine-tuning epochs: the rules were read
    assert "finetune_lr0.0001: " in capsys.readouterr().out and too_high.runner.scalar_history


def test_findings_smoke_run_prints_mean_and_std_over_seeds_and_reads_runs_back(tmp_path, capsys):
    import statistics

    import findings

    argv = ["--seeds", "0", "1", "--fast", "--threads", "1", "--out", str(tmp_path)]
    text = findings.main(argv)
    capsys.readouterr()
    values = []
    for seed in (0, 1):
        scalars = findings.load(tmp_path / f"seed{seed}")[0]["scalars"]["attention_jaccard/relevance"]
        values.append(scalars[max(scalars)])
    cell = f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"
    row = next(line for line in text.splitlines() if line.startswith("| relevance | ") and "±" in line)
    assert row.split(" | ")[2].split(" / ")[-1] == cell  # Jaccard, last step: the mean and std of the two runs
    assert "| cascading: method | block 3 | blocks 2-3 | blocks 1-3 | blocks 0-3 |" in text
    assert "| independent: method | block 3 | block 2 | block 1 | block 0 |" in text
    assert findings.main(argv) == text  # read back, not trained again
    assert "seed 0: read back" in capsys.readouterr().out
