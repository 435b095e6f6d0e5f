"""Tiny Hugging Face transformers and torchvision ViTs, and float64 references built without the package.

References: Hugging Face models' own eager attention (`attn_implementation="eager"`, `output_attentions=True`) on a
float64 copy; torchvision's ViT re-implemented by hand in float64 from its weights (its kernel never returns
differentiable weights).
"""

from __future__ import annotations

import copy
import inspect
import math

import numpy as np
import torch

SMALL = dict(
    hidden_size=48, num_hidden_layers=3, num_attention_heads=3, intermediate_size=96, image_size=32, patch_size=8
)

# key: (builder, prefix tokens, query, can take another input size, has class logits)
HF_MODELS = {
    "vit_cls": ("ViTForImageClassification", "ViTConfig", 1, "cls", True, True),
    "vit": ("ViTModel", "ViTConfig", 1, "cls", True, False),
    "deit_teacher": ("DeiTForImageClassificationWithTeacher", "DeiTConfig", 2, "cls_dist", True, True),
    "dinov2": ("Dinov2Model", "Dinov2Config", 1, "cls", True, False),
    "dinov2_cls": ("Dinov2ForImageClassification", "Dinov2Config", 1, "cls", True, True),
    "dinov2_reg": ("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", 5, "cls", True, False),
    "clip_vision": ("CLIPVisionModel", "CLIPVisionConfig", 1, "cls", True, False),
    "clip": ("CLIPModel", "CLIPConfig", 1, "cls", True, False),
    "siglip": ("SiglipVisionModel", "SiglipVisionConfig", 0, "mean", True, False),
}


def sharpen(model: torch.nn.Module, factor: float = 6.0) -> torch.nn.Module:
    """Scale query/key projections so random attention is far from uniform (a wrong row would go unnoticed)."""
    with torch.no_grad():
        for module in model.modules():
            for name in ("q_proj", "k_proj", "query", "key"):
                proj = getattr(module, name, None)
                if isinstance(proj, torch.nn.Linear):
                    proj.weight.mul_(factor)
            if isinstance(module, torch.nn.MultiheadAttention):
                e = module.embed_dim
                module.in_proj_weight[: 2 * e].mul_(factor)
    return model


def make_hf(key: str, seed: int = 0) -> torch.nn.Module:
    import transformers

    model_name, config_name, *_ = HF_MODELS[key]
    config_cls = getattr(transformers, config_name)
    if key == "clip":
        text = dict(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=99,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
        config = config_cls(vision_config=SMALL, text_config=text, projection_dim=16)
    else:
        extra = {"num_labels": 5} if HF_MODELS[key][5] else {}
        if key == "dinov2_reg":
            extra["num_register_tokens"] = 4
        config = config_cls(**SMALL, **extra)
    torch.manual_seed(seed)
    return sharpen(getattr(transformers, model_name)(config).eval())


def make_torchvision(seed: int = 0, num_classes: int = 5) -> torch.nn.Module:
    from torchvision.models import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=3, num_heads=3, hidden_dim=48, mlp_dim=96, num_classes=num_classes
    )
    return sharpen(model.eval())


def images(batch: int = 3, size: tuple[int, int] = (32, 32), seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *size, generator=g)


def hf_eager_float64(model: torch.nn.Module, x: torch.Tensor, score=None):
    """(attentions, gradients or None, output) of a float64 eager copy: attentions from `output_attentions=True`;
    gradients of each image's score, one `autograd.grad` per image and layer."""
    m = copy.deepcopy(model).double().eval()
    m.set_attn_implementation("eager")
    tower = m.vision_model if hasattr(m, "get_image_features") else m
    accepts = "interpolate_pos_encoding" in inspect.signature(tower.forward).parameters
    kwargs = {"interpolate_pos_encoding": True} if accepts else {}
    xd = x.double().clone().requires_grad_(True)
    with torch.enable_grad():
        out = tower(pixel_values=xd, output_attentions=True, **kwargs)
        atts = list(out.attentions)
        if score is None:
            return [a.detach().numpy() for a in atts], None, out
        if hasattr(m, "get_image_features"):
            out = m.visual_projection(out.pooler_output)
        scores = score(out)
        grads = [np.zeros(a.shape) for a in atts]
        for s in range(x.shape[0]):
            found = torch.autograd.grad(scores[s], atts, retain_graph=True)
            for l, g in enumerate(found):
                grads[l][s] = g[s].numpy()
    return [a.detach().numpy() for a in atts], grads, out


def torchvision_float64(model: torch.nn.Module, x: torch.Tensor, targets: list[int] | None = None):
    """torchvision's ViT forward written out by hand in float64: (attentions, gradients or None, logits)."""
    m = copy.deepcopy(model).double()
    with torch.enable_grad():
        xd = x.double()
        p = m.patch_size
        tokens = m.conv_proj(xd).flatten(2).transpose(1, 2)
        tokens = torch.cat([m.class_token.expand(xd.shape[0], -1, -1), tokens], dim=1) + m.encoder.pos_embedding
        atts = []
        for block in m.encoder.layers:
            mha = block.self_attention
            h = block.ln_1(tokens)
            e, heads = mha.embed_dim, mha.num_heads
            q, k, v = torch.nn.functional.linear(h, mha.in_proj_weight, mha.in_proj_bias).split(e, dim=-1)
            split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731, B023 (used in this iteration)
            q, k, v = split(q), split(k), split(v)
            a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(e // heads), dim=-1)
            atts.append(a)
            merged = (a @ v).transpose(1, 2).reshape(h.shape)
            tokens = tokens + mha.out_proj(merged)
            tokens = tokens + block.mlp(block.ln_2(tokens))
        logits = m.heads(m.encoder.ln(tokens)[:, 0])
        del p
        if targets is None:
            return [a.detach().numpy() for a in atts], None, logits.detach()
        grads = [np.zeros(a.shape) for a in atts]
        for s, t in enumerate(targets):
            for l, g in enumerate(torch.autograd.grad(logits[s, t], atts, retain_graph=True)):
                grads[l][s] = g[s].numpy()
    return [a.detach().numpy() for a in atts], grads, logits.detach()
