"""Per-layer attention maps of a batch of images on the patch grid: raw query rows, cumulative rollout and the
gradient-weighted rollout and relevance.

:func:`attention_maps` runs one forward inside :func:`~lightning_attn.capture.record_attention`. For ``"raw"`` and
``"rollout"`` alone it reduces each layer's attention as its hook fires under ``no_grad``: heads are fused, the
query row is taken and the rollout advanced, so working memory stays O(B * N^2) whatever the depth and head count;
the L x heads x N x N matrices are never kept. The gradient methods (``"grad_rollout"``, ``"relevance"``) need
every layer's attention and its gradient, so they keep the matrices and the autograd graph of one forward, which
then serves all requested methods.
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import windows
from .backends import Backend, backend_for
from .backends.base import CPU_CHUNK_BYTES, Chunk, capture_budget
from .capture import record_attention, stream_chunks, supports_head_streaming
from .diagnostics import head_query_rows, mean_attention_distance
from .layout import TokenLayout, query_row, query_vector
from .names import METHODS
from .rollout import (
    check_discard_ratio,
    check_head_fusion,
    discard_weakest,
    grad_rollout,
    relevance_propagation,
    residual_transition,
)

__all__ = [
    "AGGREGATIONS",
    "DEFAULT_METHODS",
    "GRADIENT_METHODS",
    "METHODS",
    "AttentionMaps",
    "attention_maps",
    "query_row",
]

#: Methods that need the gradient of a class score with respect to each layer's attention (a backward pass).
GRADIENT_METHODS = ("grad_rollout", "relevance")
#: What :func:`attention_maps` computes when not told: the two that need no backward pass.
DEFAULT_METHODS = ("raw", "rollout")
AGGREGATIONS = ("mean", "max", "min")

#: What a gradient method explains: None (each image's predicted class), a class index for all images, a (B,)
#: class per image, or a callable ``output -> (B,)`` score of the model's output (an embedding similarity, say).
Target = int | Tensor | Callable[[Any], Tensor] | None


@dataclass
class AttentionMaps:
    """Result of :func:`attention_maps`; every map is float32 on the model's device.

    Attributes:
        raw: (B, L, gh, gw) query row of each layer's head-fused attention, patch tokens only; None if not asked.
        rollout: (B, L, gh, gw) the same row of the cumulative rollout after each layer; None if not asked.
        grad_rollout: (B, L, gh, gw) the same row of the gradient-weighted rollout
            (:func:`~lightning_attn.rollout.grad_rollout`); None if not asked.
        relevance: (B, L, gh, gw) the same row of the gradient-weighted relevance
            (:func:`~lightning_attn.rollout.relevance_propagation`); None if not asked.
        grid_size: (gh, gw) patch grid of the input.
        num_prefix_tokens: tokens dropped from the maps (class, distillation, registers).
        query: ``"cls"``, ``"cls_dist"`` (class and distillation tokens) or ``"mean"`` (the mean over patch-token
            rows).
        output: the model's whole output (a tensor, a tuple or a Hugging Face ``ModelOutput``).
        layout: the token layout the maps were read with.
        logits: (B, num_classes) float32 class logits of the images; None for a model without a classifier.
        layer_names: qualified names of the attention layers, in forward order.
        matrices: full head-fused (B, N, N) attention of the layers named in ``keep_matrices``, by layer index.
        target: (B,) int64 class whose score the gradient methods explain, per image; None when none ran or the
            target was a callable score.
        prefix_attention: (B, L, num_prefix_tokens) what the raw query row gives to each prefix token (class,
            distillation, registers); None without ``"raw"``.
        head_maps: per-head query rows (B, heads, gh, gw) of the layers named in ``head_layers``, by layer index.
        attention_distance: (B, L, heads) mean attention distance in pixels
            (:func:`~lightning_attn.diagnostics.mean_attention_distance`) when ``attention_distance=True``; NaN
            for heads a layer does not have (Swin's later stages have more heads than its first).
        head_matrices: full per-head (B, heads, N, N) attention of the layers named in ``keep_head_matrices``, by
            layer index (the interactive report's heads view of a clicked patch).
    """

    raw: Tensor | None
    rollout: Tensor | None
    grid_size: tuple[int, int]
    num_prefix_tokens: int
    query: str
    logits: Tensor | None
    layer_names: list[str]
    matrices: dict[int, Tensor] = field(default_factory=dict)
    grad_rollout: Tensor | None = None
    relevance: Tensor | None = None
    target: Tensor | None = None
    prefix_attention: Tensor | None = None
    head_maps: dict[int, Tensor] = field(default_factory=dict)
    attention_distance: Tensor | None = None
    output: Any = None
    layout: TokenLayout | None = None
    head_matrices: dict[int, Tensor] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    def __getitem__(self, method: str) -> Tensor:
        maps = getattr(self, method, None) if method in METHODS else None
        if maps is None:
            raise KeyError(
                f"no {method!r} maps: computed methods are {[m for m in METHODS if getattr(self, m) is not None]}"
            )
        return maps

    def aggregate(self, reduction: str = "mean", method: str = "raw") -> Tensor:
        """Reduce a method's per-layer maps over layers by mean, max or min: (B, gh, gw)."""
        if reduction not in AGGREGATIONS:
            raise ValueError(f"`reduction` must be one of {AGGREGATIONS}, got {reduction!r}")
        maps = self[method]
        if reduction == "mean":
            return maps.mean(dim=1)
        return maps.amax(dim=1) if reduction == "max" else maps.amin(dim=1)

    @property
    def aggregates(self) -> dict[str, Tensor]:
        """Mean, max and min over layers of the raw maps, each (B, gh, gw), as in the reference write-ups."""
        return {r: self.aggregate(r, "raw") for r in AGGREGATIONS}


def _check_images(backend: Backend, images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"`images` must be a (B, C, H, W) tensor, got {shape}")
    backend.check_images(images)


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype | None]:
    for p in model.parameters():
        return p.device, (p.dtype if p.is_floating_point() else None)
    return torch.device("cpu"), None


class _ModeGuard:
    """Put every submodule in eval and restore each one's own flag (frozen BatchNorms inside a training model)."""

    def __init__(self, model: nn.Module) -> None:
        # only the modules in training mode change (none, in a validation loop): setting the flag on every module
        # of a ViT took ~2 ms a pass
        self._flipped = [m for m in model.modules() if m.training]

    def __enter__(self) -> None:
        for module in self._flipped:
            module.training = False

    def __exit__(self, *exc: object) -> None:
        for module in self._flipped:
            module.training = True


class _Collected:
    """What a reducer keeps of a pass, whatever the grid: per-layer rows, distances, matrices and head maps."""

    def __init__(
        self,
        layout: TokenLayout,
        methods: Sequence[str],
        head_fusion: str,
        discard_ratio: float,
        keep_matrices: Iterable[int],
        head_layers: Iterable[int] = (),
        distance: bool = False,
        keep_head_matrices: Iterable[int] = (),
    ) -> None:
        self.layout = layout
        self._steps: list[Tensor] = []
        self.methods = methods
        self.head_fusion = head_fusion
        self.discard_ratio = discard_ratio
        self.keep = set(keep_matrices)
        self.head_layers = set(head_layers)
        self.distance = distance
        self.raw: list[Tensor] = []
        self.prefix: list[Tensor] = []
        self.rollout: list[Tensor] = []
        self.distances: list[Tensor] = []
        self.matrices: dict[int, Tensor] = {}
        self.head_maps: dict[int, Tensor] = {}
        self.keep_heads = set(keep_head_matrices)
        self.head_matrices: dict[int, Tensor] = {}

    def stack(self, rows: list[Tensor]) -> Tensor | None:
        if not rows:
            return None
        b = rows[0].shape[0]
        return torch.stack(rows, dim=1).reshape(b, len(rows), *self.layout.grid_size)


class _Reducer(_Collected):
    """Consumes each layer's attention as its hook fires, in chunks of probes and heads, and keeps only what the
    maps need."""

    def __init__(self, *args: Any, keep_steps: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # keep every layer's rollout step and take the rows at the end (see `rollout_rows`), instead of one
        # (B, N, N) @ (B, N, N) product per layer
        self.keep_steps = keep_steps
        self._product: Tensor | None = None
        self._fused: Tensor | None = None  # this layer's (B, N, N) head-fused matrix, filled chunk by chunk
        self._heads: dict[str, list[Tensor]] = {}  # per-head results of this chunk of probes, over its heads
        self._parts: dict[str, list[Tensor]] = {}  # per-head results of this layer, over its chunks of probes

    def _check_tokens(self, index: int, n: int) -> None:
        if n != self.layout.num_tokens:
            raise ValueError(
                f"attention layer {index} has {n} tokens but the layout expects {self.layout.num_tokens} "
                f"({self.layout.num_prefix_tokens} prefix + {self.layout.grid_size[0]}x{self.layout.grid_size[1]} "
                "patches): the model's patch embedding or prefix tokens differ from what was read; pass `layout=`"
            )

    def _distance(self, attention: Tensor) -> Tensor:
        patch = self.layout.patch_size or (1, 1)
        return mean_attention_distance(attention, self.layout.grid_size, self.layout.num_prefix_tokens, patch)

    def __call__(self, index: int, attention: Tensor) -> None:
        """Consume one layer's whole (B, heads, N, N) attention: one chunk holding every probe and head."""
        b, heads = attention.shape[:2]
        # float32 math even when the forward runs under bf16 autocast (the hook fires inside it)
        with torch.autocast(device_type=attention.device.type, enabled=False):
            self.chunk(index, Chunk(slice(0, b), slice(0, heads), b, heads), attention.detach().float())

    def chunk(self, index: int, chunk: Chunk, attention: Tensor) -> None:
        """Consume a chunk's (b, h, N, N) float32 attention; the layer is complete after its last chunk.

        Only what reads every head happens per chunk, while it is in the cache: the heads are fused into the
        layer's (B, N, N) matrix in place, per-head rows and distances taken; the rest, on the fused matrix, once
        the layer is complete."""
        if chunk.probes.start == 0 and chunk.heads.start == 0:
            self._check_tokens(index, attention.shape[-1])
            self._fused = attention.new_empty(chunk.num_probes, *attention.shape[-2:])
            self._parts = {}
        assert self._fused is not None
        fused = self._fused[chunk.probes]
        if chunk.heads.start == 0:
            self._heads = {}
            if self.head_fusion == "mean":
                torch.sum(attention, dim=1, out=fused)
            else:
                (torch.amax if self.head_fusion == "max" else torch.amin)(attention, dim=1, out=fused)
        elif self.head_fusion == "mean":
            fused.add_(attention.sum(dim=1))
        else:
            part = attention.amax(dim=1) if self.head_fusion == "max" else attention.amin(dim=1)
            (torch.maximum if self.head_fusion == "max" else torch.minimum)(fused, part, out=fused)
        if index in self.keep_heads:
            self._heads.setdefault("matrices", []).append(attention.clone())  # the chunk's memory is reused
        if index in self.head_layers:
            self._heads.setdefault("rows", []).append(head_query_rows(attention, self.layout))
        if self.distance:
            self._heads.setdefault("distances", []).append(self._distance(attention))
        if chunk.ends_probes:
            for name, parts in self._heads.items():  # every head of these probes: joined along the heads
                self._parts.setdefault(name, []).append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
        if chunk.ends_call:
            joined = {name: parts[0] if len(parts) == 1 else torch.cat(parts) for name, parts in self._parts.items()}
            self._parts = {}
            if "matrices" in joined:
                self.head_matrices[index] = joined["matrices"]
            if "rows" in joined:
                self.head_maps[index] = joined["rows"]
            if "distances" in joined:
                self.distances.append(joined["distances"])
            whole, self._fused = self._fused, None
            self._finish(index, whole.div_(chunk.num_heads) if self.head_fusion == "mean" else whole)

    def _finish(self, index: int, fused: Tensor) -> None:
        """Everything that needs only the head-fused (B, N, N) matrix of layer ``index``."""
        if index in self.keep:
            self.matrices[index] = fused
        if "raw" in self.methods:
            self.raw.append(query_row(fused, self.layout))
            # what the query row gives to class/distillation/register tokens, for the register diagnostics
            p = self.layout.num_prefix_tokens
            self.prefix.append(query_vector(fused, self.layout)[:, :p].clone())  # not a view of the (B, N, N) matrix
        if "rollout" in self.methods:
            # in place unless the matrix is kept: two fewer (B, N, N) tensors a layer
            step = residual_transition(discard_weakest(fused, self.discard_ratio), in_place=index not in self.keep)
            if self.keep_steps:
                self._steps.append(step)
            else:
                self._product = step if self._product is None else step @ self._product
                self.rollout.append(query_row(self._product, self.layout))

    def rollout_rows(self) -> list[Tensor]:
        """The query row of the rollout after every layer. From kept steps: row l is ``w^T S_l S_{l-1} ... S_0``
        (``w`` the query's weights over tokens), taken right to left as a few row vectors times each matrix, so
        L (L - 1) / 2 vector-matrix products of N^2 instead of L products of N^3 (a tenth of the time at L = 12)."""
        if not self._steps:
            return self.rollout
        pending: Tensor | None = None  # (B, k, N): the rows of layers l .. L-1, multiplied down to layer l
        for step in reversed(self._steps):
            row = query_vector(step, self.layout)[:, None]
            pending = row if pending is None else torch.cat([row, pending @ step], dim=1)
        self._steps = []
        assert pending is not None
        p = self.layout.num_prefix_tokens
        self.rollout = [pending[:, l, p:] for l in range(pending.shape[1])]
        return self.rollout


class _WindowReducer(_Collected):
    """The reduction of a windowed model (Swin): each block's (B * windows, heads, w, w) weights as its hook fires,
    read as the whole-image matrix on the finest patch grid without building it (:mod:`lightning_attn.windows`);
    the fused windows of every block are kept (O(B N w) each) for the rollout rows at the end."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        assert self.layout.windows is not None, "a windowed layout"
        self.windows = self.layout.windows
        self._chunks: list[Tensor] = []

    def chunk(self, index: int, chunk: Chunk, attention: Tensor) -> None:
        """Consume a chunk of heads' (B * windows, h, w, w) weights, every window at once (windowed layers are
        streamed without chunks of probes); the block is complete after its last head."""
        assert chunk.probes == slice(0, chunk.num_probes), "a windowed block's chunks hold every window"
        self._chunks = [] if chunk.heads.start == 0 else self._chunks
        self._chunks.append(attention)
        if chunk.ends_call:
            whole, self._chunks = torch.cat(self._chunks, dim=1), []
            self(index, whole)

    def __call__(self, index: int, attention: Tensor) -> None:
        """Consume block ``index``'s (B * windows, heads, w, w) weights."""
        if index >= len(self.windows):
            raise ValueError(
                f"attention layer {index} ran but the layout describes {len(self.windows)} windowed blocks: pass "
                "a layout read from this model"
            )
        grid, fine = self.windows[index], self.layout.grid_size
        windows.check_grid(grid, fine)
        with torch.no_grad(), torch.autocast(device_type=attention.device.type, enabled=False):
            blocks = windows.place_windows(attention.detach(), grid)  # (B, windows, heads, w, w)
            b, heads = blocks.shape[0], blocks.shape[2]
            first = windows.mean_query(b, fine, blocks.device)
            if self.distance:
                self.distances.append(windows.window_distance(blocks, grid, self.layout.patch_size or (1, 1)))
            if index in self.head_layers:
                per_head = blocks.transpose(1, 2).flatten(0, 1)  # heads folded into the batch
                rows = windows.rows_times(first.repeat_interleave(heads, dim=0), per_head, grid, fine)
                self.head_maps[index] = rows.reshape(b, heads, *fine)
            if self.head_fusion == "mean":
                fused = blocks.mean(dim=2)
            else:
                fused = blocks.amax(dim=2) if self.head_fusion == "max" else blocks.amin(dim=2)
            if index in self.keep:
                self.matrices[index] = windows.whole_image(fused, grid, fine)
            if index in self.keep_heads:
                per_head = windows.whole_image(blocks.transpose(1, 2).flatten(0, 1), grid, fine)
                self.head_matrices[index] = per_head.reshape(b, heads, *per_head.shape[1:])
            if "raw" in self.methods:
                self.raw.append(windows.rows_times(first, fused, grid, fine)[:, 0])
                self.prefix.append(fused.new_zeros(b, 0))
            if "rollout" in self.methods:
                self._steps.append(residual_transition(windows.discard_in_windows(fused, self.discard_ratio)))

    def rollout_rows(self) -> list[Tensor]:
        """The rollout's query row after every block, (B, N) each."""
        if self._steps:
            first = windows.mean_query(self._steps[0].shape[0], self.layout.grid_size, self._steps[0].device)
            chained = windows.chain_rows(self._steps, self.layout, first)
            self.rollout = [chained[:, l].flatten(1) for l in range(chained.shape[1])]
            self._steps = []
        return self.rollout


def _check_layer_indices(name: str, layers: Iterable[int], num_layers: int) -> list[int]:
    layers = [int(i) for i in layers]
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"`{name}` {bad} out of range: the model has {num_layers} attention layers")
    return layers


