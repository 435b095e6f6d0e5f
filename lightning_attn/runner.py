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
from .layout import TokenLayout
from .maps import GRADIENT_METHODS, AttentionMaps, attention_maps, check_explainable
from .options import ProbeOptions
from .probes import MANY_PROBES, Probes, display_stats
from .render import layer_step_image, make_grid, matrix_tiles, overlay, to_display
from .report import layer_series, scalar_layout, scalar_report, tag_prefix
from .sanity import SanityCheck, sanity_check

if TYPE_CHECKING:
    from .writers import AttentionWriter

__all__ = ["FORMAT_VERSION", "Panel", "ProbePass", "ProbeRunner", "redraw", "resolve_layers", "row_labels"]

#: Version of :meth:`ProbeRunner.state_dict`'s layout; a newer reader converts older states.
FORMAT_VERSION = 2
#: Probes that get an evolution animation: a GIF each, so a few hundred probes must not mean hundreds of files.
MAX_ANIMATED = 16


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
) -> list[str]:
    """Row captions: ``#i y<label> p<prediction>``; for class-targeted maps ``#i t<class explained>``. With
    ``class_names``, ``#i y=<name> p=<name>`` and ``#i t=<name>``. Probes are numbered from ``start``."""

    def name(index: int) -> str:
        if class_names is None:
            return str(index)
        return "=" + (class_names[index] if 0 <= index < len(class_names) else str(index))

    if method in GRADIENT_METHODS and maps.target is not None:
        return [f"#{start + i} t{name(t)}" for i, t in enumerate(maps.target.tolist())]  # the class explained
    predicted = maps.logits.argmax(-1).tolist() if maps.logits is not None else None
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


