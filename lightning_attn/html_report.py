"""One self-contained HTML page of a run's attention: a step slider, click-a-patch queries, heads and curves.

:func:`report_html` turns a :meth:`ProbeRunner.state_dict <lightning_attn.ProbeRunner.state_dict>` (the monitor's
checkpoint state, or a runner's own) into one page: the script and styles of ``lightning_attn/report_page/`` and
the data are inlined, nothing is fetched from anywhere, so the file opens from disk, in a notebook
(:meth:`ProbeRunner._repr_html_ <lightning_attn.ProbeRunner>`) and as a W&B HTML panel.

What the page holds, per recorded pass: the float16 maps of every method and layer, the per-head query rows of
``head_layers`` and, for ``report_layers``, the head-fused token x token attention of every probe (and per head for
the ``head_layers`` among them), from which the page computes a clicked patch's raw row and rollout row itself.
Colours are the static grids' (:func:`lightning_attn.render.colour_values`, :func:`~lightning_attn.render.colorize`):
by default each map as a distribution over the patches, colour position ``t = 0.5 + 0.5 * log(share * n) / log(R)``
clipped to [0, 1] (``n`` patches, ``R`` the run's ``colour_range``: uniform is mid-scale, R times uniform the top),
or with ``scale="per_map"`` each map stretched from its minimum to its maximum; the colour is the run's colormap
table at ``min(floor(256 t), 255)``, blended over the probe with the run's ``alpha``. Each patch is one block of
colour (no interpolation between patches).
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .alerts import Alert
from .render import DEFAULT_COLOUR_RANGE, colormap_lut
from .report import scalar_layout

__all__ = ["COLOUR_RANGE", "MAX_ROW_PASSES", "report_data", "report_html", "report_iframe", "row_passes"]

#: Colour range of the page's relative scale when the state names none (older checkpoints): the static grids'
#: default, :data:`lightning_attn.render.DEFAULT_COLOUR_RANGE`.
COLOUR_RANGE = DEFAULT_COLOUR_RANGE
#: The page keeps the token x token attention of at most this many passes (evenly spread): the example's 0.49 MB a
#: pass (benchmarks/bench_report.py) would make a page of 100 passes 66 MB; with 25, 18.7 MB.
MAX_ROW_PASSES = 25
#: Order of the curve charts on the page: the first word of a chart's tag (after the prefix) that starts with one.
_CHART_ORDER = ("entropy", "drift", "distance", "pointing_game", "faithfulness")


def _array(tensor: Tensor | np.ndarray) -> dict[str, Any]:
    """A float16 or uint8 array as ``{"dtype", "shape", "data"}`` (little-endian bytes in base64)."""
    values = tensor.detach().cpu().numpy() if isinstance(tensor, Tensor) else np.asarray(tensor)
    dtype = "uint8" if values.dtype == np.uint8 else "float16"
    values = np.ascontiguousarray(values.astype("<f2" if dtype == "float16" else np.uint8))
    return {"dtype": dtype, "shape": list(values.shape), "data": base64.b64encode(values.tobytes()).decode("ascii")}


def _curves(scalar_history: Sequence[tuple[int, Mapping[str, float]]], prefix: str) -> list[dict[str, Any]]:
    """The scalar history as charts (one per metric and method, as TensorBoard's layout draws them)."""
    series: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for step, scalars in scalar_history:
        for tag, value in scalars.items():
            chart, _, line = tag.rpartition("/")
            steps, values = series.setdefault(chart, {}).setdefault(line, ([], []))
            steps.append(int(step))
            values.append(float(value))
    charts = [chart for section in scalar_layout([f"{c}/x" for c in series]).values() for chart in section]
    charts = [c for c in charts if not c.startswith(f"{prefix}_head_distance")]  # a chart per layer: too many

    def rank(chart: str) -> tuple[int, str]:
        metric = chart[len(prefix) + 1 :]
        return next((i for i, word in enumerate(_CHART_ORDER) if metric.startswith(word)), len(_CHART_ORDER)), chart

    return [
        {"title": chart, "lines": [{"name": n, "steps": s, "values": v} for n, (s, v) in series[chart].items()]}
        for chart in sorted(charts, key=rank)
    ]


def _logged_passes(state: Mapping[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The passes and how to read them: the report's own, else (an older checkpoint) the final-layer maps of the
    history, which is what was logged."""
    report = state.get("report")
    if report:
        meta = dict(state.get("report_meta") or {})
        return list(report), meta
    method = state.get("film_method", "rollout")
    passes: list[dict[str, Any]] = [
        {"step": int(step), "maps": {method: maps[:, None]}} for step, maps in state.get("history") or []
    ]
    if not passes:
        raise ValueError("the monitor's state holds no logged pass: nothing to report")
    gh, gw = passes[0]["maps"][method].shape[-2:]
    meta = {"methods": [method], "grid_size": [int(gh), int(gw)], "layer_names": ["final layer"], "layers": []}
    return passes, meta


def row_passes(count: int, most: int | None = MAX_ROW_PASSES) -> list[int]:
    """Which of ``count`` passes keep their token x token attention in the page: at most ``most``, evenly spread,
    the first and the last among them (all for None).

    Example::

        >>> row_passes(7), row_passes(100, 5)
        ([0, 1, 2, 3, 4, 5, 6], [0, 25, 50, 74, 99])
    """
    if most is None or count <= most:
        return list(range(count))
    if most < 2:
        return [count - 1][:most]
    return sorted({round(i * (count - 1) / (most - 1)) for i in range(most)})


def report_data(
    state: Mapping[str, Any],
    alerts: Sequence[Alert | Mapping[str, Any]] = (),
    title: str = "attention report",
    max_row_passes: int | None = MAX_ROW_PASSES,
) -> dict[str, Any]:
    """What :func:`report_html` puts in the page, as JSON-ready values (arrays in base64).

    Args:
        state: a :meth:`~lightning_attn.ProbeRunner.state_dict` (the ``"runner"`` entry of the monitor's
            checkpoint state).
        alerts: the alerts that fired (:attr:`AttentionMonitor.alerts <lightning_attn.AttentionMonitor.alerts>`
            or their ``to_dict()``), marked on the curves.
        title: the page's title.
        max_row_passes: the token x token attention (what a click on a patch reads) of at most this many passes
            goes into the page, evenly spread (see :func:`row_passes`); the maps of every pass do. None: every pass.

    Raises:
        ValueError: the state holds no pass, or no probe pixels (a checkpoint of lightning-attn before format 2).
    """
    display = state.get("display")
    if display is None:
        raise ValueError(
            "this monitor state keeps no probe pixels (written by lightning-attn before format 2): run a pass with "
            "the model (`lightning-attn report MODEL IMAGES -o report.html`)"
        )
    passes, meta = _logged_passes(state)
    methods = [m for m in meta.get("methods", []) if m in passes[0]["maps"]] or list(passes[0]["maps"])
    num_layers = int(passes[0]["maps"][methods[0]].shape[1])
    meta.setdefault("layer_names", [f"L{layer}" for layer in range(num_layers)])
    gh, gw = (int(v) for v in passes[0]["maps"][methods[0]].shape[-2:])
    meta.update(methods=methods, grid_size=[gh, gw])
    render = state.get("render") or {}
    prefix = state.get("prefix", "attention")
    labels = state.get("labels")

    # a long run's state keeps the rows of some passes only (runner.REPORT_ROW_PASSES): pick among those
    candidates = [i for i, p in enumerate(passes) if p.get("matrices") or p.get("head_matrices")]
    with_rows = {candidates[i] for i in row_passes(len(candidates), max_row_passes)}

    def entry(index: int, p: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"step": int(p["step"])}
        for kind in ("maps", "heads", "matrices", "head_matrices"):
            if kind in ("matrices", "head_matrices") and index not in with_rows:
                out[kind] = {}
                continue
            out[kind] = {str(k): _array(v) for k, v in (p.get(kind) or {}).items()}
        predicted = p.get("predicted")
        out["predicted"] = None if predicted is None else [int(v) for v in predicted]
        return out

    lut = colormap_lut(render.get("cmap", "jet"))
    found = [a.to_dict() if isinstance(a, Alert) else dict(a) for a in alerts]
    return {
        "title": title,
        "prefix": prefix,
        "meta": meta,
        "probes": {
            "pixels": _array(display.to(torch.uint8) if isinstance(display, Tensor) else display),
            "labels": None if labels is None else [int(v) for v in labels],
        },
        "passes": [entry(i, p) for i, p in enumerate(passes)],
        "curves": _curves(state.get("scalar_history") or [], prefix),
        "alerts": [{k: a.get(k) for k in ("rule", "step", "layers", "probes", "curve", "message")} for a in found],
        "colour": {
            "lut": [[round(float(c), 6) for c in row] for row in lut.tolist()],
            "cmap": render.get("cmap", "jet"),
            "range": float(render.get("colour_range", COLOUR_RANGE)),
            "alpha": float(render.get("alpha", 0.5)),
            "scale": str(render.get("scale", "relative")),
        },
    }


def _asset(name: str) -> str:
    return (resources.files("lightning_attn") / "report_page" / name).read_text(encoding="utf-8")


def report_html(
    state: Mapping[str, Any],
    alerts: Sequence[Alert | Mapping[str, Any]] = (),
    title: str = "attention report",
    max_row_passes: int | None = MAX_ROW_PASSES,
) -> str:
    """The interactive report of a run as one self-contained HTML page (scripts, styles and data inline).

    In the page: a step slider with a play button moving every panel; method, layer, probe and colour-scale
    selectors; each map drawn on its probe; a click on a patch makes it the query (its raw attention row, or its
    rollout row, at the chosen layer and step) and "class query" goes back; one tile per head of the chosen layer;
    the curves with a marker at the current step and the alerts where they fired. The URL's hash holds the view
    (``#step=..&method=..&layer=..&probe=..&query=..``). Arguments as :func:`report_data`.

    Example::

        >>> import timm, torch
        >>> from lightning_attn import ProbeOptions, ProbeRunner, Probes
        >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)
        >>> runner = ProbeRunner(vit, Probes(torch.randn(2, 3, 32, 32)), ProbeOptions(tile_size=16))
        >>> _ = runner.run(step=0)
        >>> page = report_html(runner.state_dict())
        >>> page.startswith("<!doctype html>"), "http" in page.replace("http-equiv", "")
        (True, False)
    """
    data = json.dumps(report_data(state, alerts, title, max_row_passes), separators=(",", ":"))
    # inside <script>, "</" would end the element early; "<\\/" reads the same to JSON.parse
    data = data.replace("</", "<\\/")
    return (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>\n<style>{_asset('report.css')}</style></head>\n<body>\n"
        f"{_asset('report.html')}\n"
        f"<script type='application/json' id='la-data'>{data}</script>\n"
        f"<script>{_asset('report.js')}</script>\n</body></html>\n"
    )


def report_iframe(page: str, height: int = 900) -> str:
    """``page`` in an ``<iframe srcdoc>``: how a notebook shows it (its script and styles stay inside the frame).

    Example::

        >>> report_iframe("<p>hi</p>", height=100)[:63]
        '<iframe srcdoc="&lt;p&gt;hi&lt;/p&gt;" style="width:100%;height'
    """
    return (
        f'<iframe srcdoc="{html.escape(page, quote=True)}" style="width:100%;height:{int(height)}px;border:0" '
        'sandbox="allow-scripts"></iframe>'
    )
