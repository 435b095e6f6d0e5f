"""How a Swin's windowed attention reads on the finest patch grid: a tiny random-weight timm Swin on two shapes.

Per probe: each block's raw map (the mean over every patch's row of its whole-image attention), the rollout after
the last block, and each block's whole-image matrix on the stage-1 patch grid (block-diagonal across windows;
shifted windows shifted back; the second stage's tokens spread over the 2x2 patches they cover).

python examples/swin_windows.py --picture docs/swin_windows.png
"""

from __future__ import annotations

import argparse

import numpy as np
import timm
import torch
from PIL import Image

from lightning_attn import attention_maps
from lightning_attn.render import make_grid, matrix_tiles, overlay, to_display, with_colour_bar

from shapes import DEFAULT_MEAN, DEFAULT_STD, make_probes


def picture(tile: int = 96) -> np.ndarray:
    torch.manual_seed(0)
    model = timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        img_size=64,
        embed_dim=32,
        depths=(2, 2),
        num_heads=(2, 4),
        window_size=4,
    ).eval()
    with torch.no_grad():  # random weights give near-uniform attention; sharper q and k show the structure
        for module in model.modules():
            if isinstance(getattr(module, "qkv", None), torch.nn.Linear):
                module.qkv.weight[: 2 * module.qkv.out_features // 3].mul_(4.0)
    images, _, _ = make_probes(2, image_size=64)
    maps = attention_maps(model, images, keep_matrices=range(4))
    blocks = len(maps.layer_names)
    heat = overlay(to_display(images, DEFAULT_MEAN, DEFAULT_STD), torch.cat([maps.raw, maps.rollout[:, -1:]], 1), tile)
    matrices = matrix_tiles(torch.stack([maps.matrices[i] for i in range(blocks)], dim=1), tile)
    header = ["image", *[f"raw B{i}" for i in range(blocks)], f"rollout B{blocks - 1}"]
    header += [f"matrix B{i}" for i in range(blocks)]
    grid = make_grid(torch.cat([heat, matrices], dim=1), header, [f"probe {i}" for i in range(len(images))])
    return with_colour_bar(grid)  # the default relative scale: shares of the map against uniform, one for all


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--picture", default="swin_windows.png", help="where to write the PNG")
    args = parser.parse_args()
    Image.fromarray(picture()).save(args.picture)
    print(f"wrote {args.picture}")


if __name__ == "__main__":
    main()