def _check_target(target: object, batch: int) -> None:
    if target is None or callable(target) and not isinstance(target, Tensor):
        return
    if isinstance(target, Tensor):
        integral = not (target.is_floating_point() or target.is_complex() or target.dtype == torch.bool)
        if integral and tuple(target.shape) in ((), (batch,)):
            return
        shape = f"{target.dtype} tensor of shape {tuple(target.shape)}"
    elif isinstance(target, numbers.Integral) and not isinstance(target, bool):
        return
    else:
        shape = type(target).__name__
    raise ValueError(
        f"`target` must be None (explain the predicted class), an int class index, an integer tensor of shape "
        f"({batch},) with one class per image, or a callable `output -> (B,) score`; got {shape}. Pass labels as "
        "`labels.long()`."
    )


def _resolve_target(target: int | Tensor | None, logits: Tensor | None) -> Tensor:
    """The (B,) int64 class per image whose logit the gradient methods differentiate."""
    if logits is None or logits.dim() != 2:
        got = "no class logits" if logits is None else f"logits of shape {tuple(logits.shape)}"
        raise ValueError(
            f"a class index target needs (B, num_classes) class logits but the model gives {got}: pass `target` "
            "as a callable `output -> (B,) score` (e.g. an embedding similarity), give the model a classification "
            "head, or use methods ('raw', 'rollout')"
        )
    b, num_classes = logits.shape
    if target is None:
        chosen = logits.detach().argmax(dim=-1)
    elif isinstance(target, Tensor):
        chosen = target.to(device=logits.device, dtype=torch.long).expand(b).clone()
    else:
        chosen = torch.full((b,), int(target), dtype=torch.long, device=logits.device)
    if ((chosen < 0) | (chosen >= num_classes)).any():
        raise ValueError(f"`target` must hold class indices in [0, {num_classes}), got {chosen.tolist()}")
    return chosen


