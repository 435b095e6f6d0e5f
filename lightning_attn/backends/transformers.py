"""Hugging Face transformers ViTs: ViT, DeiT (with teacher too), DINOv2 (with registers too), CLIP and SigLIP vision
towers, alone or inside ``CLIPModel`` / ``SiglipModel``.

Under the default ``sdpa`` implementation ``output_attentions=True`` returns nothing, and switching to ``eager``
with ``output_attentions`` adds capture hooks on transformers 5.x. Instead, every attention layer of these
families calls its kernel through ``transformers.AttentionInterface``: for the probe pass the layers' configs name
a function registered here (``"lightning_attn"``), which rebuilds the softmax weights in float32 from the q and
k it is handed and then calls the model's own kernel (sdpa, eager or flash) with the very same arguments, so the
outputs are bitwise those of a plain forward; for the gradient methods it computes the eager attention in the
autograd graph and hands over the weights it used. The configs' ``_attn_implementation`` are restored on exit.
"""

from __future__ import annotations

import inspect
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..layout import TokenLayout
from .base import (
    Backend,
    EmitAttention,
    EmitHeads,
    Undo,
    additive_bias,
    stream_softmax,
    to_pair,
)

__all__ = ["TransformersBackend"]

IMPLEMENTATION = "lightning_attn"

# model_type -> (display mean, std): the families' own image processors' defaults
_STANDARD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
FAMILIES = {
    "vit": _STANDARD,
    "deit": _STANDARD,
    "dinov2": _IMAGENET,
    "dinov2_with_registers": _IMAGENET,
    "clip": _CLIP,
    "clip_vision_model": _CLIP,
    "siglip": _STANDARD,
    "siglip_vision_model": _STANDARD,
}

# id(attention module) -> what the registered function does for it during a recording
_HANDLERS: dict[int, Callable[..., Any]] = {}
# id(config) -> its attention implementation before the recording switched it
_ORIGINAL: dict[int, str | None] = {}
_registered = False


