"""The `lightning-attn` command on real checkpoints of a tiny fit: its files equal what the runner computes, and bad
input ends with one line and exit status 2."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_attn import AttentionMonitor, attention_drift, attention_maps
from lightning_attn.backends import backend_for
from lightning_attn.cli import main
from lightning_attn.options import ProbeOptions
from lightning_attn.probes import Probes, load_images
from lightning_attn.runner import ProbeRunner, redraw

import lit

TESTS = Path(__file__).parent


def _env() -> dict[str, str]:
    # the LightningModule class lives in tests/lit.py: the command imports it like a user's own project
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def _run(*args: str, module: bool = False) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lightning_attn"] if module else ["lightning-attn"]
    return subprocess.run([*command, *args], capture_output=True, text=True, env=_env(), timeout=300)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny fit with the monitor and checkpoints: plain (hyper-parameters only) and LightningCLI-style."""
    root = tmp_path_factory.mktemp("run")
    ckpt = __import__("lightning.pytorch", fromlist=["callbacks"]).callbacks.ModelCheckpoint(
        dirpath=root / "ckpt", save_last=True, save_top_k=-1
    )
    monitor = AttentionMonitor(torch.randn(2, 3, lit.IMG, lit.IMG), tile_size=16)
    model = lit.LitViT(lr=0.2)
    model.save_hyperparameters()
    lit.trainer(root, [monitor, ckpt], enable_checkpointing=True, max_epochs=2).fit(model, *lit.loaders())
    # LightningCLI stores the class path beside the init arguments; a real LightningCLI run writes it
    cli_script = root / "cli_fit.py"
    cli_script.write_text(
        "import lit\nfrom lightning.pytorch.cli import LightningCLI\n"
        "cli = LightningCLI(lit.LitViT, subclass_mode_model=True, run=False, args=['--model=lit.LitViTHparams',"
        " '--model.init_args.lr=0.1', '--trainer.max_epochs=1', '--trainer.limit_train_batches=2',"
        " '--trainer.enable_progress_bar=false',"
        f" '--trainer.default_root_dir={root / 'cli'}', '--trainer.logger=false'])\n"
        "cli.trainer.fit(cli.model, lit.loaders()[0])\n"
    )
    subprocess.run([sys.executable, str(cli_script)], check=True, env=_env(), capture_output=True, timeout=300)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray((rng.random((40, 50, 3)) * 255).astype(np.uint8)).save(images / f"img{i}.png")
    return root


def _vit_of(checkpoint: Path) -> torch.nn.Module:
    return lit.LitViT.load_from_checkpoint(checkpoint, map_location="cpu").eval().model


def test_render_writes_the_runners_grids_scalars_and_index(run_dir, tmp_path):
    ckpt = run_dir / "ckpt" / "last.ckpt"
    out = tmp_path / "render"
    done = _run(
        "render",
        str(ckpt),
        "--model-class",
        "lit.LitViT",
        str(run_dir / "images"),
        "-o",
        str(out),
        "--batch-size",
        "2",
        "--tile-size",
        "16",
        "--methods",
        "raw",
        "rollout",
        "relevance",
    )
    assert done.returncode == 0, done.stderr
    vit = _vit_of(ckpt)
    paths = sorted((run_dir / "images").glob("*.png"))
    images = load_images(paths, backend_for(vit).transform())
    # the command renders a given (trained) model: rows name its predictions whenever it has class logits
    options = ProbeOptions(methods=("raw", "rollout", "relevance"), tile_size=16, predictions="always")
    saved = json.loads((out / "scalars.json").read_text())
    assert [b["images"] for b in saved["batches"]] == [[str(p) for p in paths[:2]], [str(paths[2])]]
    for index, batch in enumerate((images[:2], images[2:])):
        expected = ProbeRunner(vit, Probes(batch), options, first_index=2 * index).run(0, history_panels=False)
        assert saved["batches"][index]["scalars"] == pytest.approx(expected.scalars, abs=1e-6)
        for panel in expected.panels:
            name = panel.tag.replace("/", "__") + f"_{index:03d}.png"
            written = np.asarray(Image.open(out / name))
            assert written.shape == panel.image.shape and np.abs(written.astype(int) - panel.image).max() <= 1, name
    # the maps themselves are attention_maps' on these images
    maps = attention_maps(vit, images[:2], methods=("raw",))
    assert saved["batches"][0]["scalars"]["attention_entropy/raw/layer_00"] == pytest.approx(
        float(__import__("lightning_attn").normalized_entropy(maps.raw[:, 0]).mean()), abs=1e-6
    )
    page = (out / "index.html").read_text()
    assert "attention__rollout_000.png" in page and "attention_entropy/raw/layer_00" in page