def callable_score(target: Callable[[Any], Tensor], output: Any, batch: int) -> Tensor:
    """``target(output)``, checked to be one score per image: (B,)."""
    score = target(output)
    if not isinstance(score, Tensor) or score.shape != (batch,):
        shape = tuple(score.shape) if isinstance(score, Tensor) else type(score).__name__
        raise ValueError(f"the `target` callable must return one score per image, shape ({batch},); got {shape}")
    return score


def target_scores(target: Target, output: Any, logits: Tensor | None, batch: int) -> tuple[Tensor, Tensor | None]:
    """Each image's score to explain, (B,), and the class index behind it ((B,) int64, None for a callable)."""
    if callable(target) and not isinstance(target, Tensor):
        return callable_score(target, output, batch), None
    chosen = _resolve_target(target, logits)
    assert logits is not None
    return logits.gather(1, chosen[:, None])[:, 0], chosen


def _query_rows(matrices: Tensor, layout: TokenLayout) -> Tensor:
    """(B, L, N, N) -> (B, L, gh, gw) query rows over patch columns."""
    b, num_layers = matrices.shape[:2]
    rows = torch.stack([query_row(matrices[:, l], layout) for l in range(num_layers)], dim=1)
    return rows.reshape(b, num_layers, *layout.grid_size)


