"""torchvision ViTs (``vit_b_16``, ``vit_b_32``, ``vit_l_16``, ``vit_l_32``, ``vit_h_14``: ``VisionTransformer``),
whose blocks call ``nn.MultiheadAttention(x, x, x, need_weights=False)``.

Head streaming rebuilds each head's softmax from the layer's own input and ``in_proj`` weights in a forward
pre-hook, leaving the call (and its fused kernel) untouched. For the gradient methods a forward hook recomputes
the layer's attention in the autograd graph and returns that output in place of the kernel's, so the weights
handed over are the ones the rest of the forward depends on (the kernel's own weights are a view autograd cannot
differentiate with respect to).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layout import TokenLayout
from .base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backend,
    EmitAttention,
    EmitHeads,
    Undo,
    additive_bias,
    stream_softmax,
)

__all__ = ["TorchvisionBackend"]

# nn.MultiheadAttention.forward(query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
# is_causal): where each argument sits when passed by position
_POSITION = {"key_padding_mask": 3, "attn_mask": 5, "is_causal": 7}


def _argument(name: str, args: tuple, kwargs: dict, default: Any = None) -> Any:
    if name in kwargs:
        return kwargs[name]
    position = _POSITION[name]
    return args[position] if len(args) > position else default


def _check_mha(module: nn.MultiheadAttention) -> None:
    if module.bias_k is not None or module.add_zero_attn:
        raise ValueError(
            "nn.MultiheadAttention with `add_bias_kv=True` or `add_zero_attn=True` adds tokens the attention map "
            "has no patch for: lightning_attn supports plain self-attention layers"
        )


def _projections(module: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor | None) -> list[Tensor]:
    """q, k (and v) as (B, heads, N, head_dim), from the layer's own weights."""
    e, heads = module.embed_dim, module.num_heads
    if module._qkv_same_embed_dim:
        weights = module.in_proj_weight.split(e)
    else:
        weights = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
    biases = module.in_proj_bias.split(e) if module.in_proj_bias is not None else (None, None, None)
    out = []
    for x, w, b in zip((query, key, value), weights, biases):
        if x is None:
            continue
        if not module.batch_first:
            x = x.transpose(0, 1)
        y = F.linear(x, w, b)
        out.append(y.reshape(y.shape[0], y.shape[1], heads, -1).transpose(1, 2))
    return out


def _bias(
    module: nn.MultiheadAttention, args: tuple, kwargs: dict, batch: int, n_q: int, n_k: int, like: Tensor
) -> Callable[[int, int], Tensor | None]:
    attn_mask = _argument("attn_mask", args, kwargs)
    padding = _argument("key_padding_mask", args, kwargs)
    causal = bool(_argument("is_causal", args, kwargs, False)) and attn_mask is None
    if attn_mask is not None and attn_mask.dim() == 3:  # (B * heads, L, S)
        attn_mask = attn_mask.reshape(batch, module.num_heads, n_q, n_k)
    if padding is not None:
        padding = padding[:, None, None, :]  # (B, 1, 1, S): True (or -inf) = ignore that key

    def bias(h0: int, h1: int) -> Tensor | None:
        total = additive_bias(attn_mask, slice(h0, h1), n_q, n_k, causal, like, true_means_keep=False)
        extra = additive_bias(padding, slice(h0, h1), n_q, n_k, False, like, true_means_keep=False)
        if extra is None:
            return total
        return extra if total is None else total + extra

    return bias


