"""Name the scalars of one probe pass: the tags the callback logs, computed from maps already on the device.

Everything is assembled as tensors and copied to the host once, in :func:`scalar_report`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

from .diagnostics import artifact_tokens, attention_drift, register_share
from .faithfulness import PerturbationCurves, pointing_game
from .maps import AttentionMaps
from .metrics import normalized_entropy

__all__ = ["scalar_report"]


def _per_layer(out: dict[str, Tensor], prefix: str, values: Tensor) -> None:
    for layer, value in enumerate(values):
        out[f"{prefix}/layer_{layer:02d}"] = value


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
) -> dict[str, float]:
    """The scalars of one probe pass by TensorBoard tag, all means over probes.

    Tags (``XX`` = layer index, ``M`` = method):

    - ``attention/entropy/M/layer_XX``: normalised entropy of the query row over patches (0 one patch, 1 uniform).
    - ``attention/drift_baseline/M/layer_XX`` and ``.../mean``: Jensen–Shannon divergence (bits, [0, 1]) from the
      maps of the baseline pass; ``attention/drift_previous/...`` likewise from the previous logged pass.
    - ``attention/artifacts/count/layer_XX`` and ``.../share/layer_XX``: patches taking more than
      ``artifact_threshold`` x the median share of the raw query row, and the attention they take.
    - ``attention/register_share/layer_XX``: share of the raw query row going to register tokens.
    - ``attention/distance/layer_XX`` (mean over heads) and ``attention_heads/distance/layer_XX/head_YY``: mean
      attention distance in pixels.
    - ``attention/pointing_game/M``: share of the final layer's map inside the probes' object masks.
    - ``attention/faithfulness/M/{most_first_auc,least_first_auc}``: deletion AUCs of the final layer's map
      (lower / higher is more faithful); ``M = random`` is the chance level.
    """
    out: dict[str, Tensor] = {}
    for method in methods:
        if entropy:
            _per_layer(out, f"attention/entropy/{method}", normalized_entropy(maps[method]).mean(0))
        for name, reference in (("drift_baseline", baseline), ("drift_previous", previous)):
            if reference is not None and method in reference:
                drift = attention_drift(maps[method], reference[method].to(maps[method].device))
                _per_layer(out, f"attention/{name}/{method}", drift)
                out[f"attention/{name}/{method}/mean"] = drift.mean()
        if masks is not None:
            out[f"attention/pointing_game/{method}"] = pointing_game(maps[method][:, -1], masks).mean()
    if artifact_threshold is not None and maps.raw is not None:
        count, share = artifact_tokens(maps.raw, artifact_threshold)
        _per_layer(out, "attention/artifacts/count", count)
        _per_layer(out, "attention/artifacts/share", share)
    if registers is not None and maps.prefix_attention is not None and maps.raw is not None:
        rows = torch.cat([maps.prefix_attention, maps.raw.flatten(2)], dim=-1)
        _per_layer(out, "attention/register_share", register_share(rows, registers))
    if maps.attention_distance is not None:
        distance = maps.attention_distance.mean(0)  # (L, heads)
        _per_layer(out, "attention/distance", distance.mean(-1))
        for layer, heads in enumerate(distance):
            for head, value in enumerate(heads):
                out[f"attention_heads/distance/layer_{layer:02d}/head_{head:02d}"] = value
    for method, curves in (faithfulness or {}).items():
        out[f"attention/faithfulness/{method}/most_first_auc"] = curves.most_first_auc.mean()
        out[f"attention/faithfulness/{method}/least_first_auc"] = curves.least_first_auc.mean()
    if not out:
        return {}
    device = next(iter(out.values())).device
    values = torch.stack([v.float().reshape(()).to(device) for v in out.values()])
    return dict(zip(out, values.tolist()))  # the one device -> host copy
