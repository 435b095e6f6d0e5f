"""lightning_attn: watch where each layer of a Vision Transformer (timm, Hugging Face transformers, torchvision) looks
while it trains."""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and documentation tools read; at run time, imported on first use
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
    from .html_report import report_html
    from .layout import TokenLayout, WindowGrid, query_row
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

# `lightning-attn --help` (and anything importing one module) must not pay for torch and Lightning: each name is
# imported from its module the first time it is used (PEP 562)
_EXPORTS = {
    "Alert": "alerts",
    "AlertBook": "alerts",
    "AlertThresholds": "alerts",
    "Backend": "backends",
    "backend_for": "backends",
    "register_slice": "backends",
    "supported_models": "backends",
    "token_layout": "backends",
    "AttentionMonitor": "callback",
    "AttentionRecorder": "capture",
    "find_attention_modules": "capture",
    "find_vision_transformers": "capture",
    "record_attention": "capture",
    "record_head_attention": "capture",
    "stream_attention": "capture",
    "supports_head_streaming": "capture",
    "artifact_mask": "diagnostics",
    "artifact_tokens": "diagnostics",
    "attention_drift": "diagnostics",
    "head_query_rows": "diagnostics",
    "mean_attention_distance": "diagnostics",
    "register_share": "diagnostics",
    "PerturbationCurves": "faithfulness",
    "perturbation_curves": "faithfulness",
    "pointing_game": "faithfulness",
    "random_perturbation_curves": "faithfulness",
    "jaccard_index": "faithfulness",
    "top_mass_patches": "faithfulness",
    "SanityCheck": "sanity",
    "sanity_check": "sanity",
    "spearman": "sanity",
    "report_html": "html_report",
    "TokenLayout": "layout",
    "WindowGrid": "layout",
    "query_row": "layout",
    "GRADIENT_METHODS": "maps",
    "METHODS": "maps",
    "AttentionMaps": "maps",
    "attention_maps": "maps",
    "normalized_entropy": "metrics",
    "ProbeOptions": "options",
    "Probes": "probes",
    "layer_series": "report",
    "scalar_layout": "report",
    "scalar_report": "report",
    "tag_prefix": "report",
    "attention_rollout": "rollout",
    "discard_weakest": "rollout",
    "fuse_heads": "rollout",
    "grad_rollout": "rollout",
    "relevance_propagation": "rollout",
    "residual_transition": "rollout",
    "Panel": "runner",
    "ProbePass": "runner",
    "ProbeRunner": "runner",
    "redraw": "runner",
    "AttentionWriter": "writers",
    "MLflowWriter": "writers",
    "PNGWriter": "writers",
    "TensorBoardWriter": "writers",
    "WandbWriter": "writers",
    "WriterSet": "writers",
    "writers_for": "writers",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_attn' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


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
    "WindowGrid",
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
    "report_html",
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
