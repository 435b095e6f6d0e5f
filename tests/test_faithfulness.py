from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import input_for, make_vit
from torch import nn

from lightning_attn import attention_maps
from lightning_attn.faithfulness import (
    jaccard_index,
    patches_to_pixels,
    perturbation_curves,
    pixels_to_patches,
    pointing_game,
    random_perturbation_curves,
    top_mass_patches,
)

import reference

GRID = (4, 4)  # 16 x 16 images, 4 x 4 pixel patches


class RegionClassifier(nn.Module):
    """Class 0's logit is 3 x the mean brightness of the top-left 2 x 2 patches; classes 1 and 2 are constants.

    So the truly important patches are known: 0, 1, 4 and 5 of the 4 x 4 grid. The dropout makes the output
    random in train mode, so a pass that forgot eval mode would show.
    """

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        x = self.drop(x)
        region = x[:, :, :8, :8].mean(dim=(1, 2, 3))
        return torch.stack([3 * region, torch.zeros_like(region), torch.full_like(region, -1.0)], dim=1)


def _images(batch: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 16, 16, generator=g)
    x[:, :, :8, :8] = x[:, :, :8, :8].abs() + 1.0  # a bright region: class 0 wins while it is there
    return x


def _true_map(batch: int = 4) -> torch.Tensor:
    m = torch.zeros(batch, *GRID)
    m[:, :2, :2] = 1.0
    return m


def _prob(model: nn.Module, x: torch.Tensor, c: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x).softmax(-1)[:, c]


