"""Hugging Face transformers Swin and Swin V2: ``SwinModel``, ``SwinForImageClassification``, ``Swinv2Model``,
``Swinv2ForImageClassification``.

Swin's ``SwinAttention`` calls its kernel through ``AttentionInterface`` with the relative position bias and the
shift mask as one additive mask, windows as the batch: the registered function of the ViT backend records it as
it records ViT layers (head streaming included). Swin V2's ``Swinv2SelfAttention`` computes its cosine attention
by hand and calls ``nn.functional.softmax`` once: that call is taken while the layer runs, as for torchvision. Each
``SwinLayer`` pads its stage's grid to whole windows, then rolls it (Swin V1 drops the shift and shrinks the window
to the grid when the grid is no larger than a window, at every forward); the layout's
:class:`~lightning_attn.layout.WindowGrid` says so for each block.
"""

from __future__ import annotations

import math

from torch import nn

from ..layout import TokenLayout, WindowGrid
from .base import IMAGENET_MEAN, IMAGENET_STD, EmitAttention, EmitHeads, Undo, take_softmax, to_pair
from .transformers import TransformersBackend, _is_pretrained_model

__all__ = ["TransformersSwinBackend"]

_LAYERS = {
    ("transformers.models.swin.modeling_swin", "SwinAttention"),
    ("transformers.models.swinv2.modeling_swinv2", "Swinv2SelfAttention"),
}
_MODEL_TYPES = ("swin", "swinv2")


def _computes_softmax(module: nn.Module) -> bool:
    """Swin V2: the layer computes its softmax itself instead of calling an attention kernel."""
    return type(module).__name__ == "Swinv2SelfAttention"


class TransformersSwinBackend(TransformersBackend):
    name = "transformers_swin"
    supported = "Hugging Face transformers Swin, Swin V2 (SwinModel, Swinv2Model and their *ForImageClassification)"

    @classmethod
    def is_attention_layer(cls, module: nn.Module) -> bool:
        return (type(module).__module__, type(module).__name__) in _LAYERS

    @classmethod
    def attach_recording(cls, module: nn.Module, emit: EmitAttention, undo: Undo) -> None:
        if not _computes_softmax(module):
            super().attach_recording(module, emit, undo)
            return
        take_softmax(module, emit, undo)

    @classmethod
    def can_stream_heads(cls, module: nn.Module) -> bool:
        return not _computes_softmax(module)

    @classmethod
    def attach_head_stream(
        cls, module: nn.Module, emit: EmitHeads, undo: Undo, budget: int, cache_bytes: int | None = None
    ) -> None:
        super().attach_head_stream(module, emit, undo, budget, cache_bytes)

    @classmethod
    def recognises(cls, module: nn.Module) -> bool:
        return _is_pretrained_model(module) and getattr(module.config, "model_type", None) in _MODEL_TYPES

    @classmethod
    def unsupported_model(cls, module: nn.Module) -> str | None:
        return None

    def layout(self, image_size: tuple[int, int], query: str = "auto") -> TokenLayout:
        self._check_query(query, False)
        patch = to_pair(self._conv.stride)
        # the patch embedding pads the pixels to whole patches
        grid = (math.ceil(image_size[0] / patch[0]), math.ceil(image_size[1] / patch[1]))
        fine, stride = grid, 1
        windows = []
        for stage in (m for m in self.model.modules() if type(m).__name__ in ("SwinStage", "Swinv2Stage")):
            for block in stage.blocks:
                window, shift = int(block.window_size), int(block.shift_size)
                if type(block).__name__ == "SwinLayer" and min(grid) <= window:
                    window, shift = min(grid), 0  # SwinLayer.set_shift_and_window_size, at every forward
                windows.append(WindowGrid(grid, (window, window), (shift, shift), stride, roll_first=False))
            if stage.downsample is not None:  # patch merging after the stage's blocks: pads odd sides, halves
                grid, stride = (math.ceil(grid[0] / 2), math.ceil(grid[1] / 2)), stride * 2
        return TokenLayout(0, fine, "mean", patch, windows=tuple(windows))

    def display_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        saved = self._preprocessor_config()
        if saved and "image_mean" in saved and "image_std" in saved:
            return tuple(map(float, saved["image_mean"])), tuple(map(float, saved["image_std"]))
        return IMAGENET_MEAN, IMAGENET_STD  # the Swin image processors' defaults
