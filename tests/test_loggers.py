"""Real runs with every Lightning logger at once: each holds every scalar at the right steps and the images."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from PIL import Image

from lightning_attn import AttentionMonitor

import lit
import wandb_log

STEPS = [0, 4, 8]  # baseline, then the end of each of 2 epochs of 4 batches


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B offline and silent, MLflow on a local file store: nothing may reach the network."""
    for key, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(tmp_path / "wandb_dir"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
        "WANDB_ERROR_REPORTING": "false",
        "MLFLOW_ALLOW_FILE_STORE": "true",
        "MLFLOW_ENABLE_ASYNC_LOGGING": "false",
    }.items():
        monkeypatch.setenv(key, value)
    (tmp_path / "wandb_dir").mkdir()
    return tmp_path


def _probes(n=2):
    return torch.randn(n, 3, lit.IMG, lit.IMG, generator=torch.Generator().manual_seed(3))


def test_tensorboard_wandb_mlflow_and_csv_at_once(offline):
    pytest.importorskip("wandb")  # a guard only: the test extra installs both
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    tmp = offline
    uri = (tmp / "mlruns").as_uri()
    loggers = [
        pl.loggers.TensorBoardLogger(tmp, name="tb"),
        pl.loggers.WandbLogger(offline=True, save_dir=str(tmp / "wandb_dir"), project="lightning-attn-test"),
        pl.loggers.MLFlowLogger(experiment_name="attn", tracking_uri=uri),
        pl.loggers.CSVLogger(tmp, name="csv"),
    ]
    # patience 0 steps: a fresh model's near-uniform attention fires the "uniform" alert at the first epoch's pass
    monitor = AttentionMonitor(
        _probes(), labels=[0, 1], tile_size=16, on_error="raise", alert_thresholds={"uniform_patience": 0}
    )
    trainer = lit.trainer(tmp, [monitor], logger=loggers)
    trainer.fit(lit.LitViT(), *lit.loaders())
    loggers[1].experiment.finish()
    assert [(a.rule, a.step) for a in monitor.alerts] == [("uniform", 4)]
    message = monitor.alerts[0].message
    tags = set(monitor.last_metrics)
    assert len(tags) > 20 and all(t.startswith("attention_") for t in tags)
    images = {
        "attention/raw",
        "attention/rollout",
        "attention/raw_aggregates",
        "attention/filmstrip",
        "attention/heads/layer_01",
        "attention_layers_steps/entropy/raw",
    }

    # TensorBoard: every scalar at every step (drift from the second pass on), every image at every step
    acc = lit.read_events(loggers[0].log_dir)
    for tag in tags:
        expected = STEPS[1:] if "_drift_" in tag else STEPS
        assert [s.step for s in acc.Scalars(tag)] == expected, tag
        assert acc.Scalars(tag)[-1].value == pytest.approx(monitor.last_metrics[tag], rel=1e-6)
    for tag in images:
        assert [e.step for e in acc.Images(tag)] == STEPS, tag
    assert [e.step for e in acc.Images("attention/rollout_evolution/probe_01")] == [8]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    text = EventAccumulator(str(loggers[0].log_dir), size_guidance={"tensors": 0})
    text.Reload()
    assert [
        (e.step, e.tensor_proto.string_val[0].decode()) for e in text.Tensors("attention/alerts/uniform/text_summary")
    ] == [(4, message)]

    # CSV: metrics.csv columns, PNGs under its log_dir
    with open(Path(loggers[3].log_dir) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for tag in tags:
        expected = STEPS[1:] if "_drift_" in tag else STEPS
        assert [int(r["step"]) for r in rows if r.get(tag)] == expected, tag
    pngs = {p.name for p in (Path(loggers[3].log_dir) / "attention").iterdir()}
    assert {f"{t.replace('/', '__')}_step{s:07d}.png" for t in images for s in STEPS} <= pngs
    assert "attention__rollout_evolution__probe_00.gif" in pngs
    assert (
        Path(loggers[3].log_dir) / "attention" / "alerts.txt"
    ).read_text() == f"4\tattention/alerts/uniform\t{message}\n"

    # MLflow: metric history per tag, stepped images and the GIFs as artifacts
    client = MlflowClient(uri)
    run_id = loggers[2].run_id
    for tag in tags:
        expected = STEPS[1:] if "_drift_" in tag else STEPS
        assert sorted(m.step for m in client.get_metric_history(run_id, tag)) == expected, tag
    names = [a.path for a in client.list_artifacts(run_id, "images")]
    for tag in images:
        stepped = sorted(
            int(n.split("+step+")[1].split("+")[0])
            for n in names
            if n.startswith(f"images/{tag.replace('/', '~')}+step+") and n.endswith(".png")
        )
        assert stepped == STEPS, tag
    gifs = [a.path for a in client.list_artifacts(run_id, "attention")]
    assert "attention/attention__rollout_evolution__probe_00.gif" in gifs
    local = client.download_artifacts(run_id, "attention/attention__rollout_evolution__probe_00.gif", str(tmp / "dl"))
    assert Image.open(local).format == "GIF"
    local = client.download_artifacts(run_id, "alerts/attention__alerts__uniform_step0000004.txt", str(tmp / "dl"))
    assert Path(local).read_text() == message

    # W&B offline: the media files written under the run directory
    (run_dir,) = (tmp / "wandb_dir" / "wandb").glob("offline-run-*")
    media = run_dir / "files" / "media"
    for tag in images:
        folder, _, name = tag.rpartition("/")
        files = [
            p for p in (media / "images" / folder).iterdir() if re.fullmatch(rf"{name}_\d+_[0-9a-f]+\.png", p.name)
        ]
        assert len(files) == len(STEPS), (tag, files)
    assert len(list((media / "videos").glob("attention/rollout_evolution/probe_0*.gif"))) == 2
    # ... and every scalar at its trainer/global_step, read back from the run file
    rows = wandb_log.history(next(run_dir.glob("*.wandb")))
    for tag in tags:
        expected = STEPS[1:] if "_drift_" in tag else STEPS
        logged = [(r["trainer/global_step"], r[tag]) for r in rows if tag in r]
        assert [step for step, _ in logged] == expected, tag
        assert logged[-1][1] == pytest.approx(monitor.last_metrics[tag], rel=1e-6)
    # the alert as a W&B table (log_text) at its step, its message in the table file
    tables = [
        (r["trainer/global_step"], r["attention/alerts/uniform/_type"])
        for r in rows
        if "attention/alerts/uniform/_type" in r
    ]
    assert tables == [(4, "table-file")]
    (table_file,) = (media / "table" / "attention" / "alerts").glob("uniform_*.table.json")
    assert json.loads(table_file.read_text())["data"] == [[4, message]]
    captions = [r["attention/raw/captions"] for r in rows if "attention/raw/captions" in r]
    assert len(captions[0]) == 1 and captions[0][0].startswith("rows: #0 y0 p") and " | #1 y1 p" in captions[0][0]

    # the interactive report at the end of fit: a W&B HTML panel, an MLflow artifact, a file beside TensorBoard's and
    # the CSV logger's files; each the same page, with every pass and the alert
    page = monitor.report_html()
    assert [(r["trainer/global_step"], r["attention/report/_type"]) for r in rows if "attention/report/_type" in r] == [
        (8, "html-file")
    ]
    (panel,) = (media / "html" / "attention").glob("report_*.html")
    local = client.download_artifacts(run_id, "attention__report.html", str(tmp / "dl"))
    for path in (panel, local, *(Path(lg.log_dir) / "attention" / "attention__report.html" for lg in loggers[::3])):
        assert Path(path).read_text(encoding="utf-8") == page, path
    assert '"step":8' in page and message[:40] in page
    assert monitor._repr_html_().startswith("<iframe srcdoc=")  # a notebook shows the same page inline


def test_custom_scalars_layout_one_chart_per_metric_and_method_one_line_per_layer(tmp_path):
    monitor = AttentionMonitor(
        _probes(),
        masks=torch.ones(2, lit.IMG, lit.IMG, dtype=torch.bool),
        tile_size=16,
        faithfulness=True,
        faithfulness_steps=2,
        on_error="raise",
    )
    trainer = lit.trainer(tmp_path, [monitor])
    trainer.fit(lit.LitViT(depth=3), *lit.loaders())
    acc = lit.read_events(trainer.logger.log_dir)
    layout = _layout(acc)
    charts = {c.title: (cat.title, list(c.multiline.tag)) for cat in layout.category for c in cat.chart}
    sections = {section for section, _ in charts.values()}
    assert {
        "attention_entropy",
        "attention_drift_baseline",
        "attention_drift_previous",
        "attention_artifacts",
        "attention_distance",
        "attention_pointing_game",
        "attention_faithfulness",
    } <= sections
    # every scalar lands in exactly one chart, and each chart's lines are the layers (or methods)
    scalars = acc.Tags()["scalars"]
    for tag in scalars:
        if tag.startswith("attention"):
            owners = [t for t, (_, regexes) in charts.items() if any(re.search(r, tag) for r in regexes)]
            assert owners == [tag.rsplit("/", 1)[0]], tag
    lines = lambda chart: sorted(t for t in scalars if re.search(charts[chart][1][0], t))  # noqa: E731
    assert lines("attention_entropy/rollout") == [f"attention_entropy/rollout/layer_{l:02d}" for l in range(3)]
    assert lines("attention_faithfulness/most_first_auc") == [
        f"attention_faithfulness/most_first_auc/{m}" for m in ("random", "raw", "rollout")
    ]  # chance on the same chart


def test_two_named_monitors_share_a_trainer_and_both_resume(tmp_path):
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    make = lambda: [  # noqa: E731
        AttentionMonitor(_probes(), name="teacher", tile_size=16, module="teacher"),
        AttentionMonitor(_probes(), name="student", tile_size=16, module="model", methods=("raw",)),
    ]
    first = make()
    trainer = lit.trainer(tmp_path, [*first, ckpt], enable_checkpointing=True)
    trainer.fit(TeacherStudent(), *lit.loaders())
    acc = lit.read_events(trainer.logger.log_dir)
    for name, monitor in zip(("teacher", "student"), first):
        assert monitor.last_metrics and all(t.startswith(f"attention_{name}_") for t in monitor.last_metrics)
        for tag in monitor.last_metrics:
            expected = STEPS[1:] if "_drift_" in tag else STEPS
            assert [s.step for s in acc.Scalars(tag)] == expected, tag
        assert [e.step for e in acc.Images(f"attention_{name}/raw")] == STEPS
    assert (
        "attention_teacher/rollout" in acc.Tags()["images"] and "attention_student/rollout" not in acc.Tags()["images"]
    )
    # neither overwrote the other: one event per step per tag, the values of each monitor's own model
    assert (
        first[0].last_metrics["attention_teacher_entropy/raw/layer_00"]
        != first[1].last_metrics["attention_student_entropy/raw/layer_00"]
    )
    sections = {cat.title for cat in _layout(acc).category}
    assert {"attention_teacher_entropy", "attention_student_entropy"} <= sections  # both in one merged layout

    second = make()
    trainer = lit.trainer(tmp_path, [*second, ckpt], enable_checkpointing=True, max_epochs=3)
    trainer.fit(TeacherStudent(), *lit.loaders(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    for old, new in zip(first, second):
        assert [s for s, _ in new.runner.history] == STEPS + [12]
        assert [s for s, _ in new.runner.scalar_history] == STEPS + [12]
        for method, maps in old.runner.baseline.items():
            assert torch.equal(new.runner.baseline[method], maps)


def test_monitors_with_one_name_are_refused(tmp_path):
    monitors = [AttentionMonitor(_probes(), methods=("raw",)), AttentionMonitor(_probes(), methods=("rollout",))]
    with pytest.raises(ValueError, match="share `name=None`.*different `name=`"):
        lit.trainer(tmp_path, monitors).fit(lit.LitViT(), *lit.loaders())


class TeacherStudent(lit.LitViT):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.teacher = lit.LitViT().model


def _layout(acc):
    """The custom-scalars layout TensorBoard shows: the last one written to the run."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0])
    return layout