def test_lightning_cli_checkpoint_names_its_own_class(run_dir, tmp_path):
    (ckpt,) = (run_dir / "cli").rglob("*.ckpt")
    assert "_class_path" in torch.load(ckpt, weights_only=False)["hyper_parameters"]
    assert (
        main(
            [
                "render",
                str(ckpt),
                str(run_dir / "images" / "img0.png"),
                "-o",
                str(tmp_path),
                "--quiet",
                "--tile-size",
                "16",
            ]
        )
        == 0
    )
    assert (tmp_path / "attention__raw_000.png").is_file()


def test_compare_drift_equals_the_diagnostics_function(run_dir, tmp_path):
    ckpt = run_dir / "ckpt" / "last.ckpt"
    (first,) = [p for p in (run_dir / "ckpt").glob("epoch=0*.ckpt")]
    done = _run(
        "compare",
        str(first),
        str(ckpt),
        "--model-class",
        "lit.LitViT",
        str(run_dir / "images"),
        "-o",
        str(tmp_path),
        "--tile-size",
        "16",
        module=True,
    )
    assert done.returncode == 0, done.stderr
    table = json.loads((tmp_path / "drift.json").read_text())["drift"]
    assert [r["drift"] for r in table] == sorted((r["drift"] for r in table), reverse=True)  # most moved first
    a, b = _vit_of(first), _vit_of(ckpt)
    images = load_images(sorted((run_dir / "images").glob("*.png")), backend_for(a).transform())
    for method in ("raw", "rollout"):
        expected = attention_drift(attention_maps(b, images)[method], attention_maps(a, images)[method])
        got = {r["layer"]: r["drift"] for r in table if r["method"] == method}
        np.testing.assert_allclose([got[l] for l in range(len(expected))], expected.numpy(), atol=1e-6)
    assert "| method | layer | drift" in done.stdout and (tmp_path / "compare__rollout_000.png").is_file()


def test_replay_redraws_the_history_without_the_model(run_dir, tmp_path):
    done = _run("replay", str(run_dir), "-o", str(tmp_path))
    assert done.returncode == 0, done.stderr
    state = next(
        v
        for k, v in torch.load(run_dir / "ckpt" / "last.ckpt", weights_only=False)["callbacks"].items()
        if k.startswith("AttentionMonitor")
    )["runner"]
    strip, animations = redraw(state)
    assert [s for s, _ in state["history"]] == [0, 4, 8]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "attention__filmstrip.png")), strip.image)
    gifs = sorted(p.name for p in tmp_path.glob("*.gif"))
    assert gifs == ["attention__rollout_evolution__probe_00.gif", "attention__rollout_evolution__probe_01.gif"]
    with Image.open(tmp_path / gifs[0]) as gif:
        assert gif.n_frames == len(animations[next(iter(animations))])


def _page_data(path: Path) -> dict:
    page = path.read_text(encoding="utf-8")
    return json.loads(page.split("id='la-data'>", 1)[1].split("</script>", 1)[0].replace("<\\/", "</"))


def _half(array: dict) -> np.ndarray:
    data = np.frombuffer(base64.b64decode(array["data"]), dtype="<f2")
    return data.reshape(array["shape"]).astype(np.float32)


