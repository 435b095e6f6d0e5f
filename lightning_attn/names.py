"""The names the command line offers as choices, in a module without torch: ``lightning-attn --help`` imports only
this (the modules that compute with them re-export them)."""

from __future__ import annotations

__all__ = ["DEFAULT_COLOUR_RANGE", "METHODS", "PREDICTIONS", "QUERIES", "SCALES"]

#: Every map the monitor and the command line can draw (see :func:`lightning_attn.attention_maps`).
METHODS = ("raw", "rollout", "grad_rollout", "relevance")
#: Which token's attention row a map follows (see :class:`lightning_attn.TokenLayout`).
QUERIES = ("auto", "cls", "cls_dist", "mean")
#: How a heatmap's colour is chosen: ``"relative"`` (the default) places each patch's share of the map on one
#: logarithmic scale centred on uniform attention, the same for every tile, probe, layer and step;
#: ``"per_map"`` stretches each tile to its own min..max (to see the shape of a weak map; tiles then carry their
#: peak-to-uniform ratio).
SCALES = ("relative", "per_map")
#: The relative scale's reach: colours run from 1/R x uniform (bottom of the colormap) to R x uniform (top).
DEFAULT_COLOUR_RANGE = 16.0
#: When the rows of a grid name the model's prediction: ``"auto"`` (when it means something: the model has class
#: logits and its classifier has moved since the baseline, or the probes have labels to compare it with),
#: ``"always"`` (whenever the model has class logits) or ``"never"``.
PREDICTIONS = ("auto", "always", "never")
