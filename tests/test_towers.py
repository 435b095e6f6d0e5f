"""A vision tower inside a larger model: the CLIP vision tower of a (tiny, random) LLaVA, watched with `module=`."""

from __future__ import annotations

import pytest
import torch

from lightning_attn import AttentionMonitor, attention_maps, find_vision_transformers

import lit

transformers = pytest.importorskip("transformers")


def _llava() -> torch.nn.Module:
    vision = transformers.CLIPVisionConfig(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96, image_size=32, patch_size=8
    )
    text = transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99
    )
    torch.manual_seed(0)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text)
    return transformers.LlavaForConditionalGeneration(config)


class LitTower(lit.LitViT):
    """Fine-tunes a LLaVA's vision tower with a classification head of its own; the language model rides along."""

    def __init__(self):
        super().__init__()
        self.vlm = _llava()
        self.model = torch.nn.Linear(48, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.vlm.model.vision_tower(pixel_values=x).pooler_output)


def test_llava_vision_tower_watched_with_module(tmp_path):
    model = LitTower()
    tower = model.vlm.model.vision_tower
    assert type(tower).__name__ == "CLIPVisionModel"
    # found on its own the LLaVA counts as one vision model (its image features come from the tower) ...
    assert [name for name, _ in find_vision_transformers(model)] == ["vlm"]
    # ... and `module=` names the tower itself: its own layers, its own output
    monitor = AttentionMonitor(
        torch.randn(2, 3, lit.IMG, lit.IMG), module="vlm.model.vision_tower", tile_size=16, on_error="raise"
    )
    lit.trainer(tmp_path, [monitor], max_epochs=1).fit(model, *lit.loaders())
    acc = lit.read_events(tmp_path / "tb" / "version_0")
    assert [e.step for e in acc.Images("attention/rollout")] == [0, 4]
    assert "attention_entropy/raw/layer_01" in acc.Tags()["scalars"]
    names = attention_maps(tower.eval(), torch.randn(1, 3, lit.IMG, lit.IMG)).layer_names
    assert [n.removeprefix("vision_model.") for n in names] == [f"encoder.layers.{i}.self_attn" for i in (0, 1)]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
