"""The README's main job, in its smoke mode: the example trains and the monitor logs every method."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

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
