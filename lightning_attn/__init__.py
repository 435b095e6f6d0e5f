"""lightning_attn: watch where each layer of a Vision Transformer (timm, Hugging Face transformers, torchvision) looks
while it trains."""

from .alerts import Alert, AlertBook, AlertThresholds
from .backends import Backend, backend_for, register_slice, supported_models, token_layout
from .callback import AttentionMonitor
from .capture import (
    AttentionRecorder,
    find_attention_modules,
    find_vision_transformers,
    record_attention,
    record_head_attention,
    stream_attention,
    supports_head_streaming,
)
from .diagnostics import (
    artifact_mask,
    artifact_tokens,
    attention_drift,
    head_query_rows,
    mean_attention_distance,
    register_share,
)
from .faithfulness import (
    PerturbationCurves,
    jaccard_index,
    perturbation_curves,
    pointing_game,
    random_perturbation_curves,
    top_mass_patches,
)
from .layout import TokenLayout, query_row
from .maps import GRADIENT_METHODS, METHODS, AttentionMaps, attention_maps
from .metrics import normalized_entropy
from .options import ProbeOptions
from .probes import Probes
from .report import layer_series, scalar_layout, scalar_report, tag_prefix
from .rollout import (
    attention_rollout,
    discard_weakest,
    fuse_heads,
    grad_rollout,
    relevance_propagation,
    residual_transition,
)
from .runner import Panel, ProbePass, ProbeRunner, redraw
from .sanity import SanityCheck, sanity_check, spearman
from .writers import (
    AttentionWriter,
    MLflowWriter,
    PNGWriter,
    TensorBoardWriter,
    WandbWriter,
    WriterSet,
    writers_for,
)

__version__ = "0.1.0"

__all__ = [
    "Alert",
    "AlertBook",
    "AlertThresholds",
    "AttentionMaps",
    "AttentionMonitor",
    "AttentionRecorder",
    "AttentionWriter",
    "Backend",
    "GRADIENT_METHODS",
    "METHODS",
    "MLflowWriter",
    "PNGWriter",
    "Panel",
    "PerturbationCurves",
    "ProbeOptions",
    "ProbePass",
    "ProbeRunner",
    "Probes",
    "SanityCheck",
    "TensorBoardWriter",
    "TokenLayout",
    "WandbWriter",
    "WriterSet",
    "artifact_mask",
    "artifact_tokens",
    "attention_drift",
    "attention_maps",
    "attention_rollout",
    "backend_for",
    "discard_weakest",
    "find_attention_modules",
    "find_vision_transformers",
    "fuse_heads",
    "grad_rollout",
    "head_query_rows",
    "jaccard_index",
    "layer_series",
    "mean_attention_distance",
    "normalized_entropy",
    "perturbation_curves",
    "pointing_game",
    "query_row",
    "random_perturbation_curves",
    "record_attention",
    "record_head_attention",
    "stream_attention",
    "redraw",
    "register_share",
    "register_slice",
    "relevance_propagation",
    "residual_transition",
    "sanity_check",
    "scalar_layout",
    "scalar_report",
    "spearman",
    "supported_models",
    "supports_head_streaming",
    "tag_prefix",
    "token_layout",
    "top_mass_patches",
    "writers_for",
]