def _stack_heads(per_layer: list[Tensor]) -> Tensor:
    """Per-layer (B, heads) values as (B, L, heads); NaN pads the layers with fewer heads (Swin's heads grow by
    stage)."""
    most = max(v.shape[-1] for v in per_layer)
    padded = [torch.nn.functional.pad(v, (0, most - v.shape[-1]), value=float("nan")) for v in per_layer]
    return torch.stack(padded, dim=1)


def _gradient_rows(
    method: str, attentions: list[Tensor], gradients: list[Tensor], layout: TokenLayout, discard_ratio: float
) -> Tensor:
    """(B, L, gh, gw) query rows of ``"grad_rollout"`` or ``"relevance"``."""
    if layout.windows is not None:
        return windows.window_gradient_rows(method, attentions, gradients, layout, discard_ratio)
    if method == "grad_rollout":
        return _query_rows(grad_rollout(attentions, gradients, discard_ratio), layout)
    return _query_rows(relevance_propagation(attentions, gradients), layout)


def _check_calls(calls: int, num_modules: int) -> None:
    if calls != num_modules:
        raise RuntimeError(
            f"{num_modules} attention layers were hooked but {calls} attention matrices were seen: "
            "the model skips or repeats layers in its forward; use record_attention() directly"
        )


def _gradient_pass(
    backend: Backend,
    images: Tensor,
    modules: list[tuple[str, nn.Module]],
    target: Target,
) -> tuple[Any, list[Tensor], list[Tensor], Tensor | None]:
    """One forward keeping every layer's attention in the graph, and d(target score)/d(attention) of each layer.

    Returns ``(output, attentions, gradients, target class or None)``, all detached, layers in forward order.
    """
    # Lightning validates under no_grad (fit) or inference_mode (trainer.validate): switch autograd back on here,
    # and clone the images inside so they are normal tensors, not inference tensors that autograd refuses.
    with torch.inference_mode(False), torch.enable_grad(), record_attention(backend.model, modules, store=True) as rec:
        # The images require grad so the graph reaches every attention even when all parameters are frozen.
        x = images.detach().clone().requires_grad_(True)
        output = backend.forward(x)
        _check_calls(rec.num_calls, len(modules))
        # Images do not interact in an eval-mode ViT, so the gradient of the batch sum is each image's own.
        scores, chosen = target_scores(target, output, backend.class_logits(output), x.shape[0])
        attentions = rec.attentions
        # autograd.grad with respect to the recorded tensors themselves: each gradient belongs to its own layer
        # (no backward-hook ordering), and no parameter's .grad is written.
        wanted = [i for i, a in enumerate(attentions) if a.requires_grad]
        found = torch.autograd.grad(scores.sum(), [attentions[i] for i in wanted], allow_unused=True) if wanted else ()
        gradients = [torch.zeros_like(a) for a in attentions]
        for i, g in zip(wanted, found):
            if g is not None:
                gradients[i] = g
    return _detach(output), [a.detach() for a in attentions], [g.detach() for g in gradients], chosen


