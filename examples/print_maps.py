"""The functional core without Lightning: per-layer raw attention and rollout of a tiny timm ViT, printed.

python examples/print_maps.py
"""

from __future__ import annotations

import timm
import torch

from lightning_attn import attention_maps, normalized_entropy


def main() -> None:
    torch.manual_seed(0)
    # pretrained=False: runs offline; swap in any timm ViT name (and pretrained=True when online).
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=16, depth=4)
    images = torch.randn(2, 3, 64, 64)
    maps = attention_maps(model, images, head_fusion="mean", discard_ratio=0.0)
    print(f"grid {maps.grid_size}, {maps.num_prefix_tokens} prefix token(s), query row: {maps.query}")
    torch.set_printoptions(precision=3, sci_mode=False)
    for method in ("raw", "rollout"):
        entropy = normalized_entropy(maps[method]).mean(0)
        for layer, name in enumerate(maps.layer_names):
            print(f"\n{method} {name}  (entropy {entropy[layer]:.3f}), probe 0:")
            print(maps[method][0, layer])


if __name__ == "__main__":
    main()
