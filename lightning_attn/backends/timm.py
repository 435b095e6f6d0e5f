"""timm ViTs: ``VisionTransformer`` (vit_*, deit*, deit3, dinov2, clip, siglip, flexivit, hybrids), ``Eva`` (eva02)
and ``Beit``.

timm attention modules compute the softmax matrix by hand and pass it through ``attn_drop`` only when
``fused_attn`` is False; by default they call ``F.scaled_dot_product_attention`` and the matrix never exists. So
recording (in the autograd graph, for the gradient methods) switches ``fused_attn`` off on the hooked layers only
and hooks ``attn_drop``. Streaming keeps ``fused_attn`` on and takes the layer's own call of
``scaled_dot_product_attention`` (a torch function mode active only while the layer runs): its q and k are the
ones after q/k norms and EVA's rotary embeddings, its mask BEiT's relative position bias, so the weights rebuilt
from them are exactly the kernel's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..layout import TokenLayout
from .base import (
    Backend,
    EmitAttention,
    EmitHeads,
    Undo,
    additive_bias,
    stream_softmax,
    take_calls,
    to_pair,
)

__all__ = ["TimmBackend"]

# timm layers that follow the `fused_attn`/`attn_drop` pattern but are not token self-attention, so rollout over a
# token sequence does not apply to them; keyed by class name, the reason goes into the error message.
NOT_TOKEN_SELF_ATTENTION = {
    # inside a Swin model the timm_swin backend reads it with the model's windows; alone it has no token grid
    "WindowAttention": "Swin window attention outside a Swin model (its windows need the model's stages)",
    "XCA": "XCiT cross-covariance attention (over channels, not tokens)",
    "ClassAttn": "CaiT/XCiT class attention (a single class query over the patches)",
    "TalkingHeadAttn": "CaiT talking-heads attention (heads mixed after the softmax)",
}

# timm model classes whose token sequence is [prefix tokens][patches row-major] through every block, by module
SUPPORTED_MODELS = {
    "timm.models.vision_transformer": ("VisionTransformer",),
    "timm.models.deit": ("VisionTransformerDistilled",),
    "timm.models.eva": ("Eva",),
    "timm.models.beit": ("Beit",),
}

# why other timm transformers cannot be watched, by class name (what the setup error says)
UNSUPPORTED_MODELS = {
    "PoolingVisionTransformer": "PiT pools tokens between stages: no fixed token grid through the layers",
    "CrossVit": "CrossViT runs two token branches of different patch sizes with cross attention",
    "NaFlexVit": "NaFlexViT packs variable-resolution patches, without a fixed grid",
    "MaxxVit": "MaxViT uses block and grid window attention, not global token self-attention",
    "MaxxVitCfg": "MaxViT uses block and grid window attention",
    "Twins": "Twins uses locally grouped and sub-sampled attention, not global token self-attention",
    "Xcit": "XCiT attends over channels, not tokens",
    "Cait": "CaiT mixes heads after the softmax and adds class attention",
    "VisionTransformerRelPos": "relative-position ViTs hide the position bias from the softmax hooks",
    "VisionTransformerSAM": "SAM's ViT uses windowed attention in most blocks",
}


# attention classes whose fused path is one `F.scaled_dot_product_attention(q, k, v, attn_mask, ...)` call carrying
# every term of the logits (q/k norms, rotary embeddings and relative position bias already applied): (module, class)
STREAMABLE = {
    ("timm.layers.attention", "Attention"),
    ("timm.layers.attention", "AttentionRope"),
    ("timm.models.eva", "EvaAttention"),
    ("timm.models.beit", "Attention"),
}


def _is_timm(module: nn.Module) -> bool:
    return type(module).__module__.startswith("timm.")


def _has_attention_api(module: nn.Module) -> bool:
    return isinstance(getattr(module, "attn_drop", None), nn.Module) and hasattr(module, "fused_attn")


class TimmBackend(Backend):
    name = "timm"
    supported = (
        "timm VisionTransformer (vit_*, deit*, deit3, dinov2 and *_reg4_*, clip, siglip, flexivit), Eva (eva02_*), "
        "Beit (beit*)"
    )

    # ------------------------------------------------------------------ layers

    @classmethod
    def is_attention_layer(cls, module: nn.Module) -> bool:
        return _has_attention_api(module) and type(module).__name__ not in NOT_TOKEN_SELF_ATTENTION

    @classmethod
    def unsupported_layer(cls, module: nn.Module) -> str | None:
        if _has_attention_api(module):
            return NOT_TOKEN_SELF_ATTENTION.get(type(module).__name__)
        return None

    @classmethod
    def attach_recording(cls, module: nn.Module, emit: EmitAttention, undo: Undo) -> None:
        if hasattr(module, "fused_attn"):  # layers without it (Swin V2) always compute the softmax themselves
            flag = module.fused_attn
            module.fused_attn = False
            undo.append(lambda: setattr(module, "fused_attn", flag))

        # the input of attn_drop is the softmax matrix itself (dropout is a no-op in eval anyway)
        def hook(_: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            emit(module, inputs[0])

        undo.append(module.attn_drop.register_forward_hook(hook).remove)

    @classmethod
    def can_stream_heads(cls, module: nn.Module) -> bool:
        return (type(module).__module__, type(module).__name__) in STREAMABLE

    @classmethod
    def attach_head_stream(
        cls, module: nn.Module, emit: EmitHeads, undo: Undo, budget: int, cache_bytes: int | None = None
    ) -> None:
        flag = module.fused_attn
        module.fused_attn = True  # the layer must call the kernel whose arguments are taken
        undo.append(lambda: setattr(module, "fused_attn", flag))

        def kernel(
            q: Tensor,
            k: Tensor,
            v: Tensor,
            attn_mask: Tensor | None = None,
            dropout_p: float = 0.0,
            is_causal: bool = False,
            scale: float | None = None,
            **rest: Any,
        ) -> Tensor:
            n_q, n_k = q.shape[-2], k.shape[-2]
            bias = lambda h0, h1: additive_bias(attn_mask, slice(h0, h1), n_q, n_k, is_causal, q)  # noqa: E731
            scaling = q.shape[-1] ** -0.5 if scale is None else scale
            out = stream_softmax(
                q,
                k,
                scaling,
                bias,
                lambda c, a: emit(module, c, a),
                budget,
                v if dropout_p == 0.0 else None,
                cache_bytes,
            )
            if out is not None:
                return out
            extra = {} if scale is None else {"scale": scale}
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **extra, **rest
            )

        take_calls(module, F.scaled_dot_product_attention, kernel, undo)

    # ------------------------------------------------------------------ models

    @classmethod
    def recognises(cls, module: nn.Module) -> bool:
        names = SUPPORTED_MODELS.get(type(module).__module__, ())
        return type(module).__name__ in names and isinstance(getattr(module, "patch_embed", None), nn.Module)

    @classmethod
    def unsupported_model(cls, module: nn.Module) -> str | None:
        if not _is_timm(module) or cls.recognises(module) or not hasattr(module, "default_cfg"):
            return None
        reason = UNSUPPORTED_MODELS.get(type(module).__name__)
        if reason is None and not any(_has_attention_api(m) for m in module.modules()):
            return None  # a CNN or an MLP model: not a transformer at all
        return f"timm {type(module).__name__}: {reason or 'not a plain ViT with one token sequence'}"

    def attention_layers(self) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in self.model.named_modules() if self.is_attention_layer(m)]

    def _patch_size(self) -> tuple[int, int]:
        size = getattr(self.model.patch_embed, "patch_size", None)
        if size is None:
            raise ValueError(f"cannot tell the patch size of {type(self.model).__name__}: no `patch_embed.patch_size`")
        return to_pair(size)

    def layout(self, image_size: tuple[int, int], query: str = "auto") -> TokenLayout:
        model = self.model
        ph, pw = self._patch_size()
        h, w = image_size
        feat = getattr(model.patch_embed, "dynamic_feat_size", None)
        grid = tuple(feat((h, w))) if callable(feat) else (h // ph, w // pw)
        num_prefix = int(getattr(model, "num_prefix_tokens", 1 if getattr(model, "cls_token", None) is not None else 0))
        has_cls = getattr(model, "cls_token", None) is not None and num_prefix > 0
        distilled = getattr(model, "dist_token", None) is not None
        self._check_query(query, has_cls)
        if query == "cls_dist" and not distilled:
            raise ValueError(
                f"`query='cls_dist'` needs a distilled model; {type(model).__name__} has no distillation token: "
                "use query='auto' (the token its head reads) or 'cls'"
            )
        if query == "auto":
            if not has_cls or getattr(model, "global_pool", "token") != "token":
                query = "mean"  # eva02, beit and *_gap_* pool patches: the class token does not feed the head
            else:
                # distilled DeiT averages its class and distillation heads at inference
                query = "cls_dist" if distilled else "cls"
        registers = self._num_registers()
        if registers > num_prefix:
            raise ValueError(
                f"{type(model).__name__} has {registers} register tokens but only {num_prefix} prefix tokens: its "
                "layout is not timm's [class][registers][patches]"
            )
        return TokenLayout(num_prefix, (int(grid[0]), int(grid[1])), query, (ph, pw), registers)

    def reinitialise(self, block: nn.Module) -> None:
        """timm's ViT initialisation (``init_weights_vit_timm``): linear weights from a normal of std 0.02
        truncated at ±2, biases 0, layer scales back to their ``init_values``, norms reset to 1 and 0."""
        from timm.models.vision_transformer import init_weights_vit_timm

        for module in block.modules():
            init_weights_vit_timm(module)

    def _num_registers(self) -> int:
        count = getattr(self.model, "num_reg_tokens", None)
        if count is None:  # Eva keeps no count, only the parameter
            reg_token = getattr(self.model, "reg_token", None)
            count = reg_token.shape[1] if isinstance(reg_token, Tensor) else 0
        return int(count)

    def input_size(self) -> tuple[int, int] | None:
        size = getattr(self.model.patch_embed, "img_size", None)
        return None if size is None else to_pair(size)

    def check_images(self, images: Tensor) -> None:
        model = self.model
        patch_embed = model.patch_embed
        channels = getattr(getattr(patch_embed, "proj", None), "in_channels", None)
        if channels is not None and images.shape[1] != channels:
            raise ValueError(
                f"`images` have {images.shape[1]} channels but {type(model).__name__} expects {channels}: "
                f"preprocess them to (B, {channels}, H, W) like the training inputs (e.g. repeat a grey channel, "
                "drop alpha)"
            )
        img_size = getattr(patch_embed, "img_size", None)
        strict = getattr(patch_embed, "strict_img_size", False) and not getattr(model, "dynamic_img_size", False)
        if strict and img_size is not None and tuple(images.shape[-2:]) != tuple(img_size):
            raise ValueError(
                f"images are {images.shape[-2]}x{images.shape[-1]} but {type(model).__name__} takes "
                f"{img_size[0]}x{img_size[1]} inputs: resize them (or build the model with `dynamic_img_size=True`)"
            )
        patch = to_pair(getattr(patch_embed, "patch_size", 1))
        padded = getattr(patch_embed, "dynamic_img_pad", False)
        h, w = images.shape[-2:]
        if not strict and not padded and (h % patch[0] or w % patch[1]):
            fit_h, fit_w = max(h // patch[0], 1) * patch[0], max(w // patch[1], 1) * patch[1]
            raise ValueError(
                f"images are {h}x{w} but {type(model).__name__} cuts {patch[0]}x{patch[1]} patches: resize them to a "
                f"multiple of the patch (e.g. {fit_h}x{fit_w}), or build the model with `dynamic_img_pad=True`"
            )

    def _data_config(self) -> dict[str, Any]:
        from timm.data import resolve_data_config

        # pretrained_cfg keeps the hub input size even when the model was built for another img_size
        img_size = getattr(self.model.patch_embed, "img_size", None)
        args = {"input_size": (3, *img_size)} if img_size is not None else {}
        return resolve_data_config(args, model=self.model)

    def display_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        cfg = self._data_config()
        return tuple(float(m) for m in cfg["mean"]), tuple(float(s) for s in cfg["std"])

    def transform(self) -> Callable[[Any], Tensor]:
        from timm.data import create_transform

        return create_transform(**self._data_config(), is_training=False)

    @property
    def has_class_logits(self) -> bool:
        # with num_classes=0 timm returns pooled features, whose argmax is no class
        return getattr(self.model, "num_classes", 1) != 0

    @property
    def num_classes(self) -> int | None:
        count = getattr(self.model, "num_classes", None)
        return int(count) if count else None

    def class_logits(self, output: Any) -> Tensor | None:
        if not self.has_class_logits:
            return None
        if isinstance(output, (tuple, list)):  # distilled training mode returns (cls, dist) heads
            output = output[0]
        return output if isinstance(output, Tensor) else None
