r"""Does a map depend on the model? The model-randomisation sanity check of Adebayo et al. (2018).

A saliency method explains a model only if its map changes when the model's learned weights are replaced by random
ones. :func:`sanity_check` re-initialises the transformer blocks of a **copy** of the model — cascading from the top
block down (the last block, then the last two, ..., then every block) and, independently, one block at a time —
recomputes each method's final map on the same images after every step, and measures how much of the trained
model's map survives with the Spearman rank correlation (:func:`spearman`). A correlation that stays near 1 while
blocks are randomised means the map shows the image (or the method's own bias), not what the model learned.

The randomised blocks are drawn with the family's own initialisation
(:meth:`~lightning_attn.backends.base.Backend.reinitialise`: timm's ViT init for timm models, each module's
``reset_parameters()`` otherwise), block :math:`i` under ``torch.manual_seed(seed + i)`` in a forked RNG, so both
orders draw the same random weights for a block, and the global RNG and the user's model stay as they were.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .backends import Backend, backend_for
from .maps import DEFAULT_METHODS, GRADIENT_METHODS, Target, _check_images, attention_maps
from .render import DEFAULT_COLOUR_RANGE, make_grid, overlay, peak_notes, with_colour_bar

__all__ = [
    "KINDS",
    "SanityCheck",
    "average_ranks",
    "randomisable_blocks",
    "randomise_blocks",
    "sanity_check",
    "spearman",
]

#: The two orders of randomisation: ``"cascading"`` (top block, top two, ..., all) and ``"independent"`` (one each).
KINDS = ("cascading", "independent")


def average_ranks(values: Tensor) -> Tensor:
    """Ranks 1..P of each row of a (B, P) tensor, ties sharing the mean of the ranks they span: float64.

    Example::

        >>> average_ranks(torch.tensor([[0.5, 0.1, 0.5, 0.9]])).tolist()
        [[2.5, 1.0, 2.5, 4.0]]
    """
    if values.dim() != 2:
        raise ValueError(f"`values` must be (B, P), got {tuple(values.shape)}")
    b, p = values.shape
    order = values.argsort(dim=1, stable=True)
    ordered = values.gather(1, order)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    group = starts.long().cumsum(dim=1) - 1  # which run of equal values each sorted position is in
    position = torch.arange(1, p + 1, dtype=torch.float64, device=values.device).expand(b, p)
    first = torch.full((b, p), float(p + 1), dtype=torch.float64, device=values.device)
    first = first.scatter_reduce(1, group, position, reduce="amin")
    last = torch.zeros((b, p), dtype=torch.float64, device=values.device).scatter_reduce(
        1, group, position, reduce="amax"
    )
    mean_rank = (first.gather(1, group) + last.gather(1, group)) / 2
    return torch.empty_like(mean_rank).scatter_(1, order, mean_rank)


def spearman(a: Tensor, b: Tensor) -> Tensor:
    r"""Spearman rank correlation between each pair of maps: (B, ...) and (B, ...) -> (B,) float64.

    The Pearson correlation of the maps' :func:`average_ranks` (ties get the mean of their ranks), so 1 when the
    two order the patches alike, -1 when reversed, 0 when unrelated. NaN where either map is constant (its ranks
    have no spread: the correlation is undefined).

    Example::

        >>> a, b = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]]), torch.tensor([[10.0, 20.0, 15.0], [1.0, 2.0, 3.0]])
        >>> spearman(a, b)
        tensor([0.5000,    nan], dtype=torch.float64)
    """
    if a.shape != b.shape or a.dim() < 2:
        raise ValueError(f"expected two (B, ...) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    ra, rb = average_ranks(a.flatten(1)), average_ranks(b.flatten(1).to(a.device))
    ra, rb = ra - ra.mean(dim=1, keepdim=True), rb - rb.mean(dim=1, keepdim=True)
    norm = (ra.square().sum(dim=1) * rb.square().sum(dim=1)).sqrt()
    out = (ra * rb).sum(dim=1) / norm
    return torch.where(norm > 0, out, torch.full_like(out, math.nan))


def _forked_rng(block: nn.Module) -> AbstractContextManager[Any]:
    """The global RNG (CPU, and the CUDA devices holding ``block``) restored on exit."""
    devices = sorted({p.device.index or 0 for p in block.parameters() if p.device.type == "cuda"})
    return torch.random.fork_rng(devices=devices)


def randomisable_blocks(backend: Backend) -> list[tuple[str, nn.Module]]:
    """The model's blocks (:meth:`~lightning_attn.backends.base.Backend.blocks`); a ``ValueError`` when it has
    none."""
    blocks = backend.blocks()
    if not blocks:
        raise ValueError(
            f"{type(backend.model).__name__} has no transformer blocks to randomise (no attention layers): the "
            "sanity check needs a ViT with at least one block"
        )
    return blocks


def randomise_blocks(model: nn.Module, blocks: Sequence[int], seed: int = 0) -> list[str]:
    """Re-initialise blocks ``blocks`` (indices into :meth:`~lightning_attn.backends.base.Backend.blocks`) of
    ``model`` **in place**, block ``i`` under ``torch.manual_seed(seed + i)`` with the family's initialisation
    (:meth:`~lightning_attn.backends.base.Backend.reinitialise`). The global RNG is left as it was. Pass a copy
    (:func:`sanity_check` does).

    Returns:
        the names of the blocks' parameters that no initialisation re-drew (they kept their values).

    Example::

        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)
        >>> before = vit.blocks[1].attn.qkv.weight.clone()
        >>> randomise_blocks(vit, [1]), torch.equal(before, vit.blocks[1].attn.qkv.weight)
        ([], False)
    """
    backend = backend_for(model)
    found = randomisable_blocks(backend)
    bad = [i for i in blocks if not 0 <= i < len(found)]
    if bad:
        raise ValueError(f"blocks {bad} out of range: {type(backend.model).__name__} has {len(found)} blocks")
    kept: list[str] = []
    for index in blocks:
        name, block = found[index]
        before = {n: p.detach().clone() for n, p in block.named_parameters()}
        with _forked_rng(block), torch.no_grad():
            torch.manual_seed(seed + index)
            backend.reinitialise(block)
        kept += [f"{name}.{n}" for n, p in block.named_parameters() if torch.equal(p, before[n]) and _random(before[n])]
    return kept


def _random(value: Tensor) -> bool:
    """Whether an unchanged parameter can only have been skipped: an initialisation that fills a constant (norm
    weights of 1, biases of 0) gives a constant back."""
    return value.numel() > 1 and bool((value != value.flatten()[0]).any())


@dataclass
class SanityCheck:
    """Result of :func:`sanity_check`.

    Attributes:
        methods: the methods checked.
        blocks: qualified names of the model's blocks, in forward order.
        cascading: per method, the Spearman correlation (mean over images) between the trained model's final map
            and the map after randomising the top block, the top two, ..., every block: one value per block.
        independent: per method, the same after randomising one block alone, the top block first; empty when
            not asked.
        maps: per method, (B, 1 + L, gh, gw) float32 on the CPU: the trained model's final map, then the map after
            each cascading step.
        target: (B,) class the gradient methods explained in every step; None without gradient methods or for a
            callable target.
        kept: parameters of the blocks that no initialisation re-drew (they kept their trained values).
    """

    methods: tuple[str, ...]
    blocks: list[str]
    cascading: dict[str, list[float]]
    independent: dict[str, list[float]] = field(default_factory=dict)
    maps: dict[str, Tensor] = field(default_factory=dict)
    target: Tensor | None = None
    kept: list[str] = field(default_factory=list)

    def step_labels(self, kind: str = "cascading") -> list[str]:
        """What each step randomised: ``"block 3"``, ``"blocks 2-3"``, ... (cascading) or ``"block 3"``,
        ``"block 2"``, ... (independent), by block index."""
        if kind not in KINDS:
            raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}")
        last = len(self.blocks) - 1
        if kind == "independent":
            return [f"block {last - k}" for k in range(len(self.blocks))]
        return ["block " + str(last) if k == 0 else f"blocks {last - k}-{last}" for k in range(len(self.blocks))]

    def to_json(self, kind: str = "cascading") -> dict[str, list[float | None]]:
        """``{method: [correlation per step]}`` with undefined correlations (NaN) as None, for JSON."""
        values = self.cascading if kind == "cascading" else self.independent
        return {m: [None if math.isnan(v) else v for v in values[m]] for m in values}

    def table(self) -> str:
        """The correlations as a Markdown table, one row per method and order, one column per step."""
        columns = [f"{k + 1} from the top" for k in range(len(self.blocks))]
        lines = ["| method | order | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
        for method in self.methods:
            for kind in KINDS:
                values = getattr(self, kind).get(method)
                if values:
                    cells = " | ".join("—" if math.isnan(v) else f"{v:.3f}" for v in values)
                    lines.append(f"| {method} | {kind} | {cells} |")
        return "\n".join(lines)

    def scalars(self, prefix: str = "attention") -> dict[str, float]:
        """The correlations as scalar tags: ``<prefix>_sanity/<method>/top_XX`` after randomising the top ``XX``
        blocks (cascading) and ``<prefix>_sanity_independent/<method>/block_XX`` after randomising block ``XX``
        alone. NaN where undefined."""
        out: dict[str, float] = {}
        count = len(self.blocks)
        for method in self.methods:
            for k, value in enumerate(self.cascading.get(method, [])):
                out[f"{prefix}_sanity/{method}/top_{k + 1:02d}"] = value
            for k, value in enumerate(self.independent.get(method, [])):
                out[f"{prefix}_sanity_independent/{method}/block_{count - 1 - k:02d}"] = value
        return out

    def picture(
        self,
        display: Tensor,
        tile_size: int = 96,
        cmap: str = "jet",
        alpha: float = 0.5,
        images: Sequence[int] | None = None,
        scale: str = "relative",
        colour_range: float = DEFAULT_COLOUR_RANGE,
    ) -> tuple[np.ndarray, list[str]]:
        """The paper's figure: per image, one row per method — the image, the trained model's final map, then the
        map after each cascading step, on the monitor's colour scale with its colour bar underneath. Returns the
        (H, W, 3) uint8 grid and its row captions.

        Args:
            display: (B, 3, H, W) the images as pixels in [0, 1] (:func:`~lightning_attn.render.to_display`).
            tile_size: pixels on the long side of each tile.
            cmap: matplotlib colormap name.
            alpha: weight of the heatmap in [0, 1].
            images: which images to draw (indices); default all.
            scale: ``"relative"`` or ``"per_map"`` (:data:`~lightning_attn.render.SCALES`).
            colour_range: ``R`` of the relative scale.
        """
        chosen = list(range(display.shape[0])) if images is None else list(images)
        shown = display.float().cpu()[chosen].repeat_interleave(len(self.methods), dim=0)  # (B * M, 3, H, W)
        stacked = torch.stack([self.maps[m][chosen] for m in self.methods], dim=1).flatten(0, 1)  # (B * M, 1 + L, ..)
        tiles = overlay(shown, stacked, tile_size, cmap, alpha, scale, colour_range)
        rows = [f"#{i} {m}" for i in chosen for m in self.methods]
        header = ["image", "trained", *(f"rand. {s.split(' ', 1)[1]}" for s in self.step_labels())]
        notes = peak_notes(stacked) if scale == "per_map" else None
        grid = make_grid(tiles, header, rows, notes=notes)
        return with_colour_bar(grid, cmap, scale, colour_range), rows


def _final_maps(maps: Any, methods: Sequence[str]) -> dict[str, Tensor]:
    return {m: maps[m][:, -1].detach().float().cpu() for m in methods}


def _mean(values: Tensor) -> float:
    """Mean over images, of those whose correlation is defined; NaN when none is."""
    defined = values[~values.isnan()]
    return float(defined.mean()) if defined.numel() else math.nan


def sanity_check(
    model: nn.Module,
    images: Tensor,
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    target: Target = None,
    independent: bool = True,
    seed: int = 0,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    query: str = "auto",
    memory_budget: int | None = None,
) -> SanityCheck:
    """Cascading (and independent) model randomisation: how much of each method's final map survives when the
    model's blocks are replaced by randomly initialised ones (Adebayo et al. 2018).

    Works on a deep copy of the model (made once per order; the copy's parameters do not require grad): ``model``
    itself is not touched, bitwise, nor is the global RNG. Every step runs :func:`~lightning_attn.attention_maps`
    with the same options on the same images; the gradient methods explain the same class in every step (the
    trained model's prediction unless ``target`` says otherwise), so only the weights change. Cost: 1 + L passes
    (cascading), L more with ``independent``.

    Args:
        model: a supported ViT (see :func:`lightning_attn.supported_models`).
        images: (B, C, H, W) preprocessed for the model.
        methods: the methods to check (see :data:`lightning_attn.METHODS`).
        target: what the gradient methods explain, as in :func:`~lightning_attn.attention_maps`.
        independent: also randomise each block alone (on a fresh copy each time).
        seed: block ``i`` is drawn under ``torch.manual_seed(seed + i)``.
        head_fusion: as in :func:`~lightning_attn.attention_maps`.
        discard_ratio: as in :func:`~lightning_attn.attention_maps`.
        query: as in :func:`~lightning_attn.attention_maps`.
        memory_budget: as in :func:`~lightning_attn.attention_maps`.

    Raises:
        ValueError: the model is not supported or has no blocks to randomise, or the images do not fit it.

    Example::

        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3)
        >>> check = sanity_check(vit, torch.randn(2, 3, 32, 32), methods=("rollout",))
        >>> check.blocks, check.step_labels(), len(check.cascading["rollout"]), tuple(check.maps["rollout"].shape)
        (['blocks.0', 'blocks.1', 'blocks.2'], ['block 2', 'blocks 1-2', 'blocks 0-2'], 3, (2, 4, 4, 4))
    """
    backend: Backend = backend_for(model)
    _check_images(backend, images)
    blocks = randomisable_blocks(backend)
    options: dict[str, Any] = dict(
        methods=tuple(methods),
        head_fusion=head_fusion,
        discard_ratio=discard_ratio,
        query=query,
        memory_budget=memory_budget,
    )
    trained = attention_maps(backend.model, images, target=target, **options)
    if target is None and any(m in GRADIENT_METHODS for m in methods):
        target = trained.target  # the same class in every step: only the weights change
    original = _final_maps(trained, methods)
    del trained
    count = len(blocks)
    order = list(range(count - 1, -1, -1))  # the top block first

    def maps_of(copy_: nn.Module) -> dict[str, Tensor]:
        return _final_maps(attention_maps(copy_, images, target=target, **options), methods)

    def fresh_copy() -> nn.Module:
        twin = copy.deepcopy(backend.model)
        twin.requires_grad_(False)  # the gradient methods differentiate with respect to the attention only
        return twin

    cascading: dict[str, list[float]] = {m: [] for m in methods}
    steps: dict[str, list[Tensor]] = {m: [original[m]] for m in methods}
    kept: list[str] = []
    twin = fresh_copy()
    for index in order:
        kept += randomise_blocks(twin, [index], seed)
        now = maps_of(twin)
        for m in methods:
            cascading[m].append(_mean(spearman(original[m], now[m])))
            steps[m].append(now[m])
    del twin
    alone: dict[str, list[float]] = {}
    if independent:
        alone = {m: [] for m in methods}
        for index in order:
            twin = fresh_copy()
            randomise_blocks(twin, [index], seed)
            now = maps_of(twin)
            del twin
            for m in methods:
                alone[m].append(_mean(spearman(original[m], now[m])))
    return SanityCheck(
        methods=tuple(methods),
        blocks=[name for name, _ in blocks],
        cascading=cascading,
        independent=alone,
        maps={m: torch.stack(steps[m], dim=1) for m in methods},
        target=target.detach().cpu() if isinstance(target, Tensor) else None,
        kept=kept,
    )
