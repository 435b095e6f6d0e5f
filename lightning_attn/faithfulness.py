r"""Does a map point at what the model uses? Deletion curves and an energy-based pointing game, as pure functions.

**Perturbation (deletion) curves** (Petsiuk et al., 2018; the positive / negative perturbation of Chefer et al.,
2021): patches are removed from the image in order of the map's importance and the softmax probability of the
target class is read after each step. Removing the most important patches first (positive perturbation) should
make the probability fall fast, so a faithful map has a *low* area under that curve; removing the least important
first (negative perturbation) should leave it high, so a faithful map has a *high* area there. A random order
(:func:`random_perturbation_curves`) is the chance level to beat.

**Pointing game, energy-based** (:func:`pointing_game`): the share of a map's mass that falls inside an object mask.

**Jaccard index of the map's mass** (:func:`jaccard_index`): DINO's localisation score (Caron et al., 2021): the
patches holding 60 % of the map's mass (:func:`top_mass_patches`) against the object's patches, by intersection
over union.

Patch :math:`(i, j)` of a (gh, gw) grid on an (H, W) image covers rows ``i*ph:(i+1)*ph`` and columns
``j*pw:(j+1)*pw`` with ``ph = H // gh`` and ``pw = W // gw`` (:func:`patches_to_pixels`,
:func:`pixels_to_patches`); border pixels past ``gh*ph`` rows or ``gw*pw`` columns belong to no patch, as in timm's
patch embedding, which drops them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .backends import backend_for
from .maps import Target, _check_target, _ModeGuard, _model_device_dtype, _resolve_target, callable_score

__all__ = [
    "BASELINES",
    "PerturbationCurves",
    "jaccard_index",
    "patches_to_pixels",
    "perturbation_curves",
    "pixels_to_patches",
    "pointing_game",
    "random_perturbation_curves",
    "top_mass_patches",
]

#: What a removed patch's pixels become: ``"zero"`` (0 in the model's input space: the dataset mean colour for
#: mean/std-normalised inputs) or ``"mean"`` (each image's own per-channel mean colour).
BASELINES = ("zero", "mean")


@dataclass
class PerturbationCurves:
    """Result of :func:`perturbation_curves`; float32 tensors on the model's device.

    Attributes:
        fractions: (S+1,) share of the patches removed at each step, from 0 to 1.
        most_first: (B, S+1) target-class probability with the most important patches removed first (positive
            perturbation: lower is more faithful).
        least_first: (B, S+1) the same with the least important removed first (negative perturbation: higher is
            more faithful).
        most_first_auc: (B,) trapezoid area under ``most_first`` over ``fractions``, in [0, 1].
        least_first_auc: (B,) trapezoid area under ``least_first`` over ``fractions``, in [0, 1].
        target: (B,) int64 class whose probability was read; None when a callable score was read.
    """

    fractions: Tensor
    most_first: Tensor
    least_first: Tensor
    most_first_auc: Tensor
    least_first_auc: Tensor
    target: Tensor | None


def _patch_size(image_size: tuple[int, int], grid_size: tuple[int, int]) -> tuple[int, int]:
    (h, w), (gh, gw) = image_size, grid_size
    if gh < 1 or gw < 1 or h < gh or w < gw:
        raise ValueError(
            f"a ({gh}, {gw}) patch grid does not fit an image of ({h}, {w}) pixels: each patch needs at least one "
            "pixel; pass maps on the model's patch grid and images/masks at input resolution"
        )
    return h // gh, w // gw


def patches_to_pixels(patch_mask: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Spread a (B, gh, gw) patch mask over the pixels each patch covers: (B, H, W), same dtype.

    Patch (i, j) covers rows ``i*ph:(i+1)*ph`` and columns ``j*pw:(j+1)*pw`` (``ph = H // gh``, ``pw = W // gw``);
    border pixels beyond the last full patch get 0 / False.

    Example::

        >>> patches_to_pixels(torch.tensor([[[True, False]]]), (2, 5)).int().tolist()
        [[[1, 1, 0, 0, 0], [1, 1, 0, 0, 0]]]
    """
    gh, gw = patch_mask.shape[-2:]
    ph, pw = _patch_size(image_size, (gh, gw))
    pixels = patch_mask.repeat_interleave(ph, dim=-2).repeat_interleave(pw, dim=-1)
    out = patch_mask.new_zeros(*patch_mask.shape[:-2], *image_size)
    out[..., : gh * ph, : gw * pw] = pixels
    return out