class TorchvisionBackend(Backend):
    name = "torchvision"
    supported = "torchvision VisionTransformer (vit_b_16, vit_b_32, vit_l_16, vit_l_32, vit_h_14)"

    # ------------------------------------------------------------------ layers

    @classmethod
    def is_attention_layer(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.MultiheadAttention)

    @classmethod
    def attach_recording(cls, module: nn.Module, emit: EmitAttention, undo: Undo) -> None:
        _check_mha(module)

        def recompute(mod: nn.Module, args: tuple, kwargs: dict, output: tuple) -> tuple:
            query = args[0] if args else kwargs["query"]
            key = args[1] if len(args) > 1 else kwargs["key"]
            value = args[2] if len(args) > 2 else kwargs["value"]
            q, k, v = _projections(mod, query, key, value)
            bias = _bias(mod, args, kwargs, q.shape[0], q.shape[2], k.shape[2], q)
            scores = (q * (q.shape[-1] ** -0.5)) @ k.transpose(-2, -1)
            mask = bias(0, mod.num_heads)
            if mask is not None:
                scores = scores + mask.to(scores.dtype)
            weights = scores.softmax(dim=-1)
            emit(mod, weights)
            used = F.dropout(weights, p=mod.dropout, training=mod.training)
            merged = (used @ v).transpose(1, 2).reshape(q.shape[0], q.shape[2], mod.embed_dim)
            out = mod.out_proj(merged)
            if not mod.batch_first:
                out = out.transpose(0, 1)
            return (out, *output[1:])

        undo.append(module.register_forward_hook(recompute, with_kwargs=True).remove)

    @classmethod
    def can_stream_heads(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.MultiheadAttention) and module.bias_k is None and not module.add_zero_attn

    @classmethod
    def attach_head_stream(
        cls, module: nn.Module, emit: EmitHeads, undo: Undo, budget: int, cache_bytes: int | None = None
    ) -> None:
        _check_mha(module)

        def stream(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            query = args[0] if args else kwargs["query"]
            key = args[1] if len(args) > 1 else kwargs["key"]
            with torch.no_grad():
                q, k = _projections(mod, query, key, None)
            bias = _bias(mod, args, kwargs, q.shape[0], q.shape[2], k.shape[2], q)
            stream_softmax(q, k, q.shape[-1] ** -0.5, bias, lambda c, a: emit(mod, c, a), budget, None, cache_bytes)

        undo.append(module.register_forward_pre_hook(stream, with_kwargs=True).remove)

    # ------------------------------------------------------------------ models

    @classmethod
    def recognises(cls, module: nn.Module) -> bool:
        return type(module).__name__ == "VisionTransformer" and type(module).__module__.startswith("torchvision.")

    def attention_layers(self) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in self.model.encoder.named_modules(prefix="encoder") if self.is_attention_layer(m)]

    def layout(self, image_size: tuple[int, int], query: str = "auto") -> TokenLayout:
        self._check_query(query, True)
        if query == "cls_dist":
            raise ValueError(
                "`query='cls_dist'` needs a distillation token; torchvision's VisionTransformer has none: use "
                "query='auto' (the token its head reads) or 'cls'"
            )
        p = self.model.patch_size
        # the head reads the class token (x[:, 0])
        return TokenLayout(1, (image_size[0] // p, image_size[1] // p), "cls" if query == "auto" else query, (p, p))

    def input_size(self) -> tuple[int, int] | None:
        return self.model.image_size, self.model.image_size

    def check_images(self, images: Tensor) -> None:
        conv = next(m for m in self.model.modules() if isinstance(m, nn.Conv2d))
        if images.shape[1] != conv.in_channels:
            raise ValueError(
                f"`images` have {images.shape[1]} channels but VisionTransformer expects {conv.in_channels}: "
                f"preprocess them to (B, {conv.in_channels}, H, W) like the training inputs"
            )
        size = self.model.image_size
        if tuple(images.shape[-2:]) != (size, size):
            raise ValueError(
                f"images are {images.shape[-2]}x{images.shape[-1]} but torchvision's VisionTransformer takes only "
                f"{size}x{size} inputs: resize them"
            )

    def display_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return IMAGENET_MEAN, IMAGENET_STD

    def transform(self) -> Callable[[Any], Tensor]:
        from torchvision import transforms

        size = self.model.image_size
        # the ImageNet weights' own recipe: resize the short side to size * 256 / 224, centre crop
        return transforms.Compose(
            [
                transforms.Resize(round(size * 256 / 224)),
                transforms.CenterCrop(size),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    @property
    def has_class_logits(self) -> bool:
        return True

    @property
    def num_classes(self) -> int | None:
        linear = [m for m in self.model.heads.modules() if isinstance(m, nn.Linear)]
        return linear[-1].out_features if linear else None

    def class_logits(self, output: Any) -> Tensor | None:
        return output if isinstance(output, Tensor) and output.dim() == 2 else None