def test_report_reads_the_run_without_the_model_or_runs_a_model(run_dir, tmp_path):
    done = _run("report", str(run_dir), "-o", str(tmp_path / "run.html"))
    assert done.returncode == 0, done.stderr
    state = torch.load(run_dir / "ckpt" / "last.ckpt", weights_only=True)["callbacks"]
    runner = next(v for k, v in state.items() if k.startswith("AttentionMonitor"))["runner"]
    data = _page_data(tmp_path / "run.html")
    assert [p["step"] for p in data["passes"]] == [0, 4, 8] and data["meta"]["layers"] == [0, 1]
    for kept, shown in zip(runner["report"], data["passes"]):
        np.testing.assert_array_equal(_half(shown["matrices"]["1"]), kept["matrices"][1].float().numpy())
        np.testing.assert_array_equal(_half(shown["maps"]["rollout"]), kept["maps"]["rollout"].float().numpy())
    assert {c["title"] for c in data["curves"]} >= {"attention_entropy/raw", "attention_drift_baseline/rollout"}
    # a model and images: one pass, every layer's rows
    ckpt, images = run_dir / "ckpt" / "last.ckpt", run_dir / "images"
    sys.path.insert(0, str(TESTS))
    out = tmp_path / "model.html"
    assert main(["report", str(ckpt), str(images), "--model-class", "lit.LitViT", "-o", str(out), "--quiet"]) == 0
    data = _page_data(out)
    model = _vit_of(ckpt)
    expected = attention_maps(model, load_images(sorted(images.iterdir()), backend_for(model).transform()))
    (shown,) = data["passes"]
    np.testing.assert_allclose(_half(shown["maps"]["raw"]), expected.raw.numpy(), rtol=1e-3, atol=1e-6)
    assert sorted(shown["matrices"]) == ["0", "1"] and data["meta"]["head_matrix_layers"] == [1]


