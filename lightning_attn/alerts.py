r"""Attention-health alerts: read the monitor's own curves and say when attention goes wrong.

A pure core with no Lightning in it. Each rule is a small object that reads the scalar history of a run
(:attr:`ProbeRunner.scalar_history <lightning_attn.runner.ProbeRunner.scalar_history>`: a list of
``(step, {tag: value})``, the first entry being the baseline pass) and returns a :class:`Finding` or None;
:class:`AlertBook` turns findings into :class:`Alert` records, once per episode (an episode ends when the
condition clears). :class:`AlertThresholds` holds every threshold and patience, checked once.

No rule can fire on the first pass alone: a fresh model's attention is near uniform by construction, so every
rule reads the passes after it (the first pass is only a reference). Rules reason about the state of training,
not the count of passes: a condition must hold at every pass over ``patience`` optimiser steps (from the first
pass where it held to the last), so validating more often does not make a rule fire sooner. The thresholds are
calibrated on a corpus of healthy and broken runs (``benchmarks/calibrate_alerts.py``).

Example::

    >>> book = AlertBook(rules_for(AlertThresholds(collapse_patience=8)))
    >>> pass_ = lambda step, h: (step, {"attention_entropy/raw/layer_00": 0.9, "attention_entropy/raw/layer_01": h,
    ...                                  "attention_entropy_median/raw": h})
    >>> history = [pass_(0, 0.99), pass_(4, 0.01), pass_(8, 0.01)]
    >>> book.update(history)                     # collapsed for 4 steps: not yet (patience 8 steps)
    []
    >>> [(a.rule, a.step, a.layers) for a in book.update(history + [pass_(12, 0.01)])]
    [('collapse', 12, (1,))]
    >>> book.update(history + [pass_(12, 0.01), pass_(16, 0.02)])   # the same episode: said once
    []
    >>> sorted(book.markers([]))                 # marker curves: only the rules that can fire in this run
    ['attention_alerts/collapse', 'attention_alerts/uniform']
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from typing import Any, ClassVar

from .maps import METHODS

__all__ = [
    "RULES",
    "Alert",
    "AlertBook",
    "AlertThresholds",
    "ArtifactRule",
    "ChanceRule",
    "CollapseRule",
    "Finding",
    "OverwriteRule",
    "PointingRule",
    "Rule",
    "UniformRule",
    "check_alerts_mode",
    "rules_for",
]

History = Sequence[tuple[int, Mapping[str, float]]]

_LAYER = re.compile(r"layer_(\d+)")


def check_alerts_mode(alerts: Any) -> bool | str:
    """``alerts`` of :class:`~lightning_attn.AttentionMonitor` as given, once checked.

    Example::

        >>> check_alerts_mode("stop")
        'stop'
        >>> check_alerts_mode("on")
        Traceback (most recent call last):
        ...
        ValueError: `alerts` must be True, False or 'stop' (stop training when an alert fires), got 'on'
    """
    if alerts is True or alerts is False or alerts == "stop":
        return alerts
    raise ValueError(f"`alerts` must be True, False or 'stop' (stop training when an alert fires), got {alerts!r}")


# ---------------------------------------------------------------------------------------------------- thresholds


@dataclass(frozen=True)
class AlertThresholds:
    """Every threshold and patience of the rules. A patience is in optimiser steps: the condition must hold at
    every pass from one at least that many steps back to the last (so at two passes or more; 0: one pass after
    the baseline is enough), however often the passes come. Checked on construction; pass the ones to change as a
    dict, ``AttentionMonitor(alert_thresholds={"collapse_entropy": 0.1})``. The defaults are calibrated on the
    runs of ``benchmarks/calibrate_alerts.py`` (no alert on its healthy runs, every fault caught).

    Example::

        >>> AlertThresholds(collapse_entropy=0.1).collapse_entropy
        0.1
        >>> AlertThresholds.from_any({"colapse_entropy": 0.1})
        Traceback (most recent call last):
        ...
        ValueError: `alert_thresholds` has unknown keys ['colapse_entropy']; valid keys: artifact_growth, \
