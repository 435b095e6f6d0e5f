"""What to compute and draw in a probe pass: one options object, validated once, shared by the callback, the probe
runner and the command line (the callback keeps flat keyword arguments, Lightning's and LightningCLI's convention,
and builds this from them)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from torch import Tensor

from .layout import QUERIES
from .maps import AGGREGATIONS, GRADIENT_METHODS, METHODS
from .names import PREDICTIONS
from .render import DEFAULT_COLOUR_RANGE, check_cmap, check_colour_scale
from .rollout import check_discard_ratio, check_head_fusion

__all__ = ["PREDICTIONS", "ProbeOptions", "check_layer_list"]

# PREDICTIONS lives in the torch-free names.py (the command line's --help reads it)

#: Bounds that keep one pass affordable: a tile of 512 px and 100 deletion steps already cost seconds per probe.
MAX_TILE_SIZE = 512
MAX_FAITHFULNESS_STEPS = 100


def check_layer_list(name: str, layers: Any, allow_none: bool) -> tuple[int, ...] | None:
    """Layer indices (ints, negative counts from the end) as a tuple; None when ``allow_none`` and not given."""
    if layers is None and allow_none:
        return None
    if layers is None or isinstance(layers, (int, str, bytes)) or not hasattr(layers, "__iter__"):
        raise ValueError(
            f"`{name}` must be a sequence of layer indices (ints, negative counts from the end), got {layers!r}"
        )
    values = list(layers)
    # numbers.Integral: Python and numpy integers alike; bools are not layer indices
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_)) for v in values):
        raise ValueError(
            f"`{name}` must be a sequence of layer indices (ints, negative counts from the end), got {layers!r}"
        )
    values = [int(v) for v in values]
    if len(set(values)) != len(values):
        raise ValueError(f"`{name}` has repeated layers: {layers!r}")
    return tuple(values)


def _int_in(name: str, value: Any, low: int, high: int | None = None, unit: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"`{name}` must be an int {bound}{unit}, got {value!r}")


def _stats(name: str, values: Sequence[float] | None) -> tuple[float, ...] | None:
    if values is None:
        return None
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) not in (1, 3):
        raise ValueError(f"`{name}` must hold 1 or 3 values (one per channel), got {values!r}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise ValueError(f"`{name}` values must be finite numbers, got {values!r}")
    return tuple(float(v) for v in values)


@dataclass(frozen=True)
class ProbeOptions:
    """The maps, curves and pictures of a probe pass. Every field is checked on construction, with a message that
    names the fix; see :class:`~lightning_attn.AttentionMonitor` for what each one means.

    Example::

        >>> ProbeOptions(methods=("raw", "relevance"), tile_size=64).film_method
        'raw'
        >>> ProbeOptions(tile_size=4)
        Traceback (most recent call last):
        ...
        ValueError: `tile_size` must be an int in [8, 512] (pixels on the long side of a tile), got 4
    """

    methods: tuple[str, ...] = ("raw", "rollout")
    target: Callable[[Any], Tensor] | None = None
    layers: tuple[int, ...] | None = None
    aggregates: tuple[str, ...] = AGGREGATIONS
    matrix_layers: tuple[int, ...] = ()
    head_fusion: str = "mean"
    discard_ratio: float = 0.0
    query: str = "auto"
    tile_size: int = 96
    cmap: str = "jet"
    alpha: float = 0.5
    log_entropy: bool = True
    head_layers: tuple[int, ...] = (-1,)
    diagnostics: bool = True
    artifact_threshold: float = 10.0
    faithfulness: bool = False
    faithfulness_steps: int = 10
    filmstrip_length: int = 8
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    class_names: tuple[str, ...] | None = None
    memory_budget: int | None = None
    scale: str = "relative"
    colour_range: float = DEFAULT_COLOUR_RANGE
    predictions: str = "auto"
    report_layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen: normalise once)
        methods = self.methods
        if isinstance(methods, str) or not methods or any(m not in METHODS for m in methods):
            raise ValueError(f"`methods` must be a non-empty sequence of {METHODS}, got {methods!r}")
        set_("methods", tuple(methods))
        if self.target is not None and (isinstance(self.target, Tensor) or not callable(self.target)):
            raise ValueError(
                "`target` must be a callable `output -> (B,) score` (for models without class logits); class "
                f"indices come from `labels`; got {type(self.target).__name__}"
            )
        aggregates = self.aggregates
        if aggregates is None or isinstance(aggregates, str) or any(a not in AGGREGATIONS for a in aggregates):
            raise ValueError(f"`aggregates` must be a sequence of {AGGREGATIONS} (or empty), got {aggregates!r}")
        set_("aggregates", tuple(aggregates))
        layers = check_layer_list("layers", self.layers, allow_none=True)
        if layers is not None and not layers:
            raise ValueError("`layers` is empty: pass None for all layers or at least one index")
        set_("layers", layers)
        set_("matrix_layers", check_layer_list("matrix_layers", self.matrix_layers, allow_none=False))
        set_("head_layers", check_layer_list("head_layers", self.head_layers, allow_none=False))
        check_head_fusion(self.head_fusion)
        check_discard_ratio(self.discard_ratio)
        set_("discard_ratio", float(self.discard_ratio))
        if self.query not in QUERIES:
            raise ValueError(f"`query` must be one of {QUERIES}, got {self.query!r}")
        _int_in("tile_size", self.tile_size, 8, MAX_TILE_SIZE, " (pixels on the long side of a tile)")
        check_cmap(self.cmap)
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"`alpha` must be in [0, 1], got {alpha!r}")
        set_("alpha", float(alpha))
        threshold = self.artifact_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 1 < threshold < math.inf:
            raise ValueError(
                f"`artifact_threshold` must be a finite number > 1 (times the median share), got {threshold!r}"
            )
        set_("artifact_threshold", float(threshold))
        _int_in("faithfulness_steps", self.faithfulness_steps, 1, MAX_FAITHFULNESS_STEPS)
        _int_in("filmstrip_length", self.filmstrip_length, 1)
        set_("mean", _stats("mean", self.mean))
        set_("std", _stats("std", self.std))
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError(f"`std` values must be > 0, got {self.std!r}")
        budget = self.memory_budget
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or budget < 0):
            raise ValueError(
                f"`memory_budget` must be None (256 MiB) or an int >= 0 (bytes of attention one layer may hold at "
                f"once; 0: one head at a time), got {budget!r}"
            )
        set_("memory_budget", None if budget is None else int(budget))
        check_colour_scale(self.scale, self.colour_range)
        set_("colour_range", float(self.colour_range))
        if self.predictions not in PREDICTIONS:
            raise ValueError(
                f"`predictions` must be one of {PREDICTIONS} ('auto': shown when they mean something), "
                f"got {self.predictions!r}"
            )
        names = self.class_names
        if names is not None:
            if isinstance(names, (str, bytes)) or not hasattr(names, "__iter__"):
                raise ValueError(f"`class_names` must be a sequence of strings, one per class, got {names!r}")
            names = tuple(names)
            if not names or not all(isinstance(n, str) for n in names):
                raise ValueError(f"`class_names` must be a non-empty sequence of strings, one per class, got {names!r}")
            set_("class_names", names)
        set_("report_layers", check_layer_list("report_layers", self.report_layers, allow_none=True))

    @property
    def render(self) -> dict[str, Any]:
        """How heatmaps are drawn: the keyword arguments of :func:`~lightning_attn.render.overlay`."""
        return {
            "tile_size": self.tile_size,
            "cmap": self.cmap,
            "alpha": self.alpha,
            "scale": self.scale,
            "colour_range": self.colour_range,
        }

    @property
    def film_method(self) -> str:
        """The map whose evolution the filmstrip and animations show: the rollout when logged."""
        return "rollout" if "rollout" in self.methods else self.methods[0]

    @property
    def needs_class(self) -> bool:
        """Whether something explains a score (gradient methods, faithfulness)."""
        return self.faithfulness or any(m in GRADIENT_METHODS for m in self.methods)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def comparable(self) -> dict[str, Any]:
        """The options a map depends on: a baseline taken under other values is not comparable."""
        return {"head_fusion": self.head_fusion, "discard_ratio": self.discard_ratio, "query": self.query}