def test_help_has_an_example_per_subcommand():
    done = _run("render", "--help")
    assert done.returncode == 0 and "example:" in done.stdout and "lightning-attn render" in done.stdout
    for command in ("compare", "replay", "report", "sanity"):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["render", "missing.ckpt", "{images}", "-o", "{out}"], "does not exist: pass a Lightning checkpoint"),
        (["render", "timm:vit_tiny_patch16_224", "{out}/nothing.png", "-o", "{out}"], "does not exist: pass image"),
        (["render", "timm:vit_tiny_patch16_224", "{bad}", "-o", "{out}"], "cannot read an image"),
        (["render", "{ckpt}", "--model-class", "nowhere.LitViT", "{images}", "-o", "{out}"], "cannot import `nowhere`"),
        (["render", "{ckpt}", "{images}", "-o", "{out}"], "pass `--model-class"),
        (
            ["render", "{ckpt}", "--model-class", "lit.LitViTDeeper", "{images}", "-o", "{out}"],
            "do not fit `lit.LitViTDeeper`",
        ),
        (["render", "timm:resnet10t", "{images}", "-o", "{out}"], "not a supported Vision Transformer"),
        (["render", "timm:no_such_model", "{images}", "-o", "{out}"], "timm has no model"),
        (["replay", "{out}", "-o", "{out}"], "no checkpoint"),
        (["report", "{ckpt}", "-o", "{out}/report.png"], "must name an .html file"),
        (["report", "{out}", "-o", "{out}/report.html"], "no checkpoint"),
    ],
)
def test_bad_input_is_one_line_and_exit_status_2(run_dir, tmp_path, capsys, args, message):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    values = dict(
        images=str(run_dir / "images"), out=str(tmp_path), bad=str(bad), ckpt=str(run_dir / "ckpt" / "last.ckpt")
    )
    sys.path.insert(0, str(TESTS))
    assert main([a.format(**values) for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_debug_shows_the_traceback():
    done = _run("render", "timm:no_such_model", "x.png", "-o", "out", "--debug")
    assert done.returncode == 2 and "Traceback" in done.stderr and "timm has no model" in done.stderr


def test_render_a_hugging_face_folder_and_a_timm_name(run_dir, tmp_path):
    pytest.importorskip("transformers")
    import families

    model = families.make_hf("vit_cls")
    model.save_pretrained(tmp_path / "hf")
    image = str(run_dir / "images" / "img0.png")
    assert main(["render", str(tmp_path / "hf"), image, "-o", str(tmp_path / "a"), "--quiet", "--tile-size", "16"]) == 0
    saved = json.loads((tmp_path / "a" / "scalars.json").read_text())["batches"][0]["scalars"]
    loaded = type(model).from_pretrained(tmp_path / "hf").eval()
    images = load_images([image], backend_for(loaded).transform())
    expected = ProbeRunner(loaded, Probes(images), ProbeOptions(tile_size=16)).run(0, history_panels=False)
    assert saved == pytest.approx(expected.scalars, abs=1e-6)
    assert (
        main(
            [
                "render",
                "timm:vit_tiny_patch16_224",
                image,
                "-o",
                str(tmp_path / "b"),
                "--quiet",
                "--layers",
                "-1",
                "--tile-size",
                "16",
            ]
        )
        == 0
    )
    assert (tmp_path / "b" / "attention__rollout_000.png").is_file()


class _Payload:
    """Unpickled, it creates a file: what a hostile checkpoint would do with a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("command", ["render", "compare", "replay", "replay-folder"])
def test_a_checkpoint_that_would_run_code_is_refused_in_one_line(run_dir, tmp_path, capsys, command):
    marker = tmp_path / "ran"
    state = torch.load(run_dir / "ckpt" / "last.ckpt", weights_only=True)
    state["hyper_parameters"] = {"lr": 0.1, "evil": _Payload(marker)}
    folder = tmp_path / "run"
    folder.mkdir()
    evil = folder / "evil.ckpt"
    torch.save(state, evil)
    images, out = str(run_dir / "images"), str(tmp_path / "out")
    args = {
        "render": ["render", str(evil), "--model-class", "lit.LitViT", images, "-o", out],
        "compare": [
            "compare",
            "timm:vit_tiny_patch16_224",
            str(evil),
            "--model-class",
            "lit.LitViT",
            images,
            "-o",
            out,
        ],
        "replay": ["replay", str(evil), "-o", out],
        "replay-folder": ["replay", str(folder), "-o", out],
    }[command]
    sys.path.insert(0, str(TESTS))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert not marker.exists(), "the checkpoint ran code"
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "evil.ckpt" in err and "`io.open`" in err
    assert "--trust-checkpoint" in err


def test_trust_checkpoint_loads_a_trusted_file_with_other_objects(run_dir, tmp_path, capsys):
    import argparse

    state = torch.load(run_dir / "ckpt" / "last.ckpt", weights_only=True)
    state["extra"] = argparse.Namespace(seed=1)  # no code, but not plain values
    torch.save(state, tmp_path / "trusted.ckpt")
    args = ["replay", str(tmp_path / "trusted.ckpt"), "-o", str(tmp_path / "out")]
    assert main(args) == 2 and "argparse.Namespace" in capsys.readouterr().err
    assert main([*args, "--trust-checkpoint"]) == 0
    assert (tmp_path / "out" / "index.html").is_file()
    render = ["render", str(tmp_path / "trusted.ckpt"), "--model-class", "lit.LitViT", str(run_dir / "images")]
    assert main([*render, "-o", str(tmp_path / "r"), "--quiet", "--trust-checkpoint", "--tile-size", "16"]) == 0


def test_replay_skips_an_unreadable_newest_checkpoint_with_a_note(run_dir, tmp_path, capsys):
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(run_dir / "ckpt", folder)
    cut = folder / "epoch=9-step=99.ckpt"  # newest, cut short as by a crash while it was written
    cut.write_bytes((folder / "last.ckpt").read_bytes()[:1000])
    os.utime(cut, (cut.stat().st_atime, cut.stat().st_mtime + 60))
    assert main(["replay", str(folder), "-o", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert "note: skipped a newer checkpoint" in captured.err and "epoch=9-step=99.ckpt" in captured.err
    assert "epoch=9-step=99.ckpt" not in captured.out and (tmp_path / "out" / "index.html").is_file()
    assert main(["replay", str(cut), "-o", str(tmp_path / "out")]) == 2  # the file itself, named: no fallback


def test_help_imports_neither_torch_nor_lightning():
    # `lightning-attn --help` must answer at once: the heavy modules come with the commands that use them
    code = (
        "import sys\nfrom lightning_attn.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'lightning', 'timm', 'numpy', 'PIL'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "[]", done.stdout + done.stderr


def test_every_exported_name_resolves_lazily():
    import lightning_attn

    assert sorted(lightning_attn._EXPORTS) == sorted(lightning_attn.__all__)
    for name in lightning_attn.__all__:
        value = getattr(lightning_attn, name)
        assert getattr(value, "__name__", name) == name or not callable(value), name


def test_pages_name_the_files_and_classes_and_say_when_weights_are_random(run_dir, tmp_path, capsys):
    names = tmp_path / "classes.txt"
    names.write_text("cat\ndog\nbird\n")
    images = sorted((run_dir / "images").glob("*.png"))
    ckpt = str(run_dir / "ckpt" / "last.ckpt")
    args = ["render", ckpt, "--model-class", "lit.LitViT", str(run_dir / "images"), "--tile-size", "16", "--quiet"]
    assert main([*args, "-o", str(tmp_path / "a"), "--class-names", str(names)]) == 0
    vit = _vit_of(run_dir / "ckpt" / "last.ckpt")
    logits = vit(load_images(images, backend_for(vit).transform()))
    page = (tmp_path / "a" / "index.html").read_text()
    for i, (path, k) in enumerate(zip(images, logits.argmax(-1).tolist())):
        expected = f"<tr><td>#{i}</td><td>{path}</td><td>{['cat', 'dog', 'bird'][k]} ({k})</td></tr>"
        assert expected in page
    assert "random weights" not in page + capsys.readouterr().err
    image = str(images[0])
    assert main(["render", "timm:vit_tiny_patch16_224", image, "-o", str(tmp_path / "b"), "--layers", "-1"]) == 0
    err = capsys.readouterr().err
    assert "note: timm:vit_tiny_patch16_224 has random weights (no `--pretrained`)" in err
    assert (
        "<p class='note'><strong>note:</strong> timm:vit_tiny_patch16_224 has random weights"
        in (tmp_path / "b" / "index.html").read_text()
    )


def test_sanity_writes_the_functions_correlations_picture_and_index(run_dir, tmp_path, capsys):
    from lightning_attn import sanity_check

    ckpt = run_dir / "ckpt" / "last.ckpt"
    out = tmp_path / "sanity"
    args = ["sanity", str(ckpt), "--model-class", "lit.LitViT", str(run_dir / "images"), "-o", str(out)]
    assert main([*args, "--methods", "rollout", "relevance", "--tile-size", "16", "--seed", "3"]) == 0
    vit = _vit_of(ckpt)
    images = load_images(sorted((run_dir / "images").glob("*.png")), backend_for(vit).transform())
    expected = sanity_check(vit, images, methods=("rollout", "relevance"), seed=3)
    saved = json.loads((out / "sanity.json").read_text())
    assert list(saved) == ["rollout", "relevance"] and all(len(v) == 2 for v in saved.values())  # 2 blocks
    for method, values in saved.items():
        assert values == pytest.approx(expected.cascading[method], abs=1e-6)
    independent = json.loads((out / "sanity_independent.json").read_text())
    assert independent["relevance"] == pytest.approx(expected.independent["relevance"], abs=1e-6)
    picture = np.asarray(Image.open(out / "sanity.png"))
    assert picture.shape == expected.picture(torch.rand(3, 3, lit.IMG, lit.IMG), 16)[0].shape  # 6 rows x 4 columns
    page = (out / "index.html").read_text()
    assert "sanity.png" in page and "blocks 0-1" in page and "| relevance | cascading |" in capsys.readouterr().out