artifact_patience, artifact_share, chance_margin, chance_min_drop, chance_patience, collapse_entropy, \
collapse_patience, overwrite_min_drift, overwrite_patience, overwrite_ratio, pointing_drop, pointing_patience, \
uniform_change, uniform_entropy, uniform_patience
    """

    #: collapse: a layer's mean normalised entropy, or the final layer's median over probes, at most this
    collapse_entropy: float = 0.05
    collapse_patience: int = 20
    #: never learned where to look: every layer's mean normalised entropy, raw and rollout, at least this ...
    uniform_entropy: float = 0.98
    uniform_patience: int = 100
    #: pretrained features overwritten: early-layer drift >= this x late-layer drift ...
    overwrite_ratio: float = 1.0
    #: ... and at least this many bits (below it both are noise)
    overwrite_min_drift: float = 0.05
    overwrite_patience: int = 20
    #: artifact tokens: a middle/late layer's artifact share at least this ...
    artifact_share: float = 0.6
    #: ... and this much above the same layer's share at the first pass
    artifact_growth: float = 0.1
    artifact_patience: int = 50
    #: map leaves the object: the pointing game below (1 - this) x its best value so far
    pointing_drop: float = 0.5
    pointing_patience: int = 50
    #: map no better than chance: deletion AUC (most important first) above the random map's minus this ...
    chance_margin: float = 0.02
    chance_patience: int = 100
    #: ... (uniform) while the most selective layer's entropy did not fall by this much over the last patience steps:
    #: attention still forming is not "never learned"
    uniform_change: float = 0.002
    #: ... (chance) while deleting every patch lowers the target score by at least this: a model whose score does
    #: not depend on the image (not learned yet) cannot tell a good map from a random one
    chance_min_drop: float = 0.2

    _BOUNDS: ClassVar[dict[str, tuple[float, float, str]]] = {
        # name: (low, high, what the interval means); "(" open, "[" closed
        "collapse_entropy": (0.0, 1.0, "(]"),
        "uniform_entropy": (0.0, 1.0, "(]"),
        "overwrite_ratio": (0.0, math.inf, "()"),
        "overwrite_min_drift": (0.0, 1.0, "[)"),
        "artifact_share": (0.0, 1.0, "(]"),
        "artifact_growth": (0.0, 1.0, "[)"),
        "pointing_drop": (0.0, 1.0, "()"),
        "chance_margin": (0.0, 1.0, "[)"),
        "uniform_change": (0.0, 1.0, "[)"),
        "chance_min_drop": (0.0, 1.0, "[]"),
    }

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_patience"):
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(
                        f"`alert_thresholds['{f.name}']` must be an int >= 0 (optimiser steps), got {value!r}"
                    )
                continue
            low, high, closed = self._BOUNDS[f.name]
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            ok = ok and (low <= value if closed[0] == "[" else low < value)
            ok = ok and (value <= high if closed[1] == "]" else value < high)
            if not ok:
                interval = f"{closed[0]}{low:g}, {high:g}{closed[1]}"
                raise ValueError(f"`alert_thresholds['{f.name}']` must be a number in {interval}, got {value!r}")
            object.__setattr__(self, f.name, float(value))

    @classmethod
    def from_any(cls, value: AlertThresholds | Mapping[str, float] | None) -> AlertThresholds:
        """The thresholds from None (defaults), a dict of the ones to change, or an :class:`AlertThresholds`."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(
                f"`alert_thresholds` must be None, a dict such as {{'collapse_entropy': 0.05}} or an AlertThresholds, "
                f"got {type(value).__name__}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"`alert_thresholds` has unknown keys {unknown}; valid keys: {', '.join(sorted(known))}")
        return cls(**value)  # type: ignore[arg-type]  # keys checked above, values by __post_init__


# ---------------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Finding:
    """What a rule saw at the last pass of a history: the layers involved, the curve (tag or chart) to open,
    the numbers behind it, and the methods it concerns (empty when one method's curves were read)."""

    layers: tuple[int, ...]
    curve: str
    detail: str
    methods: tuple[str, ...] = ()


@dataclass(frozen=True)
class Alert:
    """One alert: the ``rule`` that fired, the ``step`` of the pass, the ``layers`` and (where known) the
    ``probes`` involved, the ``curve`` to open and the whole ``message``, what to try included."""

    rule: str
    step: int
    layers: tuple[int, ...]
    message: str
    curve: str = ""
    probes: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain types, for a checkpoint."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Alert:
        """From :meth:`to_dict` (tolerant of missing keys)."""
        return cls(
            rule=str(data.get("rule", "")),
            step=int(data.get("step", 0)),
            layers=tuple(int(x) for x in data.get("layers") or ()),
            message=str(data.get("message", "")),
            curve=str(data.get("curve", "")),
            probes=tuple(int(x) for x in data.get("probes") or ()),
        )