def pixels_to_patches(mask: Tensor, grid_size: tuple[int, int]) -> Tensor:
    """Share of each patch's pixels inside a (B, H, W) mask: (B, gh, gw) float32 in [0, 1].

    The mean of the mask over the pixels each patch covers (the mapping of :func:`patches_to_pixels`); equal to
    adaptive average pooling when H and W are multiples of the grid.

    Example::

        >>> pixels_to_patches(torch.tensor([[[1, 0, 0, 0], [1, 1, 0, 0]]]), (1, 2)).tolist()
        [[[0.75, 0.0]]]
    """
    gh, gw = grid_size
    ph, pw = _patch_size((mask.shape[-2], mask.shape[-1]), (gh, gw))
    crop = mask[..., : gh * ph, : gw * pw].float()
    return crop.reshape(*mask.shape[:-2], gh, ph, gw, pw).mean(dim=(-3, -1))


def pointing_game(maps: Tensor, masks: Tensor, eps: float = 1e-12) -> Tensor:
    r"""Energy-based pointing game: the share of each map's mass that lies inside the object mask.

    .. math:: \text{score} = \frac{\sum_{ij} m_{ij}\, c_{ij}}{\sum_{ij} m_{ij}}

    where :math:`c_{ij}` is the share of patch :math:`(i, j)`'s pixels inside the mask (:func:`pixels_to_patches`).
    A map that is non-zero only on patches fully inside the mask scores 1; a uniform map scores the mask's share
    of the (patch-covered) image, which a map has to beat to say it points at the object.

    Args:
        maps: (B, gh, gw) non-negative maps on the patch grid (e.g. ``attention_maps(...).rollout[:, -1]``).
        masks: (B, H, W) object masks at image resolution, bool or float in [0, 1] (soft masks are weights).
        eps: floor of the mass; a map with no mass scores 0.

    Returns:
        (B,) float32 in [0, 1].

    Example::

        >>> masks = torch.zeros(2, 8, 8, dtype=torch.bool)
        >>> masks[:, :4, :4] = True  # the top-left quarter
        >>> maps = torch.stack([torch.ones(4, 4), torch.eye(4)])
        >>> pointing_game(maps, masks).tolist()  # uniform: the mask's area share; diagonal: 2 of 4 patches inside
        [0.25, 0.5]
    """
    _check_maps_masks(maps, masks)
    maps = maps.float()
    if (maps < 0).any() or not torch.isfinite(maps).all():
        raise ValueError("`maps` must be finite and non-negative: the score is a share of mass (clamp them at 0)")
    inside = pixels_to_patches(masks.to(maps.device), (maps.shape[-2], maps.shape[-1]))
    if (inside < 0).any() or (inside > 1).any():
        raise ValueError("`masks` must be bool or hold values in [0, 1]")
    mass = maps.sum(dim=(-2, -1))
    return (maps * inside).sum(dim=(-2, -1)) / mass.clamp_min(eps)


def _check_maps_masks(maps: Tensor, masks: Tensor) -> None:
    if maps.dim() != 3 or masks.dim() != 3 or maps.shape[0] != masks.shape[0]:
        raise ValueError(
            f"expected maps (B, gh, gw) and masks (B, H, W) with the same B, got {tuple(maps.shape)} and "
            f"{tuple(masks.shape)}; pick one layer of per-layer maps (e.g. `maps.rollout[:, -1]`)"
        )


