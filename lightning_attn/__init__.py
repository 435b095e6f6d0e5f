"""lightning_attn: watch where each layer of a timm Vision Transformer looks while it trains."""

from .callback import AttentionMonitor
from .capture import AttentionRecorder, find_attention_modules, find_vision_transformers, record_attention
from .layout import TokenLayout, token_layout
from .maps import AttentionMaps, attention_maps
from .metrics import normalized_entropy
from .probes import Probes
from .rollout import attention_rollout, discard_weakest, fuse_heads, residual_transition

__version__ = "0.1.0"

__all__ = [
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