# ---------------------------------------------------------------------------------------------------- helpers


def _layers_of(metrics: Mapping[str, float], chart: str) -> list[int]:
    """The layer indices of ``chart``'s ``layer_XX`` lines in one pass, sorted."""
    return list(_layers_in(tuple(metrics), chart))


@lru_cache(maxsize=512)
def _layers_in(tags: tuple[str, ...], chart: str) -> tuple[int, ...]:
    # every pass of a run logs the same tags: parsed once per chart, not once per pass and rule at every pass (the
    # rules read the whole history, so parsing it again made a pass at pass 1000 cost ~40 ms more than at pass 10)
    out = []
    for tag in tags:
        head, _, line = tag.rpartition("/")
        match = _LAYER.fullmatch(line)
        if head == chart and match:
            out.append(int(match.group(1)))
    return tuple(sorted(out))


def _early_late(layers: Sequence[int]) -> tuple[list[int], list[int]]:
    """The first and the last third of the layers (at least one each): early and late layers."""
    k = max(1, len(layers) // 3)
    return list(layers[:k]), list(layers[-k:])


def _method(history: History, section: str) -> str | None:
    """The map whose ``section/<method>/layer_XX`` curves the last pass has: ``raw`` first (each layer's own
    attention; rollout accumulates the layers below it), else the first method in :data:`METHODS` order."""
    last = history[-1][1]
    for method in METHODS:
        if f"{section}/{method}/layer_00" in last:
            return method
    return None


def _streak(flags: Sequence[bool]) -> int:
    """How many of ``flags`` are true at the end, in a row."""
    count = 0
    for flag in reversed(flags):
        if not flag:
            break
        count += 1
    return count


def _held_since(history: History, flag: Callable[[Mapping[str, float]], bool], patience: int) -> int | None:
    """The index of the latest pass at least ``patience`` optimiser steps before the last one, when ``flag`` holds
    at every pass from it to the last (the baseline, index 0, never counts), else None. Read from the last pass
    back, stopping where the streak breaks or reaches that pass: a pass costs the same at pass 1000 as at pass 10
    (:func:`_lasted` over every pass's flags gives the same verdict)."""
    last = history[-1][0]
    for index in range(len(history) - 1, 0, -1):
        step, metrics = history[index]
        if not flag(metrics):
            return None
        if last - step >= patience:
            return index
    return None


def _lasted(history: History, flags: Sequence[bool], patience: int) -> bool:
    """Whether ``flags`` (one per pass after the baseline) hold at every pass from one at least ``patience``
    optimiser steps before the last pass to the last: the streak's duration in steps, not in passes."""
    count = _streak(flags)
    return count > 0 and history[-1][0] - history[len(history) - count][0] >= patience


def _value(metrics: Mapping[str, float], tag: str) -> float | None:
    value = metrics.get(tag)
    return None if value is None or not math.isfinite(value) else float(value)


def _fmt(layers: Sequence[int]) -> str:
    return ", ".join(str(layer) for layer in layers)


# ---------------------------------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    """One pathology: a name, a one-line title, what to try, and :meth:`check` over the scalar history.

    Subclasses hold their thresholds as fields; ``prefix`` is the first word of the tags (``attention`` or
    ``attention_<name>``).
    """

    prefix: str = "attention"
    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    advice: ClassVar[str] = ""

    def check(self, history: History) -> Finding | None:
        """A finding at the last pass of ``history`` (whose first entry is the baseline), or None."""
        raise NotImplementedError

    #: whether the rule reads the maps as a query token's attention (not the mean over every patch's row)
    needs_query_token: ClassVar[bool] = False

    def applies(self, history: History) -> bool:
        """Whether the rule can fire in this run's configuration: the curves it reads are logged (``chance``
        needs faithfulness, ``pointing`` masks), and for ``overwrite`` the first pass shows learned attention."""
        raise NotImplementedError

    def probes(self, maps: Any, finding: Finding) -> tuple[int, ...]:
        """The probes showing the finding, from the pass's :class:`~lightning_attn.maps.AttentionMaps`; empty
        when the rule reads means over probes only."""
        return ()


@dataclass(frozen=True)
class CollapseRule(Rule):
    """A layer's normalised entropy, mean over probes, or the final layer's median over probes (so: on at least half
    of them), at most ``entropy`` over ``patience`` optimiser steps: all attention on one token. Reads
    ``<prefix>_entropy/<method>/layer_XX`` and ``<prefix>_entropy_median/<method>``."""

    entropy: float = 0.05
    patience: int = 20
    name: ClassVar[str] = "collapse"
    title: ClassVar[str] = "attention collapsed onto one token"
    advice: ClassVar[str] = (
        "lower the learning rate or add warm-up, check for exploding q/k norms (QK-norm, a smaller init), and "
        "look at the grids: if the token is always the same background patch, see the artifact rule"
    )

    def applies(self, history: History) -> bool:
        return bool(history) and any(f"{self.prefix}_entropy_median/{m}" in history[-1][1] for m in METHODS)

    def _collapsed(self, metrics: Mapping[str, float], method: str) -> list[int]:
        """The collapsed layers of one pass (the final one when its median is)."""
        chart = f"{self.prefix}_entropy/{method}"
        layers = _layers_of(metrics, chart)
        out = [l for l in layers if (v := _value(metrics, f"{chart}/layer_{l:02d}")) is not None and v <= self.entropy]
        median = _value(metrics, f"{self.prefix}_entropy_median/{method}")
        if layers and median is not None and median <= self.entropy and layers[-1] not in out:
            out.append(layers[-1])
        return out

    def check(self, history: History) -> Finding | None:
        if len(history) < 2:
            return None
        methods = [m for m in METHODS if f"{self.prefix}_entropy_median/{m}" in history[-1][1]]
        collapsed = []
        for method in methods:
            if _held_since(history, lambda h: bool(self._collapsed(h, method)), self.patience) is not None:  # noqa: B023
                collapsed.append(method)
        if not collapsed:
            return None
        last = history[-1][1]
        layers = self._collapsed(last, collapsed[0])
        chart = f"{self.prefix}_entropy/{collapsed[0]}"
        values = ", ".join(f"layer {l} {last.get(f'{chart}/layer_{l:02d}', math.nan):.3f}" for l in layers)
        median = f"{self.prefix}_entropy_median/{collapsed[0]}"
        return Finding(
            layers=tuple(layers),
            curve=median if layers == _layers_of(last, chart)[-1:] else chart,
            methods=tuple(collapsed),
            detail=f"the normalised entropy is {values} (mean over probes; the final layer's median over probes "
            f"{last.get(median, math.nan):.3f}), <= {self.entropy:g}, over {self.patience}+ steps",
        )

    def probes(self, maps: Any, finding: Finding) -> tuple[int, ...]:
        from .metrics import normalized_entropy

        entropy = normalized_entropy(maps[finding.methods[0]][:, list(finding.layers)]).min(-1).values
        return tuple((entropy <= self.entropy).nonzero().flatten().tolist())


@dataclass(frozen=True)
class UniformRule(Rule):
    """Attention that never formed: every layer near uniform (normalised entropy at least ``entropy``, mean over
    probes), in the raw maps and in the rollout when logged, at every pass over ``patience`` optimiser steps, and
    not forming: the most selective layer's entropy fell by less than ``change`` over the last ``patience``
    steps. A network that attends selectively in some layer, or in its rollout, has learned where to look, even if
    its late layers average (they can pass on what an early layer gathered). Reads
    ``<prefix>_entropy/{raw,rollout}``."""

    entropy: float = 0.98
    patience: int = 100
    change: float = 0.002
    name: ClassVar[str] = "uniform"
    # it reads the rows of a query token (a class token's); where the maps are the mean over every patch's row
    # (Swin, GAP ViTs, SigLIP: attention each patch receives), a near-uniform map is what healthy models show
    needs_query_token: ClassVar[bool] = True
    title: ClassVar[str] = "no layer learned where to look (attention stays uniform and is not forming)"
    advice: ClassVar[str] = (
        "check that the attention receives gradient (frozen or zeroed q/k weights, a too-small learning rate for "
        "the blocks, a head that reads only the patch mean), train longer, or start from pretrained weights"
    )

    def _methods(self, history: History) -> list[str]:
        last = history[-1][1] if history else {}
        return [m for m in ("raw", "rollout") if f"{self.prefix}_entropy/{m}/layer_00" in last] or (
            [m] if (m := _method(history, f"{self.prefix}_entropy")) else []
        )

    def applies(self, history: History) -> bool:
        return bool(self._methods(history))

    def _lowest(self, metrics: Mapping[str, float], methods: Sequence[str]) -> float | None:
        """The lowest layer entropy of one pass over ``methods`` (None when one is missing)."""
        values = [
            _value(metrics, f"{self.prefix}_entropy/{m}/layer_{l:02d}")
            for m in methods
            for l in _layers_of(metrics, f"{self.prefix}_entropy/{m}")
        ]
        return None if not values or any(v is None for v in values) else min(values)  # type: ignore[type-var]

    def check(self, history: History) -> Finding | None:
        methods = self._methods(history)
        if not methods or len(history) < 2:
            return None

        def flat(metrics: Mapping[str, float]) -> bool:
            v = self._lowest(metrics, methods)
            return v is not None and v >= self.entropy

        # the pass `patience` steps back (the streak covers it): how much attention formed since
        back = _held_since(history, flat, self.patience)
        if back is None:
            return None
        first, now = self._lowest(history[back][1], methods), self._lowest(history[-1][1], methods)
        assert first is not None and now is not None  # flagged
        if first - now >= self.change:
            return None  # attention is forming: not "never learned"
        layers = _layers_of(history[-1][1], f"{self.prefix}_entropy/{methods[0]}")
        return Finding(
            layers=tuple(layers),
            curve=f"{self.prefix}_entropy/{methods[0]}",
            methods=tuple(methods),
            detail=f"every layer's normalised entropy ({' and '.join(methods)}) is >= {self.entropy:g} (lowest "
            f"{now:.4f})"
            + (
                f" at every pass over {self.patience}+ steps, and fell by {max(first - now, 0.0):.4f} "
                f"(< {self.change:g}) over the last {self.patience} steps"
                if self.patience
                else ""
            ),
        )

    def probes(self, maps: Any, finding: Finding) -> tuple[int, ...]:
        from .metrics import normalized_entropy

        entropy = normalized_entropy(maps[finding.methods[0]][:, list(finding.layers)]).min(-1).values
        return tuple((entropy >= self.entropy).nonzero().flatten().tolist())


@dataclass(frozen=True)
class OverwriteRule(Rule):
    """Fine-tuning only (the first pass shows learned attention: its late layers' mean entropy below
    ``uniform_entropy``): the early layers (first third) drift from the baseline at least ``ratio`` x as much as
    the late ones (last third), and at least ``min_drift`` bits, for ``patience`` passes. Reads
    ``<prefix>_drift_baseline/<method>``."""

    ratio: float = 1.0
    min_drift: float = 0.05
    patience: int = 20
    uniform_entropy: float = 0.98
    name: ClassVar[str] = "overwrite"
    title: ClassVar[str] = "pretrained features are being overwritten (early layers drift as much as late ones)"
    advice: ClassVar[str] = (
        "lower the learning rate (or use layer-wise decay), freeze the early blocks for the first epochs, or add "
        "warm-up"
    )

    def _pretrained(self, baseline: Mapping[str, float], method: str) -> bool:
        chart = f"{self.prefix}_entropy/{method}"
        layers = _layers_of(baseline, chart)
        if not layers:
            return False
        _, late = _early_late(layers)
        values = [_value(baseline, f"{chart}/layer_{layer:02d}") for layer in late]
        return all(v is not None for v in values) and sum(values) / len(values) < self.uniform_entropy  # type: ignore[arg-type]

    def applies(self, history: History) -> bool:
        method = _method(history, f"{self.prefix}_drift_baseline") if history else None
        if method is None or not self._pretrained(history[0][1], method):
            return False  # from scratch: every layer moves, nothing pretrained to lose
        early, late = _early_late(_layers_of(history[-1][1], f"{self.prefix}_drift_baseline/{method}"))
        return not set(early) & set(late)  # a one-layer model has no early and late

    def check(self, history: History) -> Finding | None:
        if len(history) < 2 or not self.applies(history):
            return None
        method = _method(history, f"{self.prefix}_drift_baseline")
        chart = f"{self.prefix}_drift_baseline/{method}"
        early, late = _early_late(_layers_of(history[-1][1], chart))

        def drifts(metrics: Mapping[str, float]) -> tuple[float, float] | None:
            e = [_value(metrics, f"{chart}/layer_{layer:02d}") for layer in early]
            l_ = [_value(metrics, f"{chart}/layer_{layer:02d}") for layer in late]
            if any(v is None for v in e + l_):
                return None
            return sum(e) / len(e), sum(l_) / len(l_)  # type: ignore[arg-type]

        def overwritten(metrics: Mapping[str, float]) -> bool:
            d = drifts(metrics)
            return d is not None and d[0] >= self.min_drift and d[0] >= self.ratio * d[1]

        if _held_since(history, overwritten, self.patience) is None:
            return None
        e, l_ = drifts(history[-1][1])  # type: ignore[misc]
        return Finding(
            layers=tuple(early),
            curve=chart,
            methods=(method,),  # type: ignore[arg-type]  # found by applies()
            detail=f"early layers {_fmt(early)} drifted {e:.3f} bits from the baseline, late layers {_fmt(late)} "
            f"{l_:.3f} (early >= {self.ratio:g} x late and >= {self.min_drift:g}) over {self.patience}+ steps",
        )


@dataclass(frozen=True)
class ArtifactRule(Rule):
    """In a middle or late layer (all but the first third), the patches above ``artifact_threshold`` x the median
    share take at least ``share`` of the raw query row, and at least ``growth`` more than at the first pass, for
    ``patience`` passes. Reads ``<prefix>_artifacts/background_share`` when the probes have masks (artifact
    tokens sit on background: on a small grid the object's own patches are outsized too), else
    ``<prefix>_artifacts/share``."""

    share: float = 0.6
    growth: float = 0.1
    patience: int = 50
    name: ClassVar[str] = "artifacts"
    title: ClassVar[str] = "a few patches take a growing share of attention (artifact tokens)"
    advice: ClassVar[str] = (
        "if they sit on background, these are the high-norm artifact tokens of Darcet et al. 2023: use a model "
        "with registers (timm `*_reg4_*`, DINOv2 with registers), or accept them and read rollout/relevance maps"
    )

    def _chart(self, history: History) -> str:
        chart = f"{self.prefix}_artifacts/background_share"
        return chart if f"{chart}/layer_00" in history[-1][1] else f"{self.prefix}_artifacts/share"

    def applies(self, history: History) -> bool:
        return bool(history) and bool(_layers_of(history[-1][1], self._chart(history)))

    def check(self, history: History) -> Finding | None:
        if len(history) < 2 or not self.applies(history):
            return None
        chart = self._chart(history)
        layers = _layers_of(history[-1][1], chart)
        early, _ = _early_late(layers)
        watched = [layer for layer in layers if layer not in early] or layers
        first = history[0][1]

        def hot(metrics: Mapping[str, float]) -> list[int]:
            out = []
            for layer in watched:
                value = _value(metrics, f"{chart}/layer_{layer:02d}")
                start = _value(first, f"{chart}/layer_{layer:02d}") or 0.0
                if value is not None and value >= self.share and value >= start + self.growth:
                    out.append(layer)
            return out

        if _held_since(history, lambda h: bool(hot(h)), self.patience) is None:
            return None
        last = history[-1][1]
        found = hot(last)
        values = ", ".join(f"layer {layer} {last[f'{chart}/layer_{layer:02d}']:.2f}" for layer in found)
        return Finding(
            layers=tuple(found),
            curve=chart,
            detail=f"artifact tokens take {values} of the attention (>= {self.share:g}, and >= {self.growth:g} "
            f"more than at the first pass) over {self.patience}+ steps",
        )


@dataclass(frozen=True)
class PointingRule(Rule):
    """(With masks.) A method's pointing game below (1 - ``drop``) x its best value so far, for ``patience``
    passes: the map left the object. Reads ``<prefix>_pointing_game/<method>`` of every method but ``raw`` when
    another is logged: the final layer's raw attention is the last mixing step only, and moves off the object in
    healthy runs (rollout and the class-targeted maps show what the whole stack uses)."""

    drop: float = 0.5
    patience: int = 50
    name: ClassVar[str] = "pointing"
    title: ClassVar[str] = "the map left the object (pointing game well below its best)"
    advice: ClassVar[str] = (
        "check the grids and the filmstrip: a shortcut in the data (background, a watermark) or overfitting; "
        "compare with the validation loss, consider augmentation or an earlier checkpoint"
    )

    def applies(self, history: History) -> bool:
        return bool(history) and any(f"{self.prefix}_pointing_game/{m}" in history[-1][1] for m in METHODS)

    def check(self, history: History) -> Finding | None:
        chart = f"{self.prefix}_pointing_game"
        if len(history) < 2:
            return None
        fallen, numbers = [], []
        logged = [m for m in METHODS if f"{chart}/{m}" in history[-1][1]]
        for method in [m for m in logged if m != "raw"] or logged:
            tag = f"{chart}/{method}"
            values = [_value(h, tag) for _, h in history]
            flags, best = [], values[0]
            for v in values[1:]:
                flags.append(v is not None and best is not None and v < (1 - self.drop) * best)
                best = v if best is None or (v is not None and v > best) else best
            if _lasted(history, flags, self.patience):
                fallen.append(method)
                numbers.append(f"{method} {values[-1]:.3f} (best {max(v for v in values if v is not None):.3f})")
        if not fallen:
            return None
        layers = _layers_of(history[-1][1], f"{self.prefix}_entropy/{fallen[0]}")
        return Finding(
            layers=tuple(layers[-1:]),
            curve=f"{chart}/{fallen[0]}",
            methods=tuple(fallen),
            detail=f"the share of the final map inside the object masks is {', '.join(numbers)}, below "
            f"{1 - self.drop:g} x the best, over {self.patience}+ steps",
        )


@dataclass(frozen=True)
class ChanceRule(Rule):
    """(With faithfulness.) A method's deletion AUC, most important patches first, is not below the random
    map's by at least ``margin``, while deleting every patch lowers the target score by at least ``min_drop``,
    at every pass over ``patience`` optimiser steps: the map is no better than chance at finding what the model
    uses. (A model whose score hardly depends on the image, one that has not learned yet, cannot tell a good map
    from a random one: no verdict then.) Reads ``<prefix>_faithfulness/most_first_auc`` and
    ``<prefix>_faithfulness/score_drop/mean``."""

    margin: float = 0.02
    patience: int = 100
    min_drop: float = 0.2
    name: ClassVar[str] = "chance"
    title: ClassVar[str] = "the map is no better than chance (deletion AUC not below a random map's)"
    advice: ClassVar[str] = (
        "do not read this method's maps as explanations: try a class-targeted method (`relevance`, "
        "`grad_rollout`), and check that the model has learned the task (validation accuracy)"
    )

    def applies(self, history: History) -> bool:
        return bool(history) and f"{self.prefix}_faithfulness/most_first_auc/random" in history[-1][1]

    def check(self, history: History) -> Finding | None:
        chart = f"{self.prefix}_faithfulness/most_first_auc"
        if len(history) < 2 or not self.applies(history):
            return None
        drop = f"{self.prefix}_faithfulness/score_drop/mean"
        bad, numbers = [], []
        for method in METHODS:
            tag = f"{chart}/{method}"
            if tag not in history[-1][1]:
                continue

            def no_better(h: Mapping[str, float]) -> bool:
                v, r, d = _value(h, tag), _value(h, f"{chart}/random"), _value(h, drop)  # noqa: B023
                return v is not None and r is not None and d is not None and v > r - self.margin and d >= self.min_drop

            if _held_since(history, no_better, self.patience) is not None:
                bad.append(method)
                numbers.append(f"{method} {history[-1][1][tag]:.3f}")
        if not bad:
            return None
        last = history[-1][1]
        layers = _layers_of(last, f"{self.prefix}_entropy/{bad[0]}")
        return Finding(
            layers=tuple(layers[-1:]),
            curve=chart,
            methods=tuple(bad),
            detail=f"deletion AUC {', '.join(numbers)} against the random map's {last[f'{chart}/random']:.3f} "
            f"(not lower by {self.margin:g}; deleting the image lowers the score by {last[drop]:.3f}) over "
            f"{self.patience}+ steps",
        )


#: Every rule, in the order they are checked.
RULES: tuple[type[Rule], ...] = (CollapseRule, UniformRule, OverwriteRule, ArtifactRule, PointingRule, ChanceRule)


def rules_for(thresholds: AlertThresholds | None = None, prefix: str = "attention") -> list[Rule]:
    """One object per rule of :data:`RULES`, with ``thresholds`` (default :class:`AlertThresholds`)."""
    t = thresholds or AlertThresholds()
    return [
        CollapseRule(prefix, t.collapse_entropy, t.collapse_patience),
        UniformRule(prefix, t.uniform_entropy, t.uniform_patience, t.uniform_change),
        OverwriteRule(prefix, t.overwrite_ratio, t.overwrite_min_drift, t.overwrite_patience, t.uniform_entropy),
        ArtifactRule(prefix, t.artifact_share, t.artifact_growth, t.artifact_patience),
        PointingRule(prefix, t.pointing_drop, t.pointing_patience),
        ChanceRule(prefix, t.chance_margin, t.chance_patience, t.chance_min_drop),
    ]


# ---------------------------------------------------------------------------------------------------- the book


@dataclass
class AlertBook:
    """Keeps the alerts of a run: checks every rule on each new pass and records an :class:`Alert` when a rule's
    condition starts to hold; the episode lasts while it holds, so an alert is said once per episode.

    Args:
        rules: the rules to check (:func:`rules_for`).
    """

    rules: list[Rule] = field(default_factory=rules_for)
    #: every alert so far, oldest first
    alerts: list[Alert] = field(default_factory=list)
    #: names of the rules whose episode is going on
    active: set[str] = field(default_factory=set)
    #: index in the history of the current baseline (a resume with other probes starts a new one)
    start: int = 0
    #: names of the rules that can fire in this run (:meth:`Rule.applies`), as of the last :meth:`update`; None
    #: before the first
    applicable: list[str] | None = None

    def update(self, history: History, maps: Any = None) -> list[Alert]:
        """Check every rule against ``history`` (the last entry is the new pass) and return the new alerts.

        Args:
            history: ``(step, {tag: value})`` of every pass so far, the baseline first.
            maps: the new pass's :class:`~lightning_attn.maps.AttentionMaps`, to name the probes involved; None:
                probes are not named.
        """
        history = history[self.start :]
        if not history:
            return []
        step = int(history[-1][0])
        new = []
        # maps that are the mean over every patch's row (query "mean") are not a query token's attention
        mean_rows = getattr(getattr(maps, "layout", None), "query", None) == "mean"
        self.applicable = [
            rule.name for rule in self.rules if rule.applies(history) and not (mean_rows and rule.needs_query_token)
        ]
        for rule in self.rules:
            finding = rule.check(history) if rule.name in self.applicable else None
            if finding is None:
                self.active.discard(rule.name)
                continue
            if rule.name in self.active:
                continue  # the same episode: said already
            self.active.add(rule.name)
            probes = rule.probes(maps, finding) if maps is not None else ()
            alert = Alert(rule.name, step, finding.layers, _message(rule, step, finding, probes), finding.curve, probes)
            self.alerts.append(alert)
            new.append(alert)
        return new

    def markers(self, new: Sequence[Alert], prefix: str = "attention") -> dict[str, float]:
        """``{<prefix>_alerts/<rule>: 1.0 if it fired in ``new`` else 0.0}``, a curve to read the others against,
        for every rule that can fire in this run (:attr:`applicable`: no ``chance`` curve without faithfulness, no
        ``pointing`` curve without masks, no ``overwrite`` curve from scratch)."""
        fired = {a.rule for a in new}
        names = [r.name for r in self.rules if self.applicable is None or r.name in self.applicable]
        return {f"{prefix}_alerts/{name}": float(name in fired) for name in names}

    def restart(self, start: int) -> None:
        """The history's entry ``start`` is a new baseline: the rules read from there, and episodes start anew."""
        self.start = start
        self.active = set()

    def state_dict(self) -> dict[str, Any]:
        return {"alerts": [a.to_dict() for a in self.alerts], "active": sorted(self.active), "start": self.start}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.alerts = [Alert.from_dict(a) for a in state.get("alerts") or []]
        self.active = set(state.get("active") or [])
        self.start = int(state.get("start") or 0)


def _message(rule: Rule, step: int, finding: Finding, probes: Sequence[int]) -> str:
    layers = _fmt(finding.layers) or "-"
    who = f"probes {_fmt(probes)}" if probes else "all probes (means)"
    methods = f" [{', '.join(finding.methods)}]" if finding.methods else ""
    return (
        f"AttentionMonitor alert '{rule.name}' at step {step}: {rule.title}{methods}. "
        f"{finding.detail[:1].upper()}{finding.detail[1:]}. "
        f"Layers {layers}; {who}. Open the curve `{finding.curve}`. Try: {rule.advice}."
    )