def _checked(
    model: nn.Module, options: ProbeOptions, layout: TokenLayout | None
) -> tuple[Backend, tuple[list[int], list[int], list[int]]]:
    """The model's backend and the ``layers``, ``matrix_layers`` and ``head_layers`` indices as 0..L-1, once the
    model and the options are checked against each other."""
    backend = backend_for(model, layout)
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
        return self._display

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
                keep_matrices=self.matrix_layers,
                target=target,
                head_layers=self.head_layers,
                attention_distance=options.diagnostics,
                layout=self._layout,
                memory_budget=options.memory_budget,
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
            if scalars:
                self.scalar_history.append((step, dict(scalars)))
        # a pass outside the history still shows itself at the end of the filmstrip
        extra = [] if record else [(step, maps[options.film_method][:, -1].detach())]
        panels = self.panels(maps, scalars, history_panels, extra) if render else []
        if record and render and self.animate:
            self._extend_animations()
        return ProbePass(step, maps, scalars, panels, curves)

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
        display = self.display()
        names = options.class_names
        rows = row_labels(len(self.probes), self.probes.labels, maps, class_names=names, start=self.first_index)
        render: dict[str, Any] = dict(tile_size=options.tile_size, cmap=options.cmap, alpha=options.alpha)
        out: list[Panel] = []
        columns = ["image"] + [f"L{layer}" for layer in self.layers]
        for method in options.methods:
            tiles = overlay(display, maps[method][:, self.layers], **render)
            labels = row_labels(len(self.probes), self.probes.labels, maps, method, names, self.first_index)
            out.append(Panel(f"{p}/{method}", make_grid(tiles, columns, labels), labels))
        if options.aggregates and "raw" in options.methods:
            stacked = torch.stack([maps.aggregate(r, "raw") for r in options.aggregates], dim=1)
            tiles = overlay(display, stacked, **render)
            out.append(Panel(f"{p}/raw_aggregates", make_grid(tiles, ["image", *options.aggregates], rows), rows))
        if self.matrix_layers:
            matrices = torch.stack([maps.matrices[layer] for layer in self.matrix_layers], dim=1)
            tiles = matrix_tiles(matrices, options.tile_size * 2, options.cmap)
            header = [f"L{layer}" for layer in self.matrix_layers]
            out.append(Panel(f"{p}/matrix", make_grid(tiles, header, rows), rows))
        for layer in self.head_layers:
            heads = maps.head_maps[layer]
            tiles = overlay(display, heads, **render)
            header = ["image"] + [f"h{h}" for h in range(heads.shape[1])]
            out.append(Panel(f"{p}/heads/layer_{layer:02d}", make_grid(tiles, header, rows), rows))
        if not history:
            return out
        # baseline plus the most recent passes of the final-layer map, one row per probe
        frames = self.history[:1] + self.history[1:][-options.filmstrip_length :] + list(extra_frames)
        tiles = overlay(display, torch.stack([m.to(display.device) for _, m in frames], dim=1), **render)
        header = ["image"] + [f"s{s}" for s, _ in frames]
        out.append(Panel(f"{p}/filmstrip", make_grid(tiles, header, rows), rows))
        if scalars and self.scalar_history:
            # the whole run of each per-layer metric in one picture (rows = layers, columns = logged steps)
            for chart, (layers, steps, values) in layer_series(self.scalar_history).items():
                section, _, rest = chart.partition("/")
                picture = layer_step_image(values, steps, chart, layers=layers)
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
        display = self.display()
        tags = _animation_tags(len(display), self.prefix, o.film_method)
        for step, frame_maps in new:  # encoded pass by pass: only one pass's frames exist as pixels at a time
            for tag, frame in zip(tags, _frames(display, step, frame_maps, o.tile_size, o.cmap, o.alpha)):
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
            "render": {"tile_size": options.tile_size, "cmap": options.cmap, "alpha": options.alpha},
            "comparable": options.comparable(),
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
        self._gifs, self._gif_frames = {}, 0

    def differences(self, state: Mapping[str, Any]) -> list[str]:
        """What makes an earlier run's maps incomparable with this runner's: other probes or map options."""
        found = []
        display = state.get("display")
        if display is not None:
            now = (self.display() * 255).round().to(torch.uint8).cpu()
            if tuple(display.shape) != tuple(now.shape) or not torch.equal(display, now):
                found.append(f"the probes ({tuple(display.shape)[0]} then, {tuple(now.shape)[0]} now, or other images)")
        before = state.get("comparable")
        if before is not None:
            found += [
                f"`{k}` ({before[k]!r} then, {v!r} now)"
                for k, v in self.options.comparable().items()
                if k in before and before[k] != v
            ]
        history = state.get("history") or []
        if history and tuple(history[0][1].shape) != (len(self.probes), *history[0][1].shape[1:]):
            found.append("the number of probes")
        return found

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take the baseline and history of an earlier run (tolerant of missing keys)."""
        self.baseline = state.get("baseline_maps")
        self.previous = state.get("previous_maps")
        self.history = list(state.get("history") or [])
        self._gifs, self._gif_frames = {}, 0
        self.scalar_history = [(s, dict(v)) for s, v in state.get("scalar_history") or []]


def _animation_tags(count: int, prefix: str, method: str) -> list[str]:
    """The tag of each animated probe (the first :data:`MAX_ANIMATED`)."""
    return [f"{prefix}/{method}_evolution/probe_{i:02d}" for i in range(min(count, MAX_ANIMATED))]


def _frames(display: Tensor, step: int, maps: Tensor, tile_size: int, cmap: str, alpha: float) -> list[np.ndarray]:
    """Each animated probe's frame of one pass: its one-frame filmstrip, every probe in one overlay."""
    count = min(len(display), MAX_ANIMATED)
    tiles = overlay(display[:count], maps[:count, None].to(display.device), tile_size * 2, cmap, alpha)
    return [make_grid(tiles[i : i + 1], ["image", f"step {step}"]) for i in range(count)]


def _animations(
    display: Tensor,
    history: Sequence[tuple[int, Tensor]],
    prefix: str,
    method: str,
    tile_size: int,
    cmap: str,
    alpha: float,
) -> dict[str, list[np.ndarray]]:
    out: dict[str, list[np.ndarray]] = {tag: [] for tag in _animation_tags(len(display), prefix, method)}
    for step, maps in history:
        for frames, frame in zip(out.values(), _frames(display, step, maps, tile_size, cmap, alpha)):
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
    render = state["render"]  # tile_size, cmap, alpha
    prefix, method = state.get("prefix", "attention"), state.get("film_method", "rollout")
    maps = torch.stack([m for _, m in history], dim=1)
    count = display.shape[0]
    labels = state.get("labels")
    rows = [f"#{i}" + (f" y{int(labels[i])}" if labels is not None else "") for i in range(count)]
    tiles = overlay(display, maps, render["tile_size"], render["cmap"], render["alpha"])
    header = ["image"] + [f"s{s}" for s, _ in history]
    strip = Panel(f"{prefix}/filmstrip", make_grid(tiles, header, rows), rows)
    return strip, _animations(display, history, prefix, method, render["tile_size"], render["cmap"], render["alpha"])
