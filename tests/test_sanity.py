"""Model-randomisation sanity check: the user's model untouched, each step's maps those of a copy with the stated
blocks re-initialised, and the correlations equal to a float64 Spearman written here with numpy."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch
from conftest import input_for, make_vit
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_attn import AttentionMonitor, attention_maps, sanity_check, spearman
from lightning_attn.backends import backend_for
from lightning_attn.sanity import average_ranks, randomise_blocks

import families
import lit

METHODS = ("raw", "rollout", "grad_rollout")


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of the positions they span, by walking the sorted values."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[order[j + 1]] == values[order[i]]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = _ranks(a.astype(np.float64)), _ranks(b.astype(np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    norm = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float("nan") if norm == 0 else float((ra * rb).sum() / norm)


def _mean_spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    values = [_spearman(x.flatten().numpy(), y.flatten().numpy()) for x, y in zip(a, b)]
    defined = [v for v in values if not np.isnan(v)]
    return float(np.mean(defined)) if defined else float("nan")


def _final(model, images, target=None) -> dict[str, torch.Tensor]:
    maps = attention_maps(model, images, methods=METHODS, target=target)
    return {m: maps[m][:, -1].float() for m in METHODS}


def test_spearman_with_ties_equals_the_numpy_reference():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 4, (6, 5, 5), generator=g).float()  # many ties
    b = torch.randint(0, 3, (6, 5, 5), generator=g).float()
    expected = [_spearman(x.flatten().numpy(), y.flatten().numpy()) for x, y in zip(a, b)]
    np.testing.assert_allclose(spearman(a, b).numpy(), expected, rtol=0, atol=1e-12)
    assert average_ranks(a.flatten(1)).tolist() == [_ranks(x.flatten().numpy()).tolist() for x in a]
    c = torch.rand(2, 16, generator=g)
    assert spearman(c, c).tolist() == pytest.approx([1.0, 1.0])
    assert spearman(c, -c).tolist() == pytest.approx([-1.0, -1.0])
    assert spearman(c, torch.ones(2, 16)).isnan().all()  # a constant map: undefined, not 0


def test_cascading_and_independent_steps_against_a_float64_reference():
    model = make_vit("vit")  # 3 blocks
    images = input_for("vit", batch=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    rng = torch.get_rng_state()

    check = sanity_check(model, images, methods=METHODS, seed=5)

    # the user's model and the global RNG: bitwise as they were
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in model.parameters()] == flags and torch.equal(torch.get_rng_state(), rng)
    assert check.blocks == ["blocks.0", "blocks.1", "blocks.2"] and check.kept == []
    assert check.step_labels() == ["block 2", "blocks 1-2", "blocks 0-2"]
    assert check.step_labels("independent") == ["block 2", "block 1", "block 0"]

    trained = attention_maps(model, images, methods=METHODS)
    target = trained.target
    assert torch.equal(check.target, target)  # every step explains the trained model's prediction
    original = {m: trained[m][:, -1] for m in METHODS}
    cascade = copy.deepcopy(model)
    for step, block in enumerate((2, 1, 0)):
        randomise_blocks(cascade, [block], seed=5)
        now = _final(cascade, images, target)
        alone = copy.deepcopy(model)
        randomise_blocks(alone, [block], seed=5)
        single = _final(alone, images, target)
        for m in METHODS:
            torch.testing.assert_close(check.maps[m][:, 0], original[m], rtol=0, atol=1e-6)
            torch.testing.assert_close(check.maps[m][:, step + 1], now[m], rtol=1e-5, atol=1e-7)
            assert check.cascading[m][step] == pytest.approx(_mean_spearman(original[m], now[m]), abs=1e-6)
            assert check.independent[m][step] == pytest.approx(_mean_spearman(original[m], single[m]), abs=1e-6)
    # randomising every block leaves little of a map that depends on the weights
    assert all(abs(check.cascading[m][-1]) < 0.9 for m in METHODS)


def test_randomise_blocks_redraws_only_its_blocks_with_the_same_weights_for_a_seed():
    model = make_vit("vit")
    twin, again = copy.deepcopy(model), copy.deepcopy(model)
    rng = torch.get_rng_state()
    randomise_blocks(twin, [1], seed=3)
    randomise_blocks(again, [1, 2], seed=3)
    assert torch.equal(torch.get_rng_state(), rng)
    for name, value in model.state_dict().items():
        changed = not torch.equal(value, twin.state_dict()[name])
        if name.startswith("blocks.1.") and name.endswith("weight") and value.dim() == 2:
            assert changed, name  # every linear weight of the block re-drawn
        elif not name.startswith("blocks.1."):
            assert not changed, name  # nothing else touched
        if name.startswith("blocks.1."):  # block 1 drawn alike whether block 2 was drawn with it or not
            assert torch.equal(twin.state_dict()[name], again.state_dict()[name]), name
    # timm's init: linear weights from a normal of std 0.02 truncated at 2 (absolute), biases 0
    qkv = twin.blocks[1].attn.qkv
    assert qkv.weight.abs().max() <= 2 and 0.015 < qkv.weight.std() < 0.025 and not qkv.bias.any()
    with pytest.raises(ValueError, match="out of range"):
        randomise_blocks(twin, [3])


def test_other_families_find_their_blocks_and_reinitialise_every_weight():
    pytest.importorskip("transformers")
    for model, names in (
        (families.make_hf("vit_cls"), [f"vit.layers.{i}" for i in range(3)]),
        (families.make_torchvision(), [f"encoder.layers.encoder_layer_{i}" for i in range(3)]),
    ):
        blocks = [name for name, _ in backend_for(model).blocks()]
        assert blocks == names
        check = sanity_check(model, families.images(2), methods=("rollout",), independent=False)
        assert len(check.cascading["rollout"]) == len(blocks) and check.kept == []


def test_bad_input_is_one_clear_error():
    no_blocks = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=0)
    with pytest.raises(ValueError, match="no transformer blocks to randomise"):
        sanity_check(no_blocks, torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="resize them"):
        sanity_check(make_vit("vit"), torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="not a supported Vision Transformer"):
        sanity_check(torch.nn.Linear(3, 3), torch.randn(1, 3, 32, 32))


def test_callback_logs_the_check_once_at_the_start_and_training_is_unchanged(tmp_path):
    probes = torch.randn(2, 3, lit.IMG, lit.IMG, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([0, 2])
    methods = ("rollout", "relevance")

    def fit(check: bool, folder: str) -> tuple[AttentionMonitor, lit.LitViT, lit.LitViT]:
        torch.manual_seed(0)
        model = lit.LitViT()
        start = copy.deepcopy(model)
        monitor = AttentionMonitor(probes, labels=labels, methods=methods, tile_size=16, sanity_check=check)
        monitor.on_error = "raise"
        lit.trainer(tmp_path / folder, [monitor], max_epochs=1).fit(model, *lit.loaders())
        return monitor, model, start

    monitor, model, start = fit(True, "with")
    _, plain, _ = fit(False, "without")
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in model.state_dict().items())  # training unchanged

    expected = sanity_check(start.model, probes, methods=methods, target=labels)  # the weights at the start
    assert monitor.sanity is not None and monitor.sanity.cascading == pytest.approx(expected.cascading, abs=1e-6)
    log_dir = next((tmp_path / "with").rglob("events.out.*")).parent
    acc = lit.read_events(log_dir)
    assert [e.step for e in acc.Images("attention/sanity")] == [0]
    for method in methods:
        for k, value in enumerate(expected.cascading[method]):
            (event,) = acc.Scalars(f"attention_sanity/{method}/top_{k + 1:02d}")
            assert event.step == 0 and event.value == pytest.approx(value, abs=1e-5)
        (event,) = acc.Scalars(f"attention_sanity_independent/{method}/block_00")
        assert event.value == pytest.approx(expected.independent[method][-1], abs=1e-5)
    text = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    text.Reload()
    (event,) = text.Tensors("attention/sanity_table/text_summary")
    assert "| relevance | cascading |" in event.tensor_proto.string_val[0].decode()


def test_callback_without_blocks_to_randomise_fails_at_setup(tmp_path):
    monitor = AttentionMonitor(torch.randn(1, 3, lit.IMG, lit.IMG), sanity_check=True)
    with pytest.raises(ValueError, match="no transformer blocks to randomise"):
        lit.trainer(tmp_path, [monitor], max_epochs=1).fit(lit.LitViT(depth=0), *lit.loaders())
    with pytest.raises(ValueError, match="`sanity_check` must be True or False"):
        AttentionMonitor(sanity_check="yes")