def _dispatch(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    *args: Any,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    handler = _HANDLERS.get(id(module))
    if handler is None:  # a layer nobody records, whose config was switched for a sibling: its own kernel
        handler = _original_kernel(module, _ORIGINAL.get(id(module.config), "sdpa"))
    return handler(module, query, key, value, attention_mask, *args, **kwargs)


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(IMPLEMENTATION, _dispatch)
        _registered = True


def _is_transformers(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformers.")


def _is_pretrained_model(module: nn.Module) -> bool:
    if not _is_transformers(module):
        return False
    from transformers import PreTrainedModel  # already imported: the module's class comes from it

    return isinstance(module, PreTrainedModel)


def _original_kernel(module: nn.Module, name: str | None) -> Callable[..., Any]:
    """The function ``module`` calls under its own implementation ``name``."""
    if name in (None, "eager"):
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise ValueError(f"{type(module).__name__} has no `eager_attention_forward` to restore the eager path with")
        return eager
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[name.removeprefix("paged|")]


def _switch(module: nn.Module, undo: Undo) -> Callable[..., Any]:
    """Point ``module``'s config at the registered function for this recording; return its own kernel."""
    _register()
    config = module.config
    if getattr(config, "_attn_implementation_internal", None) != IMPLEMENTATION:
        _ORIGINAL[id(config)] = getattr(config, "_attn_implementation_internal", None)
        original = _ORIGINAL[id(config)]
        # the private field, not the setter: the setter also rewrites sub-configs and checks availability
        config._attn_implementation_internal = IMPLEMENTATION

        def restore() -> None:
            config._attn_implementation_internal = original
            _ORIGINAL.pop(id(config), None)

        undo.append(restore)
    return _original_kernel(module, _ORIGINAL[id(config)])


def _scaling(query: Tensor, kwargs: dict[str, Any]) -> float:
    scaling = kwargs.get("scaling")
    return query.shape[-1] ** -0.5 if scaling is None else float(scaling)


def _embeddings(model: nn.Module) -> tuple[nn.Module, nn.Conv2d] | None:
    """The vision embeddings module and its patch convolution."""
    for module in model.modules():
        if type(module).__name__.endswith("Embeddings") and _is_transformers(module):
            conv = next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)
            if conv is not None:
                return module, conv
    return None


def _vision_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    return getattr(config, "vision_config", None) or config


class TransformersBackend(Backend):
    name = "transformers"
    supported = (
        "Hugging Face transformers ViT, DeiT (with teacher too), DINOv2 (with registers too), CLIP and SigLIP vision "
        "models, alone or inside CLIPModel / SiglipModel"
    )

    # ------------------------------------------------------------------ layers

    @classmethod
    def is_attention_layer(cls, module: nn.Module) -> bool:
        if not _is_transformers(module) or not type(module).__name__.endswith("Attention"):
            return False
        projections = (hasattr(module, "q_proj") and hasattr(module, "k_proj")) or (
            hasattr(module, "query") and hasattr(module, "key")  # 4.x ViTSelfAttention
        )
        # vision layers only: a CLIPModel's text tower has the same attention class
        config = getattr(module, "config", None)
        return projections and hasattr(config, "patch_size") and hasattr(config, "image_size")

    @classmethod
    def attach_recording(cls, module: nn.Module, emit: EmitAttention, undo: Undo) -> None:
        _switch(module, undo)

        def eager_in_graph(
            mod: nn.Module, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, *args: Any, **kwargs: Any
        ) -> tuple[Tensor, Tensor]:
            # the eager computation itself, so the weights handed over are the ones the output depends on
            heads = query.shape[1]
            if key.shape[1] != heads:
                key = key.repeat_interleave(heads // key.shape[1], dim=1)
                value = value.repeat_interleave(heads // value.shape[1], dim=1)
            scores = torch.matmul(query, key.transpose(2, 3)) * _scaling(query, kwargs)
            if mask is not None:
                if mask.dtype == torch.bool:
                    mask = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device).masked_fill(
                        ~mask, float("-inf")
                    )
                scores = scores + mask[..., : key.shape[-2]]
            weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
            emit(mod, weights)
            used = nn.functional.dropout(weights, p=float(kwargs.get("dropout", 0.0) or 0.0), training=mod.training)
            return torch.matmul(used, value).transpose(1, 2).contiguous(), weights

        _HANDLERS[id(module)] = eager_in_graph
        undo.append(lambda: _HANDLERS.pop(id(module), None))

    @classmethod
    def can_stream_heads(cls, module: nn.Module) -> bool:
        return True

    @classmethod
    def attach_head_stream(
        cls, module: nn.Module, emit: EmitHeads, undo: Undo, budget: int, cache_bytes: int | None = None
    ) -> None:
        kernel = _switch(module, undo)

        def stream_then_kernel(
            mod: nn.Module, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, *args: Any, **kwargs: Any
        ) -> Any:
            n_q, n_k = query.shape[-2], key.shape[-2]
            causal = bool(kwargs.get("is_causal", False))

            def bias(h0: int, h1: int) -> Tensor | None:
                return additive_bias(None if mask is None else mask[..., :n_k], slice(h0, h1), n_q, n_k, causal, query)

            dropout = float(kwargs.get("dropout", 0.0) or 0.0) if mod.training else 0.0
            out = stream_softmax(
                query,
                key,
                _scaling(query, kwargs),
                bias,
                lambda c, a: emit(mod, c, a),
                budget,
                value if dropout == 0.0 else None,
                cache_bytes,
            )
            if out is not None:  # the eager computation from the weights, in the layout kernels return
                return out.transpose(1, 2).contiguous(), None
            # the model's own kernel with exactly its arguments: outputs bitwise those of a plain forward
            return kernel(mod, query, key, value, mask, *args, **kwargs)

        _HANDLERS[id(module)] = stream_then_kernel
        undo.append(lambda: _HANDLERS.pop(id(module), None))

    # ------------------------------------------------------------------ models

    @classmethod
    def recognises(cls, module: nn.Module) -> bool:
        if not _is_pretrained_model(module):
            return False
        config = module.config
        if getattr(config, "vision_config", None) is not None:
            return getattr(config.vision_config, "model_type", None) in FAMILIES and hasattr(
                module, "get_image_features"
            )
        return getattr(config, "model_type", None) in FAMILIES and _embeddings(module) is not None

    @classmethod
    def unsupported_model(cls, module: nn.Module) -> str | None:
        if not _is_pretrained_model(module) or cls.recognises(module):
            return None
        model_type = getattr(_vision_config(module), "model_type", None)
        if not hasattr(_vision_config(module), "patch_size"):
            return None  # not a vision model at all
        return (
            f"transformers {type(module).__name__} (model_type {model_type!r}) is not among the verified families "
            f"{sorted(FAMILIES)}"
        )

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.config = _vision_config(model)
        self._composite = getattr(model.config, "vision_config", None) is not None
        found = _embeddings(model)
        assert found is not None, "recognises() checked the embeddings"
        self._embeddings, self._conv = found
        self._params = inspect.signature(model.get_image_features if self._composite else model.forward).parameters

    def attention_layers(self) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in self.model.named_modules() if self.is_attention_layer(m)]

    def _prefix(self) -> tuple[int, int, int]:
        """(class tokens, distillation tokens, registers) in the order the embeddings concatenate them."""
        emb = self._embeddings
        has_cls = isinstance(getattr(emb, "cls_token", None), Tensor) or isinstance(
            getattr(emb, "class_embedding", None), Tensor
        )
        has_dist = isinstance(getattr(emb, "distillation_token", None), Tensor)
        registers = getattr(emb, "register_tokens", None)
        return int(has_cls), int(has_dist), registers.shape[1] if isinstance(registers, Tensor) else 0

    def layout(self, image_size: tuple[int, int], query: str = "auto") -> TokenLayout:
        cls_tokens, dist_tokens, registers = self._prefix()
        self._check_query(query, bool(cls_tokens))
        if query == "cls_dist" and not dist_tokens:
            raise ValueError(
                f"`query='cls_dist'` needs a distillation token; {type(self.model).__name__} has none: use "
                "query='auto' (the token its head reads) or 'cls'"
            )
        if query == "auto":
            if not cls_tokens:
                query = "mean"  # SigLIP pools every patch with an attention head
            elif "WithTeacher" in type(self.model).__name__:
                query = "cls_dist"  # the logits average the class and distillation heads
            else:
                # ViT, DeiT, CLIP and DINOv2 read the class token (DINOv2's classifier also the patch mean)
                query = "cls"
        ph, pw = to_pair(self._conv.kernel_size)
        sh, sw = to_pair(self._conv.stride)
        h, w = image_size
        grid = ((h - ph) // sh + 1, (w - pw) // sw + 1)
        return TokenLayout(cls_tokens + dist_tokens + registers, grid, query, (sh, sw), registers)

    def _interpolates(self) -> bool:
        return "interpolate_pos_encoding" in self._params

    def input_size(self) -> tuple[int, int] | None:
        return to_pair(self.config.image_size)

    def check_images(self, images: Tensor) -> None:
        channels = self._conv.in_channels
        if images.shape[1] != channels:
            raise ValueError(
                f"`images` have {images.shape[1]} channels but {type(self.model).__name__} expects {channels}: "
                f"preprocess them to (B, {channels}, H, W) like the training inputs"
            )
        size = to_pair(self.config.image_size)
        dinov2 = getattr(self.config, "model_type", "").startswith("dinov2")  # always interpolates
        if tuple(images.shape[-2:]) != size and not (dinov2 or self._interpolates()):
            raise ValueError(
                f"images are {images.shape[-2]}x{images.shape[-1]} but {type(self.model).__name__} takes "
                f"{size[0]}x{size[1]} inputs and cannot interpolate its position embeddings: resize them"
            )

    def display_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        saved = self._preprocessor_config()
        if saved and "image_mean" in saved and "image_std" in saved:
            return tuple(map(float, saved["image_mean"])), tuple(map(float, saved["image_std"]))
        mean, std = FAMILIES.get(getattr(self.config, "model_type", ""), _STANDARD)
        return mean, std

    def _preprocessor_config(self) -> dict[str, Any] | None:
        """The image processor settings saved beside a model loaded from a local directory, if any."""
        path = Path(str(getattr(self.model, "name_or_path", "") or "")) / "preprocessor_config.json"
        try:
            return json.loads(path.read_text()) if path.is_file() else None
        except (OSError, ValueError):
            return None

    def transform(self) -> Callable[[Any], Tensor]:
        from torchvision import transforms

        mean, std = self.display_stats()
        size = to_pair(self.config.image_size)
        return transforms.Compose([transforms.Resize(size), transforms.ToTensor(), transforms.Normalize(mean, std)])

    def forward(self, images: Tensor) -> Any:
        kwargs: dict[str, Any] = {}
        if self._interpolates() and tuple(images.shape[-2:]) != to_pair(self.config.image_size):
            kwargs["interpolate_pos_encoding"] = True  # the grid of the actual input
        if self._composite:
            # CLIPModel / SiglipModel: the image tower alone; its projected embedding (B, D), whatever the version
            out = self.model.get_image_features(pixel_values=images, **kwargs)
            return out if isinstance(out, Tensor) else out.pooler_output
        return self.model(pixel_values=images, **kwargs)

    @property
    def has_class_logits(self) -> bool:
        return "ForImageClassification" in type(self.model).__name__

    @property
    def num_classes(self) -> int | None:
        return int(self.model.config.num_labels) if self.has_class_logits else None

    def class_logits(self, output: Any) -> Tensor | None:
        if not self.has_class_logits:
            return None
        logits = getattr(output, "logits", None)
        if logits is None and isinstance(output, (tuple, list)) and output:
            logits = output[0]
        return logits if isinstance(logits, Tensor) else None
