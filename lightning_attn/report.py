"""Name the scalars of one probe pass: the tags the callback logs, computed from maps already on the device.

Everything is assembled as tensors and copied to the host once, in :func:`scalar_report`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from .diagnostics import artifact_mask, artifact_tokens, attention_drift, register_share
from .faithfulness import PerturbationCurves, jaccard_index, pixels_to_patches, pointing_game
from .maps import AttentionMaps
from .metrics import normalized_entropy

__all__ = ["layer_series", "scalar_layout", "scalar_report", "tag_prefix"]

_LAYER = re.compile(r"layer_(\d+)")


def _per_layer(out: dict[str, Tensor], prefix: str, values: Tensor) -> None:
    for layer, value in enumerate(values):
        out[f"{prefix}/layer_{layer:02d}"] = value


def tag_prefix(name: str | None = None) -> str:
    """The first word of every tag: ``"attention"``, or ``"attention_<name>"`` for a named monitor.

    Example::

        >>> tag_prefix(), tag_prefix("student")
        ('attention', 'attention_student')
    """
    return "attention" if name is None else f"attention_{name}"


def scalar_report(
    maps: AttentionMaps,
    methods: Sequence[str],
    *,
    entropy: bool = True,
    baseline: Mapping[str, Tensor] | None = None,
    previous: Mapping[str, Tensor] | None = None,
    registers: slice | None = None,
    artifact_threshold: float | None = 10.0,
    masks: Tensor | None = None,
    faithfulness: Mapping[str, PerturbationCurves] | None = None,
    prefix: str = "attention",
) -> dict[str, float]:
    """The scalars of one probe pass by tag, all means over probes.

    Every tag reads ``<section>/<chart>/<line>``: the first word (``P_metric``, ``P`` = ``prefix``) is the
    metric, so TensorBoard gives each metric its own section; everything but the last word names one chart;
    the last word is one line of it (a layer, a head, a method). Tags (``XX`` = layer, ``M`` = method):

    - ``P_entropy/M/layer_XX``: normalised entropy of the query row over patches (0 one patch, 1 uniform).
    - ``P_entropy_median/M``: the final layer's normalised entropy, median over probes (the lower middle value).
    - ``P_drift_baseline/M/layer_XX`` and ``.../mean``: Jensen–Shannon divergence (bits, [0, 1]) from the
      maps of the baseline pass; ``P_drift_previous/...`` likewise from the previous logged pass.
    - ``P_artifacts/count/layer_XX`` and ``P_artifacts/share/layer_XX``: patches taking more than
      ``artifact_threshold`` x the median share of the raw query row, and the attention they take.
    - ``P_artifacts/background_share/layer_XX``: (with ``masks``) the share those patches take outside the
      object mask.
    - ``P_register_share/layer_XX``: share of the raw query row going to register tokens.
    - ``P_distance/layer_XX`` (mean over heads) and ``P_head_distance/layer_XX/head_YY``: mean attention
      distance in pixels.
    - ``P_pointing_game/M``: share of the final layer's map inside the probes' object masks.
    - ``P_jaccard/M``: Jaccard index between the patches holding 60 % of the final layer's map and the probes'
      object patches (:func:`~lightning_attn.faithfulness.jaccard_index`).
    - ``P_faithfulness/{most_first_auc,least_first_auc}/M``: deletion AUCs of the final layer's map (lower /
      higher is more faithful); ``M = random`` is the chance level, on the same chart.
    - ``P_faithfulness/score_drop/mean``: the target score of the whole image minus that with every patch deleted
      (the same for every map), mean over probes: how much the deletion curves can say.
    """
    p = prefix
    out: dict[str, Tensor] = {}
    for method in methods:
        if entropy:
            per_probe = normalized_entropy(maps[method])  # (B, L)
            _per_layer(out, f"{p}_entropy/{method}", per_probe.mean(0))
            # the mean hides "on most probes": the median of the final layer is <= x when half the probes are
            out[f"{p}_entropy_median/{method}"] = per_probe[:, -1].median()
        for name, reference in (("drift_baseline", baseline), ("drift_previous", previous)):
            if reference is not None and method in reference:
                drift = attention_drift(maps[method], reference[method].to(maps[method].device))
                _per_layer(out, f"{p}_{name}/{method}", drift)
                out[f"{p}_{name}/{method}/mean"] = drift.mean()
        if masks is not None:
            out[f"{p}_pointing_game/{method}"] = pointing_game(maps[method][:, -1], masks).mean()
            out[f"{p}_jaccard/{method}"] = jaccard_index(maps[method][:, -1], masks).mean()
    if artifact_threshold is not None and maps.raw is not None:
        count, share = artifact_tokens(maps.raw, artifact_threshold)
        _per_layer(out, f"{p}_artifacts/count", count)
        _per_layer(out, f"{p}_artifacts/share", share)
        if masks is not None:  # artifact tokens sit on background: the share they take outside the object
            raw = maps.raw.float().flatten(-2)
            shares = raw / raw.sum(-1, keepdim=True).clamp_min(1e-12)
            outside = 1 - pixels_to_patches(masks.to(raw.device), (maps.raw.shape[-2], maps.raw.shape[-1])).flatten(-2)
            hot = artifact_mask(maps.raw, artifact_threshold).flatten(-2)
            _per_layer(out, f"{p}_artifacts/background_share", (shares * hot * outside.unsqueeze(1)).sum(-1).mean(0))
    if registers is not None and maps.prefix_attention is not None and maps.raw is not None:
        rows = torch.cat([maps.prefix_attention, maps.raw.flatten(2)], dim=-1)
        _per_layer(out, f"{p}_register_share", register_share(rows, registers))
    if maps.attention_distance is not None:
        distance = maps.attention_distance.mean(0)  # (L, heads)
        _per_layer(out, f"{p}_distance", distance.nanmean(-1))
        counts = (~distance.isnan()).sum(-1).tolist()  # NaN pads layers with fewer heads (Swin's stages)
        for layer, heads in enumerate(distance):
            for head, value in enumerate(heads[: counts[layer]]):
                out[f"{p}_head_distance/layer_{layer:02d}/head_{head:02d}"] = value
    for method, curves in (faithfulness or {}).items():
        out[f"{p}_faithfulness/most_first_auc/{method}"] = curves.most_first_auc.mean()
        out[f"{p}_faithfulness/least_first_auc/{method}"] = curves.least_first_auc.mean()
    for curves in list((faithfulness or {}).values())[:1]:  # every map's curve starts and ends at the same scores
        # how much deleting the whole image lowers the target score: below some, no map can beat a random one
        out[f"{p}_faithfulness/score_drop/mean"] = (curves.most_first[:, 0] - curves.most_first[:, -1]).mean()
    if not out:
        return {}
    device = next(iter(out.values())).device
    values = torch.stack([v.float().reshape(()).to(device) for v in out.values()])
    return dict(zip(out, values.tolist()))  # the one device -> host copy


def scalar_layout(tags: Iterable[str]) -> dict[str, dict[str, list[str]]]:
    """Charts of the ``<section>/<chart>/<line>`` tags of :func:`scalar_report`: ``{section: {chart: [regex]}}``,
    one chart per metric and method whose regex matches each of its lines (layers, heads, methods).

    Example::

        >>> scalar_layout(["attention_entropy/raw/layer_00", "attention_entropy/raw/layer_01",
        ...                "attention_faithfulness/most_first_auc/random"])
        {'attention_entropy': {'attention_entropy/raw': ['^attention_entropy/raw/[^/]+$']}, \
'attention_faithfulness': {'attention_faithfulness/most_first_auc': ['^attention_faithfulness/most_first_auc/[^/]+$']}}
    """
    layout: dict[str, dict[str, list[str]]] = {}
    for tag in tags:
        chart = tag.rsplit("/", 1)[0]
        layout.setdefault(tag.split("/", 1)[0], {})[chart] = [f"^{re.escape(chart)}/[^/]+$"]
    return layout


def layer_series(
    history: Sequence[tuple[int, Mapping[str, float]]],
) -> dict[str, tuple[list[int], list[int], np.ndarray]]:
    """Per chart whose lines are layers, the whole run as a table: ``{chart: (layers, steps, values)}`` with
    ``values`` (layers, steps) float64, NaN where a pass did not log that layer (e.g. drift at the baseline).

    Example::

        >>> layers, steps, values = layer_series([(0, {"attention_entropy/raw/layer_00": 0.9}),
        ...     (4, {"attention_entropy/raw/layer_00": 0.8, "attention_entropy/raw/layer_01": 0.5})])[
        ...     "attention_entropy/raw"]
        >>> layers, steps, values.tolist()
        ([0, 1], [0, 4], [[0.9, 0.8], [nan, 0.5]])
    """
    steps = [step for step, _ in history]
    cells: dict[str, dict[tuple[int, int], float]] = {}
    for column, (_, metrics) in enumerate(history):
        for tag, value in metrics.items():
            chart, _, line = tag.rpartition("/")
            match = _LAYER.fullmatch(line)
            if match:
                cells.setdefault(chart, {})[(int(match.group(1)), column)] = value
    out = {}
    for chart, values in cells.items():
        layers = sorted({layer for layer, _ in values})
        table = np.full((len(layers), len(steps)), np.nan)
        for (layer, column), value in values.items():
            table[layers.index(layer), column] = value
        out[chart] = (layers, steps, table)
    return out
