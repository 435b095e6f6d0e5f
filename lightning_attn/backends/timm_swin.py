"""timm Swin and Swin V2 (``swin_*``, ``swinv2_*``): windowed, hierarchical attention.

Each ``SwinTransformerBlock`` rolls its stage's (B, H, W, C) grid by ``-shift``, pads it to whole windows and
calls its ``WindowAttention`` on the windows as a batch; Swin V1's attention has timm's ``fused_attn`` flag and
passes the softmax through ``attn_drop`` only when it is off, Swin V2's (cosine attention, continuous position
bias) always does. So recording switches ``fused_attn`` off where it exists and hooks ``attn_drop``: the weights
are the (B * windows, heads, w, w) tensor the block used, relative position bias and shift mask included. What the
windows are, per block, is the layout's :class:`~lightning_attn.layout.WindowGrid`; the maps lie on the finest
patch grid (see :mod:`lightning_attn.windows`).
"""

from __future__ import annotations

import math

from torch import nn

from ..layout import TokenLayout, WindowGrid
from .base import to_pair
from .timm import TimmBackend

__all__ = ["TimmSwinBackend"]

# module -> the whole-model class of that module
_MODELS = {
    "timm.models.swin_transformer": "SwinTransformer",
    "timm.models.swin_transformer_v2": "SwinTransformerV2",
}


class TimmSwinBackend(TimmBackend):
    """timm ``SwinTransformer`` and ``SwinTransformerV2``; recording (``fused_attn`` off where the layer has it, the
    input of ``attn_drop``), input checks, preprocessing and class logits as for timm ViTs."""

    name = "timm_swin"
    supported = "timm SwinTransformer (swin_*), SwinTransformerV2 (swinv2_*)"

    @classmethod
    def is_attention_layer(cls, module: nn.Module) -> bool:
        return type(module).__module__ in _MODELS and type(module).__name__ == "WindowAttention"

    @classmethod
    def unsupported_layer(cls, module: nn.Module) -> str | None:
        return None

    @classmethod
    def can_stream_heads(cls, module: nn.Module) -> bool:
        return False

    @classmethod
    def recognises(cls, module: nn.Module) -> bool:
        return _MODELS.get(type(module).__module__) == type(module).__name__ and hasattr(module, "layers")

    @classmethod
    def unsupported_model(cls, module: nn.Module) -> str | None:
        return None

    def layout(self, image_size: tuple[int, int], query: str = "auto") -> TokenLayout:
        self._check_query(query, has_cls=False)
        patch = self._patch_size()
        fine = (image_size[0] // patch[0], image_size[1] // patch[1])
        grid, stride = fine, 1
        windows = []
        for stage in self.model.layers:
            if not isinstance(getattr(stage, "downsample", None), (nn.Identity, type(None))):
                # patch merging pads odd sides, then halves the grid
                grid, stride = (math.ceil(grid[0] / 2), math.ceil(grid[1] / 2)), stride * 2
            for block in stage.blocks:
                window, shift = to_pair(block.window_size), to_pair(block.shift_size)
                windows.append(WindowGrid(grid, window, shift, stride, roll_first=True))
        return TokenLayout(0, fine, "mean", patch, windows=tuple(windows))
