"""lightning_attn: watch where each layer of a timm Vision Transformer looks while it trains."""

from .callback import AttentionMonitor
from .capture import AttentionRecorder, find_attention_modules, find_vision_transformers, record_attention
from .layout import TokenLayout, token_layout
from .faithfulness import PerturbationCurves, perturbation_curves, pointing_game, random_perturbation_curves
from .maps import GRADIENT_METHODS, METHODS, AttentionMaps, attention_maps
from .metrics import normalized_entropy
from .probes import Probes
from .rollout import (
    attention_rollout,
    discard_weakest,
    fuse_heads,
    grad_rollout,
    relevance_propagation,
    residual_transition,
)

__version__ = "0.1.0"

__all__ = [
    "GRADIENT_METHODS",
    "METHODS",
    "PerturbationCurves",
    "grad_rollout",
    "perturbation_curves",
    "pointing_game",
    "random_perturbation_curves",
    "relevance_propagation",
    "AttentionMaps",
    "AttentionMonitor",
    "AttentionRecorder",
    "TokenLayout",
    "attention_maps",
    "attention_rollout",
    "discard_weakest",
    "find_attention_modules",
    "find_vision_transformers",
    "fuse_heads",
    "normalized_entropy",
    "Probes",
    "record_attention",
    "residual_transition",
    "token_layout",
]