def top_mass_patches(maps: Tensor, mass: float = 0.6) -> Tensor:
    """The smallest set of patches holding at least ``mass`` of each map's total, as a (B, gh, gw) bool mask.

    Patches are taken largest first until their sum reaches ``mass`` of the map's total (DINO's thresholding of
    attention maps, Caron et al. 2021, which keeps 60 %); equal values go in patch order (row-major), so the set is
    reproducible. A map with no mass selects nothing.

    Example::

        >>> top_mass_patches(torch.tensor([[[0.5, 0.1], [0.3, 0.1]]])).tolist()  # 0.5 + 0.3 >= 0.6
        [[[True, False], [True, False]]]
    """
    if not 0 < mass <= 1:
        raise ValueError(f"`mass` must be in (0, 1] (the share of the map to keep), got {mass!r}")
    if maps.dim() != 3:
        raise ValueError(f"`maps` must be (B, gh, gw), got {tuple(maps.shape)}")
    flat = maps.flatten(1).float()
    if (flat < 0).any() or not torch.isfinite(flat).all():
        raise ValueError("`maps` must be finite and non-negative: the set holds a share of the mass (clamp them at 0)")
    values, order = torch.sort(flat, dim=1, descending=True, stable=True)
    before = values.cumsum(dim=1) - values  # mass of the larger patches, taken before this one
    keep = (before < mass * flat.sum(dim=1, keepdim=True)) & (values > 0)
    chosen = torch.zeros_like(keep).scatter_(1, order, keep)
    return chosen.reshape(maps.shape)


def jaccard_index(maps: Tensor, masks: Tensor, mass: float = 0.6) -> Tensor:
    r"""Jaccard index between the patches holding ``mass`` of each map (:func:`top_mass_patches`) and the object.

    .. math:: J = \frac{|A \cap O|}{|A \cup O|}

    where :math:`A` is the smallest set of patches holding 60 % of the map's mass (DINO's threshold) and :math:`O`
    the object's patches: those at least half of whose pixels lie inside the mask (:func:`pixels_to_patches`
    :math:`\geq 0.5`). 1 when the map's mass sits on exactly the object's patches; a map with no mass, or an
    empty union, scores 0.

    Args:
        maps: (B, gh, gw) non-negative maps on the patch grid (e.g. ``attention_maps(...).rollout[:, -1]``).
        masks: (B, H, W) object masks at image resolution, bool or float in [0, 1].
        mass: the share of each map's mass the chosen patches hold, in (0, 1].

    Returns:
        (B,) float32 in [0, 1].

    Example::

        >>> masks = torch.zeros(1, 8, 8, dtype=torch.bool)
        >>> masks[:, :4, :4] = True  # the top-left quarter: patch (0, 0) of a 2 x 2 grid
        >>> jaccard_index(torch.tensor([[[0.7, 0.1], [0.1, 0.1]]]), masks).tolist()
        [1.0]
        >>> jaccard_index(torch.tensor([[[0.4, 0.4], [0.1, 0.1]]]), masks).tolist()  # 2 patches, 1 on the object
        [0.5]
    """
    _check_maps_masks(maps, masks)
    chosen = top_mass_patches(maps, mass)
    inside = pixels_to_patches(masks.to(maps.device), (maps.shape[-2], maps.shape[-1]))
    if (inside < 0).any() or (inside > 1).any():
        raise ValueError("`masks` must be bool or hold values in [0, 1]")
    obj = inside >= 0.5
    both = (chosen & obj).sum(dim=(-2, -1)).float()
    either = (chosen | obj).sum(dim=(-2, -1)).float()
    return both / either.clamp_min(1)


def _check_curve_args(images: Tensor, maps: Tensor, steps: int, baseline: str, batch_size: int) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"`images` must be a (B, C, H, W) tensor, got {shape}")
    if maps.dim() != 3 or maps.shape[0] != images.shape[0]:
        raise ValueError(
            f"`maps` must be (B, gh, gw) with B = {images.shape[0]} images, got {tuple(maps.shape)}; pick one layer "
            "of per-layer maps (e.g. `maps.relevance[:, -1]`)"
        )
    if not torch.isfinite(maps).all():
        raise ValueError("`maps` contain NaN or inf: the removal order would be arbitrary")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`steps` must be an int >= 1 (the curve has steps + 1 points), got {steps!r}")
    if baseline not in BASELINES:
        raise ValueError(f"`baseline` must be one of {BASELINES}, got {baseline!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an int >= 1 (images per forward), got {batch_size!r}")


