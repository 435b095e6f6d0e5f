"""torchvision Swin and Swin V2 (``swin_t/s/b``, ``swin_v2_t/s/b``: ``SwinTransformer``).

``ShiftedWindowAttention(V2).forward`` calls the module-level function ``shifted_window_attention``, which pads the
stage's (B, H, W, C) grid to whole windows, rolls it by ``-shift`` (no shift where a window covers the padded
grid), adds the relative position bias and the shift mask, and calls ``F.softmax`` once. Recording takes that call
while the attention module runs (a torch function mode, as the timm backend takes its kernel): the
(B * windows, heads, w, w) weights are the tensor the rest of the function uses, so gradients with respect to
them are the model's own. What the windows are is the layout's :class:`~lightning_attn.layout.WindowGrid`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from ..layout import TokenLayout, WindowGrid
from .base import IMAGENET_MEAN, IMAGENET_STD, EmitAttention, Undo, take_softmax, to_pair
from .torchvision import TorchvisionBackend

__all__ = ["TorchvisionSwinBackend"]

_MODULE = "torchvision.models.swin_transformer"


class TorchvisionSwinBackend(TorchvisionBackend):
    name = "torchvision_swin"
    supported = "torchvision SwinTransformer (swin_t/s/b, swin_v2_t/s/b)"

    @classmethod
    def is_attention_layer(cls, module: nn.Module) -> bool:
        return type(module).__module__ == _MODULE and type(module).__name__.startswith("ShiftedWindowAttention")

    @classmethod
    def attach_recording(cls, module: nn.Module, emit: EmitAttention, undo: Undo) -> None:
        take_softmax(module, emit, undo)

    @classmethod
    def can_stream_heads(cls, module: nn.Module) -> bool:
        return False

    @classmethod
    def recognises(cls, module: nn.Module) -> bool:
        return type(module).__module__ == _MODULE and type(module).__name__ == "SwinTransformer"

    def attention_layers(self) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in self.model.named_modules() if self.is_attention_layer(m)]

    def _stem(self) -> nn.Conv2d:
        return next(m for m in self.model.features.modules() if isinstance(m, nn.Conv2d))

    def _patch_size(self) -> tuple[int, int]:
        return to_pair(tuple(self._stem().stride))

    def layout(self, image_size: tuple[int, int], query: str = "auto") -> TokenLayout:
        self._check_query(query, False)
        patch = self._patch_size()
        fine = (image_size[0] // patch[0], image_size[1] // patch[1])
        grid, stride = fine, 1
        windows = []
        for stage in list(self.model.features)[1:]:
            if type(stage).__name__.startswith("PatchMerging"):  # pads odd sides, then halves the grid
                grid, stride = (math.ceil(grid[0] / 2), math.ceil(grid[1] / 2)), stride * 2
                continue
            for block in stage:
                (wh, ww), (sh, sw) = to_pair(tuple(block.attn.window_size)), to_pair(tuple(block.attn.shift_size))
                # shifted_window_attention drops the shift along a side that one window covers after padding
                padded = (math.ceil(grid[0] / wh) * wh, math.ceil(grid[1] / ww) * ww)
                shift = (0 if wh >= padded[0] else sh, 0 if ww >= padded[1] else sw)
                windows.append(WindowGrid(grid, (wh, ww), shift, stride, roll_first=False))
        return TokenLayout(0, fine, "mean", patch, windows=tuple(windows))

    def input_size(self) -> tuple[int, int] | None:
        return None  # any size: the blocks pad to whole windows

    def check_images(self, images: Tensor) -> None:
        channels = self._stem().in_channels
        if images.shape[1] != channels:
            raise ValueError(
                f"`images` have {images.shape[1]} channels but SwinTransformer expects {channels}: preprocess them "
                f"to (B, {channels}, H, W) like the training inputs"
            )

    def transform(self) -> Callable[[Any], Tensor]:
        from torchvision import transforms

        # the ImageNet weights' recipe at 224 (swin_t: resize 232, swin_v2_t at 256: resize 260; both centre crop)
        return transforms.Compose(
            [
                transforms.Resize(232),
                transforms.CenterCrop(224),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def display_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return IMAGENET_MEAN, IMAGENET_STD

    @property
    def num_classes(self) -> int | None:
        return int(self.model.head.out_features)
