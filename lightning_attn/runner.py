"""A probe pass without Lightning: one model, fixed probes and options in; maps, scalars and pictures out.

:class:`ProbeRunner` owns what a run of passes shares — the baseline and previous maps that drift is measured
from, the history the filmstrip and animations show, the scalar history behind the layers x steps pictures — and
turns each pass into a :class:`ProbePass`: the maps, the scalars by tag, and the panels (tag -> (H, W, 3) uint8
picture). :class:`~lightning_attn.AttentionMonitor` drives it from Lightning's hooks; the ``lightning-attn``
command drives it from files. Its :meth:`~ProbeRunner.state_dict` holds everything needed to redraw without the
model (:func:`redraw`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from .animation import GifStream
from .backends import Backend, backend_for
from .faithfulness import PerturbationCurves, perturbation_curves, random_perturbation_curves
from .html_report import report_html, report_iframe, row_passes
from .layout import TokenLayout
from .maps import GRADIENT_METHODS, AttentionMaps, attention_maps, check_explainable
from .options import ProbeOptions
from .probes import MANY_PROBES, Probes, display_stats
from .render import (
    DEFAULT_COLOUR_RANGE,
    layer_step_image,
    make_grid,
    matrix_tiles,
    overlay,
    peak_notes,
    tile_images,
    to_display,
    with_colour_bar,
)
from .report import layer_series, scalar_layout, scalar_report, tag_prefix
from .sanity import SanityCheck, sanity_check

if TYPE_CHECKING:
    from .writers import AttentionWriter

__all__ = [
    "FORMAT_VERSION",
    "Panel",
    "ProbePass",
    "ProbeRunner",
    "overlay_grid",
    "redraw",
    "resolve_layers",
    "row_labels",
]

#: Version of :meth:`ProbeRunner.state_dict`'s layout; a newer reader converts older states.
FORMAT_VERSION = 2
#: Probes that get an evolution animation: a GIF each, so a few hundred probes must not mean hundreds of files.
MAX_ANIMATED = 16
#: With ``report_layers=None``, every layer's head-fused token x token attention is kept for the interactive report
#: when it takes at most this many bytes per pass (float16): 4 layers x 8 probes x 65^2 tokens (the example) take
#: 0.27 MB; 12 layers x 16 probes x 197^2 (ViT-S/16 at 224) would take 15 MB, so none is kept there unless asked.
REPORT_MATRIX_BYTES = 4 * 2**20
#: Passes whose token x token attention stays in :attr:`ProbeRunner.report_history` (and so in the checkpoint):
#: between half of it and all of it, every k-th pass (k doubling as the run grows) plus the latest, so that a long
#: run holds at most this many passes' matrices, evenly spread: 1000 passes cost what 32 do (the maps of every
#: method and layer, a few KB a pass, are kept for every pass).
REPORT_ROW_PASSES = 32


@dataclass
class Panel:
    """One picture of a pass: ``tag`` (e.g. ``"attention/rollout"``), an (H, W, 3) uint8 ``image`` and the caption
    of each row of probes (empty for pictures that are not rows of probes)."""

    tag: str
    image: np.ndarray
    rows: list[str] = field(default_factory=list)


@dataclass
class ProbePass:
    """What one probe pass produced."""

    step: int
    maps: AttentionMaps
    scalars: dict[str, float]
    panels: list[Panel]
    curves: dict[str, PerturbationCurves] = field(default_factory=dict)

    def write(self, writer: AttentionWriter, texts: Sequence[tuple[str, str]] = ()) -> None:
        """Hand the pass to ``writer``: the panels (grids with their rows), the chart layout and scalars,
        ``texts`` (``(tag, message)`` pairs, e.g. alerts), then a flush (the end of the pass)."""
        for panel in self.panels:
            if panel.rows:
                writer.add_grid(panel.tag, panel.image, self.step, panel.rows)
            else:
                writer.add_image(panel.tag, panel.image, self.step)
        if self.scalars:
            writer.add_layout(scalar_layout(self.scalars))  # writers add only charts they have not drawn yet
            writer.add_scalars(self.scalars, self.step)
        for tag, text in texts:
            writer.add_text(tag, text, self.step)
        writer.flush()


def resolve_layers(requested: Sequence[int] | None, num_layers: int, name: str) -> list[int]:
    """Layer indices (negative counts from the end) as 0..L-1; all of them for None."""
    if requested is None:
        return list(range(num_layers))
    bad = [layer for layer in requested if not -num_layers <= layer < num_layers]
    if bad:
        raise ValueError(f"`{name}` {bad} out of range: the model has {num_layers} attention layers")
    return [layer % num_layers for layer in requested]


def row_labels(
    count: int,
    labels: Tensor | None,
    maps: AttentionMaps,
    method: str = "raw",
    class_names: Sequence[str] | None = None,
    start: int = 0,
    predictions: bool = True,
) -> list[str]:
    """Row captions: ``#i y<label> p<prediction>``; for class-targeted maps ``#i t<class explained>``. With
    ``class_names``, ``#i y=<name> p=<name>`` and ``#i t=<name>``. Probes are numbered from ``start``; the
    prediction is left out when ``predictions`` is False (it would mean nothing, see :class:`ProbeRunner`)."""

    def name(index: int) -> str:
        if class_names is None:
            return str(index)
        return "=" + (class_names[index] if 0 <= index < len(class_names) else str(index))

    if method in GRADIENT_METHODS and maps.target is not None:
        return [f"#{start + i} t{name(t)}" for i, t in enumerate(maps.target.tolist())]  # the class explained
    predicted = maps.logits.argmax(-1).tolist() if maps.logits is not None and predictions else None
    known = labels.tolist() if labels is not None else None
    rows = []
    for i in range(count):
        # short enough for the strip beside a small tile: "#3 y2 p0" (probe, label, prediction)
        text = f"#{start + i}"
        if known is not None:
            text += f" y{name(known[i])}"
        if predicted is not None:
            text += f" p{name(predicted[i])}"
        rows.append(text)
    return rows


def _classifier(model: nn.Module, classes: int) -> nn.Module | None:
    """The module whose outputs are the class logits: the last linear layer with one output per class (timm's
    ``head``, Hugging Face's ``classifier``, torchvision's ``heads.head``; registered after the blocks)."""
    found = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == classes]
    return found[-1] if found else None


def _checked(
    model: nn.Module, options: ProbeOptions, layout: TokenLayout | None
) -> tuple[Backend, tuple[list[int], list[int], list[int]]]:
    """The model's backend and the ``layers``, ``matrix_layers`` and ``head_layers`` indices as 0..L-1, once the
    model and the options are checked against each other."""
    backend = backend_for(model, layout)
    # the query against the model's tokens (`cls` on a GAP ViT, `cls_dist` without a distillation token): at setup,
    # not at every pass
    backend.layout(backend.input_size() or (224, 224), options.query)
    num_layers = len(backend.attention_layers())
    indices = tuple(
        resolve_layers(getattr(options, n), num_layers, n) for n in ("layers", "matrix_layers", "head_layers")
    )
    if options.needs_class:
        check_explainable(backend, options.target)
    return backend, indices  # type: ignore[return-value]


class ProbeRunner:
    """Runs probe passes of one model on fixed probes and keeps what drift, the filmstrip and the layers x steps
    pictures need across passes.

    Args:
        model: a supported ViT (see :func:`lightning_attn.supported_models`).
        probes: the fixed images (preprocessed for the model), with optional labels and masks.
        options: what to compute and draw.
        name: prefix of every tag: ``attention`` or ``attention_<name>``.

    Raises:
        ValueError: the model is not supported, the probes do not fit it, a layer index is out of range, or a
            class-targeted method is asked of a model without class logits and no callable ``target``.

    Example::

        >>> import timm, torch
        >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)
        >>> runner = ProbeRunner(vit, Probes(torch.randn(2, 3, 32, 32)), ProbeOptions(tile_size=16))
        >>> result = runner.run(step=0)
        >>> [p.tag for p in result.panels][:3], round(result.scalars["attention_entropy/raw/layer_00"], 1) <= 1
        (['attention/raw', 'attention/rollout', 'attention/raw_aggregates'], True)
    """

    def __init__(
        self,
        model: nn.Module,
        probes: Probes,
        options: ProbeOptions,
        *,
        name: str | None = None,
        layout: TokenLayout | None = None,
        first_index: int = 0,
    ) -> None:
        self.backend, (self.layers, self.matrix_layers, self.head_layers) = _checked(model, options, layout)
        self._layout = layout
        self.first_index = first_index  # the number of the first probe on the rows (a batch of a larger set)
        self.model = self.backend.model
        self.options = options
        self.prefix = tag_prefix(name)
        self.stats = display_stats(self.model, options.mean, options.std)
        self.registers = self.backend.layout(self.backend.input_size() or (224, 224)).register_slice
        self.probes: Probes = probes
        self.backend.check_images(probes.images)
        classes = self.backend.num_classes
        if probes.labels is not None and classes is not None and int(probes.labels.max()) >= classes:
            bad = sorted({int(v) for v in probes.labels.tolist() if v >= classes})
            raise ValueError(
                f"`labels` {bad} are out of range: {type(self.model).__name__} has {classes} classes "
                f"(0..{classes - 1}); "
                "pass the class index each probe belongs to"
            )
        if options.class_names is not None and classes is not None and len(options.class_names) != classes:
            raise ValueError(
                f"`class_names` has {len(options.class_names)} names but {type(self.model).__name__} has {classes} "
                "classes: pass one name per class, in class-index order"
            )
        if len(probes) > MANY_PROBES:
            warnings.warn(
                f"{len(probes)} probes: each pass runs the model on all of them and draws every grid with one row "
                "per probe. Measured on 2 CPU cores with ViT-S/16 at 224 (benchmarks/bench_monitor.py), 256 probes "
                "took 19 s of the training loop per pass (13 s the probe pass, 6 s drawing) and added 52 MiB to "
                f"TensorBoard per pass, against 1.0 s and 3.3 MiB for 16; animations are kept for the first "
                f"{MAX_ANIMATED} only. {MANY_PROBES} or fewer is plenty to watch attention.",
                RuntimeWarning,
                stacklevel=2,
            )
        self._display: Tensor | None = None
        self._tiled: dict[int, Tensor] = {}  # the display at each tile size drawn
        self.baseline: dict[str, Tensor] | None = None
        self.previous: dict[str, Tensor] | None = None
        #: (step, final-layer map (B, gh, gw)) of every pass, for the filmstrip and the animations
        self.history: list[tuple[int, Tensor]] = []
        #: (step, scalars) of every pass, for the layers x steps pictures
        self.scalar_history: list[tuple[int, dict[str, float]]] = []
        #: draw each recorded pass's animation frames as it runs (the callback's ``gif``), not all at the end
        self.animate = False
        self._gifs: dict[str, GifStream] = {}
        self._gif_frames = 0  # passes of `history` already in `_gifs`
        #: the classifier's parameters at the baseline, and whether they have moved since (sticky)
        self._head_at_baseline: list[Tensor] | None = None
        self.head_moved = False
        self._show_predictions = True
        self.report_layers, self.report_head_layers = self._report_layers()
        #: per recorded pass, what the interactive report shows (:mod:`lightning_attn.html_report`): float16 maps
        #: of every method and layer, per-head query rows, and the token x token attention of ``report_layers``
        self.report_history: list[dict[str, Any]] = []
        self._row_stride = 1  # every how many recorded passes keep their token x token attention

    def _report_layers(self) -> tuple[list[int], list[int]]:
        """The layers whose head-fused token x token attention each pass keeps for the report, and those of them
        whose per-head attention is kept too (the ``head_layers`` among them)."""
        num_layers = len(self.backend.attention_layers())
        requested = self.options.report_layers
        layers = resolve_layers(requested, num_layers, "report_layers")
        height, width = self.probes.images.shape[-2:]
        layout = self._layout or self.backend.layout((int(height), int(width)), self.options.query)
        self._report_meta = {
            "grid_size": list(layout.grid_size),
            "num_prefix_tokens": layout.num_prefix_tokens,
            "query": layout.query,
            "num_layers": num_layers,
        }
        if requested is None:
            n = layout.num_tokens
            if num_layers * len(self.probes) * n * n * 2 > REPORT_MATRIX_BYTES:
                layers = []  # too big to keep by default: the report shows the logged maps without clicking
        return layers, [layer for layer in self.head_layers if layer in layers]

    @staticmethod
    def check_model(model: nn.Module, options: ProbeOptions, layout: TokenLayout | None = None) -> Backend:
        """The model's backend, once the model and the options are checked against each other (before probes)."""
        return _checked(model, options, layout)[0]

    # ------------------------------------------------------------------ a pass

    def _device(self) -> torch.device:
        return next((p.device for p in self.model.parameters()), torch.device("cpu"))

    def display(self) -> Tensor:
        """The probes as (B, 3, H, W) pixels in [0, 1], on the model's device."""
        device = self._device()
        if self.probes.images.device != device:
            self.probes = self.probes.to(device)
            self._display = None
        if self._display is None:
            self._display = to_display(self.probes.images.float(), *self.stats)
            self._tiled = {}
        return self._display

    def _display_at(self, tile_size: int) -> Tensor:
        """The probes resized to their tiles once, not once per grid and pass."""
        display = self.display()
        if tile_size not in self._tiled:
            self._tiled[tile_size] = tile_images(display, tile_size)
        return self._tiled[tile_size]

    def compute(
        self,
        forward_context: Callable[[], AbstractContextManager[Any]] = nullcontext,
        convert_input: Callable[[Tensor], Tensor] = lambda x: x,
    ) -> tuple[AttentionMaps, dict[str, PerturbationCurves]]:
        """The maps (and faithfulness curves) of the probes, under ``forward_context`` (e.g. a precision's)."""
        options = self.options
        self.display()  # moves the probes to the model's device
        images = convert_input(self.probes.images)
        # class indices from the labels when known; a callable score for models without class logits
        target = options.target if options.target is not None else self.probes.labels
        with forward_context():
            maps = attention_maps(
                self.model,
                images,
                methods=options.methods,
                head_fusion=options.head_fusion,
                discard_ratio=options.discard_ratio,
                query=options.query,
                keep_matrices=sorted({*self.matrix_layers, *self.report_layers}),
                target=target,
                head_layers=self.head_layers,
                attention_distance=options.diagnostics,
                layout=self._layout,
                memory_budget=options.memory_budget,
                keep_head_matrices=self.report_head_layers,
            )
        for method in options.methods:
            bad = (~torch.isfinite(maps[method])).flatten(2).any(-1).any(0)
            if bad.any():
                layers = bad.nonzero().flatten().tolist()
                raise FloatingPointError(f"{method} maps contain NaN or inf at layers {layers}; not drawn")
        curves: dict[str, PerturbationCurves] = {}
        if options.faithfulness:
            # explain the same class as the gradient methods: the label when known, else the prediction
            if target is None:
                assert maps.logits is not None, "the runner checked that the model has class logits"
                target = maps.logits.argmax(-1)
            kwargs: dict[str, Any] = dict(target=target, steps=options.faithfulness_steps)
            with forward_context():
                for method in options.methods:
                    curves[method] = perturbation_curves(self.model, images, maps[method][:, -1], **kwargs)
                curves["random"] = random_perturbation_curves(self.model, images, maps.grid_size, **kwargs)
        return maps, curves

    def run(
        self,
        step: int,
        *,
        render: bool = True,
        history_panels: bool = True,
        record: bool = True,
        forward_context: Callable[[], AbstractContextManager[Any]] = nullcontext,
        convert_input: Callable[[Tensor], Tensor] = lambda x: x,
    ) -> ProbePass:
        """One pass at ``step``: maps, scalars (drift from the baseline, the first pass, and from the previous
        one), and the panels when ``render`` (``history_panels``: also the filmstrip and layers x steps pictures).
        ``record=False`` leaves the baseline and the histories alone (a pass outside the run, e.g. ``validate``)."""
        options = self.options
        maps, curves = self.compute(forward_context, convert_input)
        self._show_predictions = self._predictions_mean_something(maps, baseline=record and self.baseline is None)
        scalars = scalar_report(
            maps,
            options.methods,
            entropy=options.log_entropy,
            baseline=self.baseline if options.diagnostics else None,
            previous=self.previous if options.diagnostics else None,
            registers=self.registers if options.diagnostics else None,
            artifact_threshold=options.artifact_threshold if options.diagnostics else None,
            masks=self.probes.masks,
            faithfulness=curves,
            prefix=self.prefix,
        )
        if record:
            current = {m: maps[m].detach() for m in options.methods}
            if self.baseline is None:
                self.baseline = current
            self.previous = current
            self.history.append((step, maps[options.film_method][:, -1].detach()))
            self.report_history.append(self._report_entry(step, maps))
            self._thin_report_rows()
            if scalars:
                self.scalar_history.append((step, dict(scalars)))
        # a pass outside the history still shows itself at the end of the filmstrip
        extra = [] if record else [(step, maps[options.film_method][:, -1].detach())]
        panels = self.panels(maps, scalars, history_panels, extra) if render else []
        if record and render and self.animate:
            self._extend_animations()
        return ProbePass(step, maps, scalars, panels, curves)

    def _predictions_mean_something(self, maps: AttentionMaps, baseline: bool) -> bool:
        """Whether the rows should name the prediction (``options.predictions``; see :class:`ProbeOptions`)."""
        mode = self.options.predictions
        if maps.logits is None or mode == "never":
            return False
        if mode == "always":
            return True
        head = _classifier(self.model, maps.logits.shape[-1])
        if head is None:  # no way to tell whether the training uses it: what the labels say is all there is
            return self.probes.labels is not None
        params = [p.detach() for p in head.parameters()]
        if baseline or self._head_at_baseline is None:
            self._head_at_baseline = [p.clone() for p in params]
        elif not self.head_moved:
            before = self._head_at_baseline
            self.head_moved = len(before) != len(params) or any(
                a.shape != b.shape or not torch.equal(a, b.to(a.device)) for a, b in zip(params, before)
            )
        # at the baseline the classifier has not been trained yet: it means something when labels are given
        # (pretrained classes to compare with); later only a classifier the training moves does
        return self.head_moved or (baseline and self.probes.labels is not None)

    def _report_entry(self, step: int, maps: AttentionMaps) -> dict[str, Any]:
        """What the interactive report keeps of one pass, in float16 on the host (one copy for all of it)."""
        parts: dict[tuple[str, Any], Tensor] = {("maps", m): maps[m] for m in self.options.methods}
        parts.update({("heads", layer): maps.head_maps[layer] for layer in self.head_layers})
        parts.update({("matrices", layer): maps.matrices[layer] for layer in self.report_layers})
        parts.update({("head_matrices", layer): maps.head_matrices[layer] for layer in self.report_head_layers})
        flat = torch.cat([t.detach().reshape(-1).to(torch.float16) for t in parts.values()]).cpu()
        entry: dict[str, Any] = {"step": step, "maps": {}, "heads": {}, "matrices": {}, "head_matrices": {}}
        start = 0
        for (kind, key), tensor in parts.items():
            entry[kind][key] = flat[start : start + tensor.numel()].reshape(tensor.shape).clone()
            start += tensor.numel()
        # the prediction only where the grids name it (``predictions``): a classifier the training leaves alone says
        # nothing
        shown = self._show_predictions
        entry["predicted"] = maps.logits.argmax(-1).cpu() if maps.logits is not None and shown else None
        return entry

    def _thin_report_rows(self) -> None:
        """Keep the token x token attention of every ``_row_stride``-th recorded pass and of the latest; double
        the stride when more than :data:`REPORT_ROW_PASSES` would keep it."""
        history = self.report_history
        last = len(history) - 1
        if last > 0 and (last - 1) % self._row_stride:
            history[last - 1] = _without_rows(history[last - 1])  # kept only as the latest, until now
        while sum(bool(e["matrices"] or e["head_matrices"]) for e in history) > REPORT_ROW_PASSES:
            self._row_stride *= 2
            for index in range(last):
                if index % self._row_stride:
                    history[index] = _without_rows(history[index])

    def report_meta(self) -> dict[str, Any]:
        """How to read :attr:`report_history`: the grid, the query, the layers kept, the options the maps used."""
        options = self.options
        return {
            **self._report_meta,
            "methods": list(options.methods),
            "layers": list(self.report_layers),
            "head_layers": list(self.head_layers),
            "head_matrix_layers": list(self.report_head_layers),
            "head_fusion": options.head_fusion,
            "discard_ratio": options.discard_ratio,
            "class_names": None if options.class_names is None else list(options.class_names),
        }

    def report_html(self, title: str | None = None, alerts: Sequence[Any] = ()) -> str:
        """The interactive report of the recorded passes (:func:`~lightning_attn.report_html`)."""
        return report_html(self.state_dict(), alerts, title or f"{self.prefix}: {type(self.model).__name__}")

    def _repr_html_(self) -> str:
        """A notebook shows the report inline (in a frame of its own)."""
        if not self.report_history:
            return "<p>ProbeRunner: no probe pass recorded yet.</p>"
        return report_iframe(self.report_html())

    # ------------------------------------------------------------------ pictures

    def panels(
        self,
        maps: AttentionMaps,
        scalars: Mapping[str, float],
        history: bool = True,
        extra_frames: Sequence[tuple[int, Tensor]] = (),
    ) -> list[Panel]:
        """The pictures of one pass, in the order they are logged."""
        options, p = self.options, self.prefix
        display = self._display_at(options.tile_size)
        names, shown = options.class_names, self._show_predictions
        rows = row_labels(len(self.probes), self.probes.labels, maps, "raw", names, self.first_index, shown)
        render = options.render
        out: list[Panel] = []

        def grid(tag: str, maps_: Tensor, header: Sequence[str], labels: list[str]) -> None:
            out.append(Panel(tag, overlay_grid(display, maps_, header, labels, render), labels))

        columns = ["image"] + [f"L{layer}" for layer in self.layers]
        for method in options.methods:
            labels = row_labels(len(self.probes), self.probes.labels, maps, method, names, self.first_index, shown)
            grid(f"{p}/{method}", maps[method][:, self.layers], columns, labels)
        if options.aggregates and "raw" in options.methods:
            stacked = torch.stack([maps.aggregate(r, "raw") for r in options.aggregates], dim=1)
            grid(f"{p}/raw_aggregates", stacked, ["image", *options.aggregates], rows)
        if self.matrix_layers:
            matrices = torch.stack([maps.matrices[layer] for layer in self.matrix_layers], dim=1)
            tiles = matrix_tiles(matrices, options.tile_size * 2, options.cmap, options.scale, options.colour_range)
            header = [f"L{layer}" for layer in self.matrix_layers]
            out.append(Panel(f"{p}/matrix", _keyed(make_grid(tiles, header, rows), render), rows))
        for layer in self.head_layers:
            heads = maps.head_maps[layer]
            grid(f"{p}/heads/layer_{layer:02d}", heads, ["image"] + [f"h{h}" for h in range(heads.shape[1])], rows)
        if not history:
            return out
        # baseline plus the most recent passes of the final-layer map, one row per probe
        # a pass outside the history at a recorded step (validate from that step's checkpoint) takes its column
        outside = {s for s, _ in extra_frames}
        recorded = [frame for frame in self.history if frame[0] not in outside]
        frames = recorded[:1] + recorded[1:][-options.filmstrip_length :] + list(extra_frames)
        stacked = torch.stack([m.to(display.device) for _, m in frames], dim=1)
        grid(f"{p}/filmstrip", stacked, ["image"] + [f"s{s}" for s, _ in frames], rows)
        if scalars and self.scalar_history:
            # the whole run of each per-layer metric in one picture (rows = layers, columns = logged steps)
            for chart, (layers, steps, values) in layer_series(_thinned(self.scalar_history)).items():
                section, _, rest = chart.partition("/")
                bounds = _bounds(section[len(p) + 1 :]) if options.scale == "relative" else None
                picture = layer_step_image(values, steps, chart, layers=layers, value_range=bounds)
                out.append(Panel(f"{p}_layers_steps/{section[len(p) + 1 :]}" + (f"/{rest}" if rest else ""), picture))
        return out

    def animations(self) -> dict[str, GifStream]:
        """Per probe (the first :data:`MAX_ANIMATED`), its final-layer map over every recorded pass, as an animated
        GIF: ``{tag: stream}``. Frames of passes drawn as they ran (:attr:`animate`) are kept encoded; the others
        (all of them after a resume) are drawn now."""
        self._extend_animations()
        return dict(self._gifs)

    def _extend_animations(self) -> None:
        if self._gif_frames > len(self.history):  # the history was replaced or restarted
            self._gifs, self._gif_frames = {}, 0
        new = self.history[self._gif_frames :]
        if not new:
            return
        o = self.options
        display = self._display_at(2 * o.tile_size)  # the frames' tiles are twice the grids'
        tags = _animation_tags(len(display), self.prefix, o.film_method)
        for step, frame_maps in new:  # encoded pass by pass: only one pass's frames exist as pixels at a time
            for tag, frame in zip(tags, _frames(display, step, frame_maps, o.render)):
                self._gifs.setdefault(tag, GifStream()).append(frame)
        self._gif_frames = len(self.history)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to go on after a resume, or to redraw without the model (:func:`redraw`)."""
        cpu = lambda maps: None if maps is None else {m: t.cpu() for m, t in maps.items()}  # noqa: E731
        options = self.options
        return {
            "format": FORMAT_VERSION,
            "baseline_maps": cpu(self.baseline),
            "previous_maps": cpu(self.previous),
            "history": [(s, m.cpu()) for s, m in self.history],
            "scalar_history": [(s, dict(v)) for s, v in self.scalar_history],
            # the probes as displayed, in uint8: enough to redraw every picture of the history
            "display": (self.display() * 255).round().to(torch.uint8).cpu(),
            "stats": {"mean": list(self.stats[0]), "std": list(self.stats[1])},
            "labels": None if self.probes.labels is None else self.probes.labels.cpu(),
            "prefix": self.prefix,
            "film_method": options.film_method,
            "render": options.render,
            "head_moved": self.head_moved,
            "comparable": options.comparable(),
            "report": list(self.report_history),
            "report_row_stride": self._row_stride,
            "report_meta": self.report_meta(),
        }

    def sanity(self, seed: int = 0) -> SanityCheck:
        """The model-randomisation check (:func:`~lightning_attn.sanity_check`) on the probes, with this runner's
        methods, map options and target (the labels when known, else each probe's prediction)."""
        options = self.options
        self.display()  # moves the probes to the model's device
        return sanity_check(
            self.model,
            self.probes.images,
            methods=options.methods,
            target=options.target if options.target is not None else self.probes.labels,
            seed=seed,
            head_fusion=options.head_fusion,
            discard_ratio=options.discard_ratio,
            query=options.query,
            memory_budget=options.memory_budget,
        )

    def restart(self) -> None:
        """Forget the baseline and the map history: the next pass is a new baseline (scalar curves are kept)."""
        self.baseline = self.previous = None
        self.history = []
        self.report_history = []
        self._row_stride = 1
        self._gifs, self._gif_frames = {}, 0

    def differences(self, state: Mapping[str, Any]) -> list[str]:
        """What makes an earlier run's maps incomparable with this runner's: other probes or map options."""
        found = []
        display = state.get("display")
        if display is not None:
            now = (self.display() * 255).round().to(torch.uint8).cpu()
            if tuple(display.shape) != tuple(now.shape) or not torch.equal(display, now):
                found.append(f"probes ({tuple(display.shape)[0]} then, {tuple(now.shape)[0]} now, or other images)")
        before = state.get("comparable")
        if before is not None:
            found += [
                f"`{k}` ({before[k]!r} then, {v!r} now)"
                for k, v in self.options.comparable().items()
                if k in before and before[k] != v
            ]
        history = state.get("history") or []
        if history and tuple(history[0][1].shape) != (len(self.probes), *history[0][1].shape[1:]) and not found:
            found.append(f"a number of probes ({history[0][1].shape[0]} then, {len(self.probes)} now)")
        return found

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take the baseline and history of an earlier run (tolerant of missing keys)."""
        self.baseline = state.get("baseline_maps")
        self.previous = state.get("previous_maps")
        self.history = list(state.get("history") or [])
        self._gifs, self._gif_frames = {}, 0
        self.scalar_history = [(s, dict(v)) for s, v in state.get("scalar_history") or []]
        self.head_moved = bool(state.get("head_moved", False))
        self.report_history = list(state.get("report") or [])
        self._row_stride = int(state.get("report_row_stride", 1))


def _without_rows(entry: dict[str, Any]) -> dict[str, Any]:
    """A report entry without its token x token attention (a new dict: states handed out earlier keep theirs)."""
    if not entry["matrices"] and not entry["head_matrices"]:
        return entry
    return {**entry, "matrices": {}, "head_matrices": {}}


def _animation_tags(count: int, prefix: str, method: str) -> list[str]:
    """The tag of each animated probe (the first :data:`MAX_ANIMATED`)."""
    return [f"{prefix}/{method}_evolution/probe_{i:02d}" for i in range(min(count, MAX_ANIMATED))]


#: The most logged steps a layers x steps picture shows: beyond it the columns are spread evenly over the run (the
#: first and the latest always in), so drawing a pass costs the same at pass 1000 as at pass 100.
MAX_STEP_COLUMNS = 120


def _thinned(history: Sequence[tuple[int, Mapping[str, float]]]) -> Sequence[tuple[int, Mapping[str, float]]]:
    """At most :data:`MAX_STEP_COLUMNS` entries of ``history``, evenly spaced, the first and the last included."""
    if len(history) <= MAX_STEP_COLUMNS:
        return history
    return [history[i] for i in row_passes(len(history), MAX_STEP_COLUMNS)]


#: Natural bounds of the per-layer metrics drawn as layers x steps pictures, by section (after the prefix): with
#: the relative colour scale their colours mean the same value in every run and pass (normalised entropy 0.99 is
#: near the top, not stretched to look like 0.5); unbounded metrics (distance, counts) span their own min..max.
_METRIC_BOUNDS = {"entropy": (0.0, 1.0), "drift_baseline": (0.0, 1.0), "drift_previous": (0.0, 1.0)}


def _bounds(metric: str) -> tuple[float, float] | None:
    if metric.startswith("artifacts"):
        return None  # count, and shares whose useful range is small
    return _METRIC_BOUNDS.get(metric, (0.0, 1.0) if metric.endswith("share") else None)


def _notes(maps: Tensor, scale: str) -> list[list[str]] | None:
    """On the per-map scale, each stretched tile's peak-to-uniform ratio for (B, K, gh, gw) ``maps`` shown after
    an image column (left blank)."""
    return peak_notes(maps) if scale == "per_map" else None


def _keyed(grid: np.ndarray, render: Mapping[str, Any]) -> np.ndarray:
    """``grid`` with the colour bar of its scale underneath."""
    return with_colour_bar(grid, render["cmap"], render["scale"], render["colour_range"])


def overlay_grid(
    display: Tensor, maps: Tensor, header: Sequence[str], rows: Sequence[str], render: Mapping[str, Any]
) -> np.ndarray:
    """(B, K, gh, gw) ``maps`` over (B, 3, H, W) ``display`` images as one labelled grid with its colour bar, drawn
    with ``render`` (:attr:`ProbeOptions.render`); per-map tiles carry their peak-to-uniform ratio."""
    tiles = overlay(display, maps, **render)
    return _keyed(make_grid(tiles, header, rows, notes=_notes(maps, render["scale"])), render)


def _frames(display: Tensor, step: int, maps: Tensor, render: Mapping[str, Any]) -> list[np.ndarray]:
    """Each animated probe's frame of one pass: its one-frame filmstrip with the colour bar, every probe in one
    overlay (double-size tiles)."""
    count = min(len(display), MAX_ANIMATED)
    big = {**render, "tile_size": render["tile_size"] * 2}
    tiles = overlay(display[:count], maps[:count, None].to(display.device), **big)
    notes = _notes(maps[:count, None], render.get("scale", "relative"))
    return [
        _keyed(make_grid(tiles[i : i + 1], ["image", f"step {step}"], notes=notes and notes[i : i + 1]), render)
        for i in range(count)
    ]


def _animations(
    display: Tensor, history: Sequence[tuple[int, Tensor]], prefix: str, method: str, render: Mapping[str, Any]
) -> dict[str, list[np.ndarray]]:
    out: dict[str, list[np.ndarray]] = {tag: [] for tag in _animation_tags(len(display), prefix, method)}
    for step, maps in history:
        for frames, frame in zip(out.values(), _frames(display, step, maps, render)):
            frames.append(frame)
    return out


def redraw(state: Mapping[str, Any]) -> tuple[Panel, dict[str, list[np.ndarray]]]:
    """The filmstrip of every pass and the per-probe animation frames, from :meth:`ProbeRunner.state_dict` alone
    (a checkpoint's callback state), without the model.

    Raises:
        ValueError: the state holds no history, or comes from a version that kept no probe pixels.
    """
    if not state.get("history"):
        raise ValueError("the monitor's state holds no logged pass: nothing to redraw")
    if state.get("display") is None:
        raise ValueError(
            "this checkpoint's monitor state keeps no probe pixels (written by lightning-attn before format 2): "
            "re-run a pass with the model (`lightning-attn render`)"
        )
    display = state["display"].float() / 255
    history = state["history"]
    # tile_size, cmap, alpha (and, from 0.x on, scale and colour_range; older states draw on today's default)
    render = {"scale": "relative", "colour_range": DEFAULT_COLOUR_RANGE, **state["render"]}
    prefix, method = state.get("prefix", "attention"), state.get("film_method", "rollout")
    maps = torch.stack([m for _, m in history], dim=1)
    count = display.shape[0]
    labels = state.get("labels")
    rows = [f"#{i}" + (f" y{int(labels[i])}" if labels is not None else "") for i in range(count)]
    header = ["image"] + [f"s{s}" for s, _ in history]
    strip = Panel(f"{prefix}/filmstrip", overlay_grid(display, maps, header, rows, render), rows)
    return strip, _animations(display, history, prefix, method, render)
