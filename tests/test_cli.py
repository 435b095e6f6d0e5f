"""The `lightning-attn` command on real checkpoints of a tiny fit: its files equal what the runner computes, and bad
input ends with one line and exit status 2."""

from __future__ import annotations

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
    options = ProbeOptions(methods=("raw", "rollout", "relevance"), tile_size=16)
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


def test_help_has_an_example_per_subcommand():
    done = _run("render", "--help")
    assert done.returncode == 0 and "example:" in done.stdout and "lightning-attn render" in done.stdout
    for command in ("compare", "replay", "sanity"):
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
