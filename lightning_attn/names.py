"""The names the command line offers as choices, in a module without torch: ``lightning-attn --help`` imports only
this (the modules that compute with them re-export them)."""

from __future__ import annotations

__all__ = ["METHODS", "QUERIES"]

#: Every map the monitor and the command line can draw (see :func:`lightning_attn.attention_maps`).
METHODS = ("raw", "rollout", "grad_rollout", "relevance")
#: Which token's attention row a map follows (see :class:`lightning_attn.TokenLayout`).
QUERIES = ("auto", "cls", "cls_dist", "mean")