def _removal_counts(num_patches: int, steps: int) -> list[int]:
    # round(s * P / steps), halves up, in integers: exactly 0 and P at the ends
    return [(2 * s * num_patches + steps) // (2 * steps) for s in range(steps + 1)]


def _ranks(maps: Tensor, most_first: bool) -> Tensor:
    """(B, gh, gw) -> (B, P): the step at which each patch goes, 0 = first; ties go in patch order."""
    flat = maps.flatten(1).float()
    order = torch.argsort(-flat if most_first else flat, dim=1, stable=True)
    return torch.argsort(order, dim=1)


def perturbation_curves(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    target: Target = None,
    *,
    steps: int = 10,
    baseline: str = "zero",
    batch_size: int = 64,
) -> PerturbationCurves:
    r"""Target-class probability as patches are removed most important first and least important first.

    At step :math:`s = 0..S` the :math:`\operatorname{round}(sP/S)` patches (of :math:`P`) ranked first by the map
    are replaced by the baseline and the softmax probability of the target class is read; the area under each
    curve is the trapezoid rule over the share removed, :math:`\sum_s (x_{s+1}-x_s)(p_s+p_{s+1})/2`. Step 0 is the
    unperturbed image and step :math:`S` the all-baseline one, shared by both orders. All perturbed images go
    through the model in forwards of at most ``batch_size``, under ``no_grad`` with every submodule in eval mode
    (each put back afterwards); works inside ``inference_mode``.

    Args:
        model: a supported ViT (timm, Hugging Face transformers, torchvision: its class logits are read from its
            output), or any classifier mapping (B, C, H, W) to (B, num_classes) logits.
        images: (B, C, H, W) as the model takes them (normalised).
        maps: (B, gh, gw) importance of each patch (e.g. ``attention_maps(...).relevance[:, -1]``); ties are
            removed in patch order.
        target: class to read: None for each image's predicted class, an int, or a (B,) integer tensor; or a
            callable ``output -> (B,) score`` for models without class logits, whose score is read as it is
            (not a probability: the areas are then in the score's units).
        steps: :math:`S`, the number of removal steps; the default 10 removes 0%, 10%, ..., 100% of the patches.
        baseline: ``"zero"`` (0 in input space: the dataset mean colour for mean/std-normalised images, the
            default, as in Chefer et al.'s perturbation test) or ``"mean"`` (each image's own mean colour per
            channel, for inputs that are not normalised).
        batch_size: most images per forward; there are B * 2S of them (the two ends are shared by both orders).

    Returns:
        :class:`PerturbationCurves` with (B, S+1) curves and (B,) areas.

    Example::

        >>> class Left(torch.nn.Module):  # class 0's logit is the brightness of the left half
        ...     def forward(self, x):
        ...         left = x[..., : x.shape[-1] // 2].mean(dim=(1, 2, 3))
        ...         return torch.stack([left, torch.zeros_like(left)], dim=1)
        >>> images = torch.ones(1, 3, 8, 8)
        >>> true_map = torch.tensor([[[1.0, 1.0, 0.0, 0.0]] * 4])  # 4 x 4 patches, left half important
        >>> c = perturbation_curves(Left(), images, true_map, target=0, steps=2)
        >>> c.fractions.tolist(), [round(p, 3) for p in c.most_first[0].tolist()]
        ([0.0, 0.5, 1.0], [0.731, 0.5, 0.5])
        >>> bool(c.most_first_auc < c.least_first_auc)
        True
    """
    _check_curve_args(images, maps, steps, baseline, batch_size)
    _check_target(target, images.shape[0])
    b, _, h, w = images.shape
    grid = (maps.shape[-2], maps.shape[-1])
    _patch_size((h, w), grid)
    device, dtype = _model_device_dtype(model)
    forward, read_logits = _runner(model)
    scored = callable(target) and not isinstance(target, Tensor)
    num_patches = grid[0] * grid[1]
    counts = _removal_counts(num_patches, steps)

    with torch.no_grad():
        images = images.to(device=device, dtype=dtype if dtype is not None else images.dtype)
        maps = maps.to(device)
        ranks = {order: _ranks(maps, order) for order in (True, False)}
        # Step 0 and step S remove the same patches whatever the order: run them once.
        removed = [ranks[True] < 0, ranks[True] < num_patches]
        for order in (True, False):
            removed += [ranks[order] < counts[s] for s in range(1, steps)]
        removed_rows = torch.cat(removed).reshape(-1, *grid)  # row j * B + i: job j, image i
        sample = torch.arange(removed_rows.shape[0], device=device) % b
        fill = torch.zeros_like(images[:, :, :1, :1]) if baseline == "zero" else images.mean(dim=(-2, -1), keepdim=True)

        probs = []
        with _ModeGuard(model):
            for start in range(0, removed_rows.shape[0], batch_size):
                rows = sample[start : start + batch_size]
                pixels = patches_to_pixels(removed_rows[start : start + batch_size], (h, w))[:, None]
                output = forward(torch.where(pixels, fill[rows], images[rows]))
                if scored:
                    probs.append(callable_score(target, output, len(rows)).float()[:, None])  # type: ignore[arg-type]  # scored
                    continue
                logits = read_logits(output)
                if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != len(rows):
                    shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
                    raise ValueError(
                        f"the model must return (B, num_classes) logits to read class probabilities, got {shape}; "
                        "for a model without class logits pass `target` as a callable `output -> (B,) score`"
                    )
                probs.append(logits.float().softmax(dim=-1))
        probs_all = torch.cat(probs)
        if scored:
            chosen = None
            read = probs_all.reshape(len(removed), b).T
        else:
            chosen = _resolve_target(target, probs_all[:b])  # type: ignore[arg-type]  # not scored; argmax of the unperturbed images' probabilities
            read = probs_all.gather(1, chosen.repeat(len(removed))[:, None]).reshape(len(removed), b).T
        first, last, middle = read[:, :1], read[:, 1:2], read[:, 2:]
        most_first = torch.cat([first, middle[:, : steps - 1], last], dim=1)
        least_first = torch.cat([first, middle[:, steps - 1 :], last], dim=1)
        fractions = torch.tensor(counts, dtype=torch.float32, device=device) / num_patches
        return PerturbationCurves(
            fractions=fractions,
            most_first=most_first,
            least_first=least_first,
            most_first_auc=torch.trapezoid(most_first, fractions, dim=-1),
            least_first_auc=torch.trapezoid(least_first, fractions, dim=-1),
            target=chosen,
        )


def _runner(model: nn.Module) -> tuple[Callable[[Tensor], Any], Callable[[Any], Tensor | None]]:
    """How to call ``model`` and read its class logits: its backend's way, or a plain call for any classifier."""
    try:
        backend = backend_for(model)
    except ValueError:
        return model, lambda output: output
    return backend.forward, lambda output: backend.class_logits(output)


def random_perturbation_curves(
    model: nn.Module,
    images: Tensor,
    grid_size: tuple[int, int],
    target: Target = None,
    *,
    steps: int = 10,
    baseline: str = "zero",
    batch_size: int = 64,
    seed: int = 0,
) -> PerturbationCurves:
    """:func:`perturbation_curves` of a random map: the chance level a method's areas should beat.

    Each image gets its own random removal order from a ``torch.Generator`` seeded with ``seed`` (the global RNG
    is left alone), so the same seed gives the same orders; ``least_first`` is then simply the reverse order.

    Args:
        grid_size: (gh, gw) patch grid of the maps being compared (``AttentionMaps.grid_size``).
        seed: seed of the removal orders.

    ``model``, ``images``, ``target``, ``steps``, ``baseline`` and ``batch_size`` are as for
    :func:`perturbation_curves`.

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))
        >>> c = random_perturbation_curves(model, torch.randn(2, 3, 8, 8), (4, 4), steps=4, seed=1)
        >>> tuple(c.most_first.shape), tuple(c.most_first_auc.shape)
        ((2, 5), (2,))
    """
    gh, gw = grid_size
    generator = torch.Generator().manual_seed(seed)
    # uniform values have no ties (almost surely): sorting them gives a uniformly random permutation
    maps = torch.rand(images.shape[0], gh, gw, generator=generator)
    return perturbation_curves(model, images, maps, target, steps=steps, baseline=baseline, batch_size=batch_size)