def _detach(output: Any) -> Any:
    if isinstance(output, Tensor):
        return output.detach()
    if isinstance(output, tuple) and not hasattr(output, "keys"):
        return type(output)(_detach(o) for o in output)
    if hasattr(output, "keys"):  # a Hugging Face ModelOutput (an OrderedDict)
        for key in list(output.keys()):
            output[key] = _detach(output[key])
    return output


def attention_maps(
    model: nn.Module,
    images: Tensor,
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    query: str = "auto",
    keep_matrices: Iterable[int] = (),
    layout: TokenLayout | None = None,
    target: Target = None,
    head_layers: Iterable[int] = (),
    attention_distance: bool = False,
    memory_budget: int | None = None,
    keep_head_matrices: Iterable[int] = (),
) -> AttentionMaps:
    """Per-layer attention maps of ``images`` on the patch grid, in one forward (plus one backward for the
    gradient methods).

    Runs on the model's device with every submodule in eval mode (each put back in the mode it was in), computes
    in float32 whatever the input or autocast dtype, and leaves no hook behind. ``"raw"`` and ``"rollout"`` alone
    run under ``no_grad`` and reduce each layer as it runs (O(B * N^2) memory). ``"grad_rollout"`` and
    ``"relevance"`` switch autograd on locally (also inside ``no_grad`` or ``inference_mode``), keep every layer's
    attention and take the gradient of each image's target score with respect to them with ``torch.autograd.grad``:
    parameters' ``.grad`` stay as they were and frozen parameters are fine. That single forward then also serves
    ``"raw"`` and ``"rollout"``, with the same results as the streaming path.

    Args:
        model: a ViT of a supported family: timm, Hugging Face transformers (a ``CLIPModel`` runs its image tower)
            or torchvision; with ``layout`` given, any module holding recordable attention layers.
        images: (B, C, H, W) preprocessed for the model; moved to the model's device and parameter dtype.
        methods: any of ``"raw"``, ``"rollout"``, ``"grad_rollout"`` and ``"relevance"``.
        head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads for ``"raw"`` and ``"rollout"`` (the gradient
            methods always take the mean of the gradient-weighted heads).
        discard_ratio: share in [0, 1) of each fused matrix's smallest entries zeroed before ``"rollout"`` and
            ``"grad_rollout"``.
        query: ``"auto"`` (class token when the head reads it, else patch mean), ``"cls"`` or ``"mean"``.
        keep_matrices: layer indices whose full head-fused (B, N, N) attention to keep in ``.matrices``.
        layout: override the token layout read from the model (for models no backend recognises).
        target: what the gradient methods explain: None for each image's predicted class (argmax of the logits),
            an int for all images, a (B,) integer tensor (e.g. the labels), or a callable taking the model's output
            (for a ``CLIPModel``, the (B, D) image embedding) and returning a (B,) score, for models without class
            logits. Ignored by the others.
        head_layers: layer indices whose per-head query rows to keep in ``.head_maps`` (DINO-style head views).
        attention_distance: compute each layer's per-head mean attention distance (``.attention_distance``).
        memory_budget: bytes of float32 attention one layer may hold at once in the no-gradient pass: the whole
            (B, heads, N, N) softmax when it fits (fastest), else a few heads at a time, down to one; on a CPU,
            also the bound for keeping every layer's (B, N, N) rollout step to the end. None: 256 MiB, on a GPU at
            most half its free memory; 0: one head at a time and nothing kept (least memory, flat in the depth).
        keep_head_matrices: layer indices whose full per-head (B, heads, N, N) attention to keep in
            ``.head_matrices``.

    Example::

        >>> import timm, torch
        >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3)
        >>> maps = attention_maps(vit, torch.randn(2, 3, 32, 32))
        >>> tuple(maps.raw.shape), tuple(maps.rollout.shape), maps.grid_size, maps.query
        ((2, 3, 4, 4), (2, 3, 4, 4), (4, 4), 'cls')
        >>> maps = attention_maps(vit, torch.randn(2, 3, 32, 32), methods=("relevance",), target=torch.tensor([3, 7]))
        >>> tuple(maps["relevance"].shape), maps.target.tolist(), maps.raw
        ((2, 3, 4, 4), [3, 7], None)
    """
    if isinstance(methods, str):
        raise ValueError(f"`methods` must be a sequence of names from {METHODS}, e.g. ({methods!r},); got {methods!r}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"`methods` must be a non-empty subset of {METHODS}, got {tuple(methods)!r}")
    check_head_fusion(head_fusion)
    check_discard_ratio(discard_ratio)
    backend = backend_for(model, layout)
    _check_images(backend, images)
    _check_target(target, images.shape[0])
    modules = backend.attention_layers()
    if layout is None:
        layout = backend.layout((images.shape[-2], images.shape[-1]), query)
    keep = _check_layer_indices("keep_matrices", keep_matrices, len(modules))
    heads = _check_layer_indices("head_layers", head_layers, len(modules))
    keep_heads = _check_layer_indices("keep_head_matrices", keep_head_matrices, len(modules))

    device, dtype = _model_device_dtype(backend.model)
    # a windowed block's query attends the w tokens of its window, not every token
    keys = max(g.window[0] * g.window[1] for g in layout.windows) if layout.windows else layout.num_tokens
    per_pass = _probes_per_pass(device, modules[0][1], layout.num_tokens, keys)
    if images.shape[0] > per_pass:
        # On a CPU, a few probes at a time: past a few MiB per layer the attention math leaves the caches, and even
        # a plain forward of 64 probes took 1.2x the time of four forwards of 16 (benchmarks/bench_monitor.py)
        options: dict[str, Any] = dict(
            methods=methods,
            head_fusion=head_fusion,
            discard_ratio=discard_ratio,
            keep_matrices=keep,
            layout=layout,
            head_layers=heads,
            attention_distance=attention_distance,
            memory_budget=memory_budget,
            keep_head_matrices=keep_heads,
        )
        parts = [
            attention_maps(model, images[i : i + per_pass], target=_target_slice(target, i, i + per_pass), **options)
            for i in range(0, images.shape[0], per_pass)
        ]
        return _concatenate(parts)
    images = images.to(device=device, dtype=dtype if dtype is not None else images.dtype)
    # On a CPU the rollout rows come cheaper from every layer's step kept to the end, when they fit in the budget;
    # on a GPU the per-layer product costs next to nothing and the memory stays flat in the depth.
    budget = capture_budget(memory_budget, device)
    n = layout.num_tokens
    keep_steps = device.type == "cpu" and len(modules) * images.shape[0] * n * n * 4 <= budget
    reducer: _Reducer | _WindowReducer
    shared = (layout, methods, head_fusion, discard_ratio, keep, heads, attention_distance, keep_heads)
    if layout.windows is not None:  # windowed, hierarchical (Swin): the backend's WindowGrids say what each block saw
        reducer = _WindowReducer(*shared)
    else:
        reducer = _Reducer(*shared, keep_steps=keep_steps)
    gradient_maps: dict[str, Tensor] = {}
    chosen = None
    if any(m in GRADIENT_METHODS for m in methods):
        check_explainable(backend, target)
        with _ModeGuard(backend.model):
            output, attentions, gradients, chosen = _gradient_pass(backend, images, modules, target)
        with torch.no_grad(), torch.autocast(device_type=images.device.type, enabled=False):
            # the same reducer as the streaming path, fed the stored matrices: identical raw/rollout maps
            for index, attention in enumerate(attentions):
                reducer(index, attention)
            for method in (m for m in GRADIENT_METHODS if m in methods):
                gradient_maps[method] = _gradient_rows(method, attentions, gradients, layout, discard_ratio)
        del attentions, gradients
    else:
        layers = [m for _, m in modules]
        if all(supports_head_streaming(m) for m in layers):
            # the model keeps its fused kernel; the weights are rebuilt from its q and k in chunks of heads that
            # fit in the memory budget (usually all at once)
            # on a CPU a few probes at a time, so that each chunk is reduced while it is in the cache (a windowed
            # block's windows are small already, and its reducer places them all at once)
            cache = CPU_CHUNK_BYTES if device.type == "cpu" and layout.windows is None else None
            layers_seen: list[int] = []

            def on_chunk(index: int, chunk: Chunk, attention: Tensor) -> None:
                if chunk.ends_call:
                    layers_seen.append(index)
                reducer.chunk(index, chunk, attention)

            with (
                _ModeGuard(backend.model),
                torch.no_grad(),
                stream_chunks(backend.model, layers, on_chunk, budget, cache),
            ):
                output = backend.forward(images)
            _check_calls(len(layers_seen), len(modules))
        else:
            with (
                _ModeGuard(backend.model),
                torch.no_grad(),
                record_attention(backend.model, modules, on_attention=reducer, store=False) as rec,
            ):
                output = backend.forward(images)
            _check_calls(rec.num_calls, len(modules))
    logits = backend.class_logits(output)
    return AttentionMaps(
        raw=reducer.stack(reducer.raw),
        rollout=reducer.stack(reducer.rollout_rows()),
        grid_size=layout.grid_size,
        num_prefix_tokens=layout.num_prefix_tokens,
        query=layout.query,
        logits=logits.float() if isinstance(logits, Tensor) else None,
        layer_names=[name for name, _ in modules],
        matrices=reducer.matrices,
        prefix_attention=torch.stack(reducer.prefix, dim=1) if reducer.prefix else None,
        head_maps=reducer.head_maps,
        attention_distance=_stack_heads(reducer.distances) if reducer.distances else None,
        grad_rollout=gradient_maps.get("grad_rollout"),
        relevance=gradient_maps.get("relevance"),
        target=chosen,
        output=output,
        layout=layout,
        head_matrices=reducer.head_matrices,
    )


#: On a CPU, the probes of one forward hold at most this many float32 attention weights per layer (heads x N x N
#: each): 16 probes of ViT-S/16 at 224 (6 heads, 197 tokens), where the probe pass measured 1.04-1.09x a plain
#: forward of the same probes, against 1.19x at 64 probes and 1.31x at 256 (benchmarks/bench_monitor.py).
CPU_ATTENTION_ENTRIES = 16 * 6 * 197 * 197


def _probes_per_pass(device: torch.device, layer: nn.Module, num_tokens: int, num_keys: int | None = None) -> int:
    """How many probes go through the model at once: all of them on an accelerator; on a CPU as many as keep a
    layer's attention within :data:`CPU_ATTENTION_ENTRIES`."""
    if device.type != "cpu":
        return 2**31
    config = getattr(layer, "config", None)
    heads = getattr(layer, "num_heads", None) or getattr(layer, "num_attention_heads", None)
    heads = heads or getattr(config, "num_attention_heads", None) or 6
    return max(1, CPU_ATTENTION_ENTRIES // (int(heads) * num_tokens * (num_keys or num_tokens)))


def _target_slice(target: Target, start: int, stop: int) -> Target:
    """The part of a per-image target that belongs to probes ``start:stop`` (an int, None or a callable as is)."""
    if isinstance(target, Tensor) and target.dim() == 1:
        return target[start:stop]
    return target


def _cat(parts: list[Any]) -> Any:
    """Outputs of the same model on consecutive probe batches, joined along the batch: tensors, tuples, lists and
    mappings (a Hugging Face ``ModelOutput``) of them; anything else is taken from the first."""
    first = parts[0]
    if isinstance(first, Tensor):
        return torch.cat(parts, dim=0) if first.dim() > 0 else first
    if isinstance(first, (tuple, list)) and not hasattr(first, "keys"):
        return type(first)(_cat(list(items)) for items in zip(*parts))
    if hasattr(first, "keys"):
        joined = copy.copy(first)
        for key in list(first.keys()):
            joined[key] = _cat([part[key] for part in parts])
        return joined
    return first


def _concatenate(parts: list[AttentionMaps]) -> AttentionMaps:
    """The maps of consecutive probe batches as one :class:`AttentionMaps`."""
    joined = copy.copy(parts[0])
    for name in (
        "raw",
        "rollout",
        "grad_rollout",
        "relevance",
        "target",
        "prefix_attention",
        "attention_distance",
        "logits",
        "output",
    ):
        values = [getattr(part, name) for part in parts]
        setattr(joined, name, None if values[0] is None else _cat(values))
    joined.matrices = {k: _cat([part.matrices[k] for part in parts]) for k in parts[0].matrices}
    joined.head_maps = {k: _cat([part.head_maps[k] for part in parts]) for k in parts[0].head_maps}
    joined.head_matrices = {k: _cat([part.head_matrices[k] for part in parts]) for k in parts[0].head_matrices}
    return joined


def check_explainable(backend: Backend, target: Target) -> None:
    """Refuse a gradient method on a model without class logits unless ``target`` is a callable score."""
    if backend.has_class_logits or (callable(target) and not isinstance(target, Tensor)):
        return
    raise ValueError(
        f"gradient methods {GRADIENT_METHODS} explain a score, but {type(backend.model).__name__} has no class "
        "logits (no classification head, e.g. timm `num_classes=0`, a Hugging Face base model or a CLIP/SigLIP "
        "tower): pass `target` as a callable `output -> (B,) score` (e.g. an embedding similarity), pass the model "
        "with its head, or use ('raw', 'rollout')"
    )