def test_true_map_curves_have_the_known_values_and_beat_a_random_map():
    model = RegionClassifier()
    x = _images()
    c = perturbation_curves(model, x, _true_map(), target=0, steps=4)
    p0, p_empty = _prob(model, x), _prob(model, torch.zeros_like(x))
    torch.testing.assert_close(c.fractions, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    # most important first: the 4 region patches go in step 1; least first: they go in the last step only
    torch.testing.assert_close(c.most_first, torch.stack([p0] + [p_empty] * 4, dim=1))
    torch.testing.assert_close(c.least_first, torch.stack([p0] * 4 + [p_empty], dim=1))
    torch.testing.assert_close(c.most_first_auc, 0.125 * p0 + 0.875 * p_empty)
    assert c.target.tolist() == [0] * 4

    chance = random_perturbation_curves(model, x, GRID, target=0, steps=8, seed=0)
    fine = perturbation_curves(model, x, _true_map(), target=0, steps=8)
    assert (fine.most_first_auc < chance.most_first_auc).all()
    assert (fine.least_first_auc > chance.least_first_auc).all()


@pytest.mark.parametrize("baseline", ["zero", "mean"])
def test_curves_start_at_the_image_and_end_at_the_baseline_on_a_vit(baseline):
    model = make_vit("vit")
    x = input_for("vit", batch=3)
    maps = attention_maps(model, x, methods=("relevance",))
    c = perturbation_curves(model, x, maps.relevance[:, -1], steps=5, baseline=baseline)
    assert torch.equal(c.target, maps.logits.argmax(-1))  # default target: the prediction
    fill = torch.zeros_like(x) if baseline == "zero" else x.mean(dim=(-2, -1), keepdim=True).expand_as(x)
    with torch.no_grad():
        start = model(x).softmax(-1).gather(1, c.target[:, None])[:, 0]
        end = model(fill).softmax(-1).gather(1, c.target[:, None])[:, 0]
    for curve in (c.most_first, c.least_first):
        assert curve.shape == (3, 6) and curve.dtype == torch.float32
        torch.testing.assert_close(curve[:, 0], start, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(curve[:, -1], end, atol=1e-5, rtol=1e-4)
        assert ((curve >= 0) & (curve <= 1)).all()
    for auc, curve in ((c.most_first_auc, c.most_first), (c.least_first_auc, c.least_first)):
        assert auc.shape == (3,) and ((auc >= 0) & (auc <= 1)).all()
        np.testing.assert_allclose(auc.numpy(), np.trapezoid(curve.numpy(), c.fractions.numpy()), rtol=1e-6)


def test_every_perturbed_image_keeps_or_replaces_whole_patches_in_few_forwards():
    model = RegionClassifier()
    x = _images(batch=3)
    ranking = torch.arange(16.0).flip(0).reshape(1, *GRID).expand(3, -1, -1)  # patch 0 most important
    perturbation_curves(model, x, ranking, target=1, steps=16, baseline="mean", batch_size=40)
    assert [len(s) for s in model.seen] == [40, 40, 16]  # 3 images x 2 orders x 16 steps (ends shared) = 96
    fill = x.mean(dim=(-2, -1), keepdim=True)

    def removed_patches(image, i):
        """Patches of `image` that are image i's fill colour, or None if some patch is neither kept nor filled."""
        removed = []
        for patch in range(16):
            rows, cols = slice(4 * (patch // 4), 4 * (patch // 4) + 4), slice(4 * (patch % 4), 4 * (patch % 4) + 4)
            if torch.equal(image[:, rows, cols], fill[i].expand(-1, 4, 4)):
                removed.append(patch)
            elif not torch.equal(image[:, rows, cols], x[i, :, rows, cols]):
                return None
        return tuple(removed)

    found = []
    for image in torch.cat(model.seen):
        matches = [(i, removed_patches(image, i)) for i in range(3)]
        matches = [m for m in matches if m[1] is not None]
        assert matches, "a perturbed image is not made of whole kept or removed patches"
        found.append(matches[0])
    # one patch per step, in map order from either end; no perturbed image twice
    sets = sorted({tuple(range(k)) for k in range(17)} | {tuple(range(16 - k, 16)) for k in range(17)})
    assert sorted(found) == sorted((i, r) for i in range(3) for r in sets)


def test_mode_restored_inference_mode_and_no_grads_written():
    model = make_vit("vit", drop_rate=0.3)
    model.train()
    model.blocks[0].eval()
    for p in model.parameters():
        p.grad = None
    x = input_for("vit", batch=2)
    maps = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        a = perturbation_curves(model, x, maps, target=1, steps=3)
    b = perturbation_curves(model, x, maps, target=torch.tensor([1, 1]), steps=3, batch_size=1)
    torch.testing.assert_close(a.most_first, b.most_first)  # eval mode: dropout off; batching changes nothing
    assert model.training and not model.blocks[0].training and model.blocks[1].training
    assert all(p.grad is None for p in model.parameters())


def test_random_baseline_is_seeded_and_leaves_the_global_rng_alone():
    model = RegionClassifier()
    x = _images()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = random_perturbation_curves(model, x, GRID, target=0, steps=4, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    b = random_perturbation_curves(model, x, GRID, target=0, steps=4, seed=7)
    c = random_perturbation_curves(model, x, GRID, target=0, steps=4, seed=8)
    assert torch.equal(a.most_first, b.most_first) and not torch.equal(a.most_first, c.most_first)


def test_pointing_game_known_values_and_reference():
    masks = torch.zeros(4, 16, 16, dtype=torch.bool)
    masks[:, 2:10, 0:12] = True  # covers patch rows partly: shares 0.5 / 1 / 0.5 per patch row
    uniform = torch.ones(4, *GRID)
    torch.testing.assert_close(pointing_game(uniform, masks), masks.float().mean(dim=(1, 2)))
    inside = torch.zeros(4, *GRID)
    inside[:, 1, :3] = torch.rand(4, 3) + 0.1  # only patches fully inside the mask
    torch.testing.assert_close(pointing_game(inside, masks), torch.ones(4))
    outside = torch.zeros(4, *GRID)
    outside[:, 3, 3] = 1.0
    assert pointing_game(outside, masks).tolist() == [0.0] * 4
    maps = torch.rand(4, *GRID, generator=torch.Generator().manual_seed(0))
    soft = torch.rand(4, 18, 17, generator=torch.Generator().manual_seed(1))  # not multiples of the grid
    np.testing.assert_allclose(pointing_game(maps, soft).numpy(), reference.pointing_game(maps, soft), rtol=1e-5)
    assert pointing_game(torch.zeros(1, *GRID), masks[:1]).tolist() == [0.0]


def test_jaccard_hand_computed_case():
    # 16 x 16 images in a 4 x 4 grid of 4 x 4 pixel patches. The mask covers rows 0-5 and columns 0-9: patch row 0
    # fully, patch row 1 at half its rows (counted: >= half), patch column 2 at half its columns (counted), patch
    # row 1 x column 2 at a quarter (not counted). Object patches: (0,0) (0,1) (0,2) (1,0) (1,1) = 5 patches.
    masks = torch.zeros(1, 16, 16, dtype=torch.bool)
    masks[:, 0:6, 0:10] = True
    assert (pixels_to_patches(masks, GRID)[0] >= 0.5).sum() == 5
    # the map: 0.3 on (0,0), 0.2 on (3,3), 0.15 on (0,1), 0.35 / 13 elsewhere. Largest first: 0.3 + 0.2 = 0.5 <
    # 0.6, + 0.15 = 0.65 >= 0.6: the set is {(0,0), (3,3), (0,1)}; intersection 2, union 5 + 3 - 2 = 6 -> 1/3.
    m = torch.full((1, 4, 4), 0.35 / 13)
    m[0, 0, 0], m[0, 3, 3], m[0, 0, 1] = 0.3, 0.2, 0.15
    chosen = top_mass_patches(m)[0]
    assert sorted(map(tuple, chosen.nonzero().tolist())) == [(0, 0), (0, 1), (3, 3)]
    assert jaccard_index(m, masks).tolist() == pytest.approx([1 / 3])
    assert jaccard_index(10 * m, masks.float()).tolist() == pytest.approx([1 / 3])  # scale-free, soft masks too
    # the object's 5 patches holding 0.13 each (0.52 < 0.6 before the fifth, 0.65 after): exactly the object, 1
    on_object = torch.full((1, 4, 4), 0.35 / 11)
    on_object[0, 0, :3], on_object[0, 1, :2] = 0.13, 0.13
    assert jaccard_index(on_object, masks).tolist() == [1.0]
    assert jaccard_index(torch.zeros(1, 4, 4), masks).tolist() == [0.0]  # no mass: nothing chosen
    # a uniform map keeps ceil(0.6 * 16) = 10 patches, the first in patch order: 5 on the object, 10 -> 5 / 10
    assert top_mass_patches(torch.ones(1, 4, 4)).sum() == 10
    assert jaccard_index(torch.ones(1, 4, 4), masks).tolist() == pytest.approx([0.5])
    with pytest.raises(ValueError, match="mass"):
        top_mass_patches(m, mass=0.0)
    with pytest.raises(ValueError, match="non-negative"):
        jaccard_index(-m, masks)
    with pytest.raises(ValueError, match="same B"):
        jaccard_index(m, masks.expand(2, -1, -1))


def test_patch_pixel_mapping():
    patch = torch.rand(2, 3, 5, generator=torch.Generator().manual_seed(0)) > 0.5
    pixels = patches_to_pixels(patch, (13, 22))  # ph = 4, pw = 4, one border row and two border columns
    assert pixels.shape == (2, 13, 22) and pixels.dtype == torch.bool
    assert torch.equal(pixels[1, 4:8, 8:12], patch[1, 1, 2].expand(4, 4))
    assert not pixels[:, 12:, :].any() and not pixels[:, :, 20:].any()
    assert torch.equal(pixels_to_patches(pixels, (3, 5)), patch.float())


def test_clear_errors():
    model = RegionClassifier()
    x = _images(batch=2)
    m = _true_map(batch=2)
    with pytest.raises(ValueError, match="steps"):
        perturbation_curves(model, x, m, steps=0)
    with pytest.raises(ValueError, match="baseline"):
        perturbation_curves(model, x, m, baseline="blur")
    with pytest.raises(ValueError, match=r"\(B, gh, gw\)"):
        perturbation_curves(model, x, m[None])
    with pytest.raises(ValueError, match="NaN"):
        perturbation_curves(model, x, torch.full_like(m, float("nan")))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        perturbation_curves(model, x, m, target=3)
    with pytest.raises(ValueError, match="does not fit"):
        perturbation_curves(model, x[..., :3], m)
    with pytest.raises(ValueError, match="logits"):
        perturbation_curves(nn.Identity(), x, m)
    with pytest.raises(ValueError, match="non-negative"):
        pointing_game(-m, torch.ones(2, 16, 16))
    with pytest.raises(ValueError, match="same B"):
        pointing_game(m, torch.ones(3, 16, 16))
