"""Tiny Swin models of each stack and float64 references of their whole-image attention built without the package.

The reference takes each window attention's own inputs (the windows of tokens the block hands it, and its mask),
recomputes the softmax by hand in float64, finds which token sits at each window position by running torch.roll
and padding on a grid of token indices the way the block does, places the windows into a dense stage matrix,
and lifts it onto the finest patch grid with explicit cover matrices. Everything dense, loop by loop.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F

SWIN = dict(pretrained=False, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4, num_classes=5)
TIMM = {"swin": "swin_tiny_patch4_window7_224", "swinv2": "swinv2_tiny_window8_256"}


def sharpen(model: torch.nn.Module, factor: float = 4.0) -> torch.nn.Module:
    """Scale the q/k rows of every qkv projection so that random attention is far from uniform."""
    with torch.no_grad():
        for module in model.modules():
            qkv = getattr(module, "qkv", None)
            if isinstance(qkv, torch.nn.Linear):
                qkv.weight[: 2 * qkv.out_features // 3].mul_(factor)
    return model


def make_timm(kind: str = "swin", img: int = 64, seed: int = 0, **overrides) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    return sharpen(timm.create_model(TIMM[kind], img_size=img, **{**SWIN, **overrides}).eval())


def window_index(h: int, w: int, window: tuple[int, int], shift: tuple[int, int], roll_first: bool) -> np.ndarray:
    """(windows, wh * ww): the stage token at each window position, by rolling and padding an index grid as the
    block rolls and pads its tokens; -1 for padding."""
    wh, ww = window
    hp, wp = math.ceil(h / wh) * wh, math.ceil(w / ww) * ww
    idx = torch.arange(h * w, dtype=torch.float64).reshape(1, 1, h, w)
    if roll_first:  # timm
        idx = torch.roll(idx, (-shift[0], -shift[1]), (2, 3))
        idx = F.pad(idx, (0, wp - w, 0, hp - h), value=-1)
    else:  # torchvision, Hugging Face
        idx = F.pad(idx, (0, wp - w, 0, hp - h), value=-1)
        idx = torch.roll(idx, (-shift[0], -shift[1]), (2, 3))
    out = []
    for r in range(hp // wh):
        for c in range(wp // ww):
            out.append(idx[0, 0, r * wh : (r + 1) * wh, c * ww : (c + 1) * ww].reshape(-1))
    return torch.stack(out).long().numpy()


def stage_matrix(windows: np.ndarray, index: np.ndarray, n: int, renormalise: bool = True) -> np.ndarray:
    """(windows, w, w) weights of one image (heads fused) -> (n, n): placed, padding dropped, rows renormalised."""
    m = np.zeros((n, n))
    for k in range(index.shape[0]):
        real = index[k] >= 0
        m[np.ix_(index[k][real], index[k][real])] = windows[k][np.ix_(real, real)]
    if renormalise:
        sums = m.sum(axis=1, keepdims=True)
        m = np.where(sums > 0, m / np.where(sums > 0, sums, 1), 0)
    return m


def cover(fine: tuple[int, int], stage: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """P (N, n): which stage token covers each finest patch; Q (n, N): each token spread evenly over them."""
    stride = 2 ** round(math.log2(fine[0] / stage[0]))
    p = np.zeros((fine[0] * fine[1], stage[0] * stage[1]))
    for i in range(fine[0]):
        for j in range(fine[1]):
            p[i * fine[1] + j, (i // stride) * stage[1] + j // stride] = 1
    q = p.T / p.sum(axis=0)[:, None]
    return p, q


class Block:
    """What the reference needs of one block's call: the stage grid, the window index and the weights."""

    def __init__(self, h, w, index, weights):
        self.h, self.w, self.index, self.weights = h, w, index, weights  # weights (B * windows, heads, w, w)


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    logits = logits - logits.amax(dim=-1, keepdim=True)
    e = logits.exp()
    return e / e.sum(dim=-1, keepdim=True)


def _add_mask(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return logits
    windows = mask.shape[0]
    b_, heads, n, _ = logits.shape
    return (logits.reshape(-1, windows, heads, n, n) + mask.double()[None, :, None]).reshape(b_, heads, n, n)


def timm_window_softmax(attn: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A timm (V1 or V2) WindowAttention's softmax recomputed by hand in float64 from its window inputs."""
    x = x.double()
    b_, n, _ = x.shape
    heads = attn.num_heads
    if getattr(attn, "q_bias", None) is not None:  # V2: separate q and v biases, no k bias
        bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias]).double()
    else:
        bias = attn.qkv.bias.double() if attn.qkv.bias is not None else None
    qkv = F.linear(x, attn.qkv.weight.double(), bias).reshape(b_, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    if hasattr(attn, "logit_scale"):  # V2: cosine attention and a continuous position bias
        logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        logits = logits * attn.logit_scale.double().clamp(max=math.log(100.0)).exp()
        table = attn.cpb_mlp.double()(attn.relative_coords_table.double()).reshape(-1, heads)
        rel = table[attn.relative_position_index.reshape(-1)].reshape(n, n, heads).permute(2, 0, 1)
        logits = logits + 16 * torch.sigmoid(rel)[None]
    else:
        logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        table = attn.relative_position_bias_table.double()
        rel = table[attn.relative_position_index.reshape(-1)].reshape(n, n, heads).permute(2, 0, 1)
        logits = logits + rel[None]
    return _softmax(_add_mask(logits, mask))


def timm_blocks(model: torch.nn.Module, images: torch.Tensor) -> tuple[list[Block], torch.Tensor]:
    """Every block's stage grid, window index and float64 weights recomputed by hand, and the float64 logits."""
    m = copy.deepcopy(model).double().eval()
    found: list[Block] = []
    handles = []
    for stage in m.layers:
        for block in stage.blocks:
            if hasattr(block.attn, "fused_attn"):
                block.attn.fused_attn = False  # the mask then reaches the attention as an argument either way
            seen = {}

            def grid(mod, args, seen=seen):
                seen["hw"] = args[0].shape[1:3]

            def window(mod, args, kwargs, block=block, seen=seen):
                h, w = seen["hw"]
                index = window_index(h, w, block.window_size, block.shift_size, roll_first=True)
                weights = timm_window_softmax(mod, args[0], kwargs.get("mask"))
                found.append(Block(h, w, index, weights))

            handles.append(block.register_forward_pre_hook(grid))
            handles.append(block.attn.register_forward_pre_hook(window, with_kwargs=True))
    with torch.no_grad():
        logits = m(images.double())
    for handle in handles:
        handle.remove()
    return found, logits


def _rows(steps: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> np.ndarray:
    """(L, N): the mean over rows of S_l S_{l-1} ... S_0 for each l, S = P A Q given as (P, A, Q), as a row
    vector pushed through the steps."""
    n = steps[0][0].shape[0]
    out = []
    for l in range(len(steps)):
        v = np.full(n, 1.0 / n)
        for p, a, q in steps[l::-1]:
            v = ((v @ p) @ a) @ q
        out.append(v)
    return np.stack(out)


def _lifted(block: Block, fine: tuple[int, int], s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    windows = block.index.shape[0]
    p, q = cover(fine, (block.h, block.w))
    return block.weights.numpy()[s * windows : (s + 1) * windows], p, q


def _normalised(m: np.ndarray) -> np.ndarray:
    return m / m.sum(axis=1, keepdims=True)


def reference_maps(blocks: list[Block], fine: tuple[int, int], batch: int) -> tuple[np.ndarray, np.ndarray]:
    """raw and rollout (B, L, N) in float64: the mean over the finest patch rows of P A Q, and of the product of
    the lifted residual steps P (A + I) / rows Q."""
    raw, roll = [], []
    for s in range(batch):
        lifted, steps = [], []
        for block in blocks:
            weights, p, q = _lifted(block, fine, s)
            n = block.h * block.w  # each head's padding dropped and rows renormalised, then the heads' mean
            a = np.mean([stage_matrix(weights[:, h], block.index, n) for h in range(weights.shape[1])], axis=0)
            lifted.append((p, a, q))
            steps.append((p, _normalised(a + np.eye(n)), q))
        raw.append(np.stack([_rows([step])[0] for step in lifted]))
        roll.append(_rows(steps))
    return np.stack(raw), np.stack(roll)


def reference_gradient_maps(
    blocks: list[Block], gradients: list[np.ndarray], fine: tuple[int, int], batch: int
) -> tuple[np.ndarray, np.ndarray]:
    """grad_rollout and relevance (B, L, N) in float64 on the lifted stage matrices."""
    gr, rel = [], []
    for s in range(batch):
        grad_steps, rel_steps = [], []
        for block, grad in zip(blocks, gradients):
            a, p, q = _lifted(block, fine, s)
            windows = block.index.shape[0]
            g = grad[s * windows : (s + 1) * windows]
            n = block.h * block.w
            weighted = stage_matrix((a * g).mean(axis=1), block.index, n, renormalise=False).clip(min=0)
            grad_steps.append((p, _normalised(weighted + np.eye(n)), q))
            bar = stage_matrix((a * g).clip(min=0).mean(axis=1), block.index, n, renormalise=False)
            rel_steps.append((p, np.eye(n) + bar, q))
        gr.append(_rows(grad_steps))
        rel.append(_rows(rel_steps))
    return np.stack(gr), np.stack(rel)


def make_torchvision(kind: str = "swin", seed: int = 0, num_classes: int = 5) -> torch.nn.Module:
    from torchvision.models import swin_transformer as tv

    torch.manual_seed(seed)
    extra = dict(block=tv.SwinTransformerBlockV2, downsample_layer=tv.PatchMergingV2) if kind == "swinv2" else {}
    model = tv.SwinTransformer([4, 4], 16, [2, 2], [1, 2], [4, 4], num_classes=num_classes, **extra)
    return sharpen(model.eval())


def _shift_mask(hp: int, wp: int, window: tuple[int, int], shift: tuple[int, int], index_shape) -> torch.Tensor:
    """(windows, w, w) the -100 mask between positions of different regions of the padded, rolled grid."""
    (wh, ww), (sh, sw) = window, shift

    def region(i: int, n: int, w: int, s: int) -> int:
        return 0 if i < n - w else (1 if i < n - s else 2)

    labels = []
    for r in range(hp // wh):
        for c in range(wp // ww):
            labels.append(
                [3 * region(r * wh + i // ww, hp, wh, sh) + region(c * ww + i % ww, wp, ww, sw) for i in range(wh * ww)]
            )
    lab = torch.tensor(labels, dtype=torch.float64)
    assert lab.shape == index_shape
    return torch.where(lab[:, :, None] == lab[:, None, :], 0.0, -100.0).double()


def torchvision_window_softmax(attn: torch.nn.Module, x: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """torchvision's shifted window attention written out by hand in float64 from the stage grid it is given:
    (window index, (B * windows, heads, w, w) weights)."""
    b, h, w, c = x.shape
    window = tuple(attn.window_size)
    hp, wp = math.ceil(h / window[0]) * window[0], math.ceil(w / window[1]) * window[1]
    shift = tuple(0 if win >= p else s for win, p, s in zip(window, (hp, wp), attn.shift_size))
    index = window_index(h, w, window, shift, roll_first=False)
    flat = torch.cat([x.double().reshape(b, h * w, c), torch.zeros(b, 1, c, dtype=torch.float64)], dim=1)
    tokens = flat[:, torch.from_numpy(np.where(index >= 0, index, h * w))]  # (B, windows, w, C), padding zeros
    tokens = tokens.reshape(-1, index.shape[1], c)
    heads = attn.num_heads
    bias = attn.qkv.bias.double().clone()
    v2 = hasattr(attn, "logit_scale")
    if v2:
        bias[c : 2 * c] = 0  # V2 has no key bias
    qkv = F.linear(tokens, attn.qkv.weight.double(), bias).reshape(tokens.shape[0], -1, 3, heads, c // heads)
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    if v2:
        logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        logits = logits * attn.logit_scale.double().clamp(max=math.log(100.0)).exp()
    else:
        logits = (q * (c // heads) ** -0.5) @ k.transpose(-2, -1)
    logits = logits + attn.get_relative_position_bias().double()
    if any(shift):
        logits = _add_mask(logits, _shift_mask(hp, wp, window, shift, index.shape))
    return index, _softmax(logits)


def torchvision_blocks(model: torch.nn.Module, images: torch.Tensor) -> tuple[list[Block], torch.Tensor]:
    """Every block's stage grid, window index and float64 weights recomputed by hand, and the float64 logits."""
    m = copy.deepcopy(model).double().eval()
    found: list[Block] = []

    def hook(mod, args):
        index, weights = torchvision_window_softmax(mod, args[0])
        found.append(Block(args[0].shape[1], args[0].shape[2], index, weights))

    handles = [
        mod.register_forward_pre_hook(hook)
        for mod in m.modules()
        if type(mod).__name__.startswith("ShiftedWindowAttention")
    ]
    with torch.no_grad():
        logits = m(images.double())
    for handle in handles:
        handle.remove()
    return found, logits


class _Softmaxes(torch.overrides.TorchFunctionMode):
    """Keeps every F.softmax result of a forward (torchvision's Swin calls it once per block, nowhere else)."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.softmax:
            self.seen.append(out)
        return out


def gradients(model: torch.nn.Module, images: torch.Tensor, targets: list[int], stack: str) -> list[np.ndarray]:
    """d(logit of each image's target)/d(each block's window weights) of a float64 copy, one `autograd.grad` per
    image, recorded by hooks of its own (timm: on `attn_drop`; torchvision and Hugging Face, eager: every
    F.softmax of the forward, one per block)."""
    m = copy.deepcopy(model).double().eval()
    recorded: list[torch.Tensor] = []
    handles = []
    for module in m.modules():
        if stack == "timm" and type(module).__name__ == "WindowAttention":
            if hasattr(module, "fused_attn"):
                module.fused_attn = False
            handles.append(module.attn_drop.register_forward_hook(lambda mod, inp, out: recorded.append(inp[0])))
    if stack == "hf":
        m.set_attn_implementation("eager")
    x = images.double().clone().requires_grad_(True)
    with torch.enable_grad():
        if stack != "timm":
            with _Softmaxes() as mode:
                logits = m(x) if stack == "torchvision" else m(pixel_values=x).logits
            recorded = mode.seen
        else:
            logits = m(x)
    for handle in handles:
        handle.remove()
    grads = [np.zeros(a.shape) for a in recorded]
    for s, target in enumerate(targets):
        found = torch.autograd.grad(logits[s, target], recorded, retain_graph=True)
        for l, g in enumerate(found):
            windows = g.shape[0] // images.shape[0]
            grads[l][s * windows : (s + 1) * windows] = g[s * windows : (s + 1) * windows].numpy()
    return grads


def make_hf(kind: str = "swin", img: int = 64, seed: int = 0, num_labels: int = 5) -> torch.nn.Module:
    import transformers

    name = {"swin": "Swin", "swinv2": "Swinv2"}[kind]
    sizes = dict(image_size=img, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[1, 2], window_size=4)
    config = getattr(transformers, f"{name}Config")(**sizes, num_labels=num_labels)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{name}ForImageClassification")(config)
    with torch.no_grad():
        for module in model.modules():
            for proj in ("q_proj", "k_proj", "query", "key"):
                if isinstance(getattr(module, proj, None), torch.nn.Linear):
                    getattr(module, proj).weight.mul_(4.0)
    return model.eval()


def hf_window_softmax(attn: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A Hugging Face SwinAttention's or Swinv2SelfAttention's softmax by hand in float64 from its window inputs."""
    x = x.double()
    b_, n, c = x.shape
    v2 = hasattr(attn, "logit_scale")
    heads = attn.num_attention_heads
    q_proj, k_proj = (attn.query, attn.key) if v2 else (attn.q_proj, attn.k_proj)
    q = F.linear(x, q_proj.weight.double(), q_proj.bias.double()).reshape(b_, n, heads, -1).transpose(1, 2)
    k = F.linear(x, k_proj.weight.double(), None if k_proj.bias is None else k_proj.bias.double())
    k = k.reshape(b_, n, heads, -1).transpose(1, 2)
    if v2:
        logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        logits = logits * attn.logit_scale.double().clamp(max=math.log(100.0)).exp()
        table = attn.continuous_position_bias_mlp.double()(attn.relative_coords_table.double()).reshape(-1, heads)
        rel = table[attn.relative_position_index.reshape(-1)].reshape(n, n, heads).permute(2, 0, 1)
        logits = logits + 16 * torch.sigmoid(rel)[None]
    else:
        logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1) + attn.relative_position_bias().double()
    return _softmax(_add_mask(logits, mask))


def hf_blocks(model: torch.nn.Module, images: torch.Tensor) -> tuple[list[Block], torch.Tensor]:
    """Every block's stage grid, window index and float64 weights recomputed by hand, and the float64 logits."""
    m = copy.deepcopy(model).double().eval()
    found: list[Block] = []
    handles = []
    for block in (mod for mod in m.modules() if type(mod).__name__ in ("SwinLayer", "Swinv2Layer")):
        attn = block.attention if hasattr(block.attention, "q_proj") else block.attention.self
        seen = {}

        def grid(mod, args, kwargs, seen=seen):
            seen["hw"] = args[1] if len(args) > 1 else kwargs["input_dimensions"]

        def window(mod, args, kwargs, block=block, seen=seen):
            h, w = seen["hw"]
            shift = (int(block.shift_size),) * 2
            index = window_index(h, w, (int(block.window_size),) * 2, shift, roll_first=False)
            mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
            found.append(Block(h, w, index, hf_window_softmax(mod, args[0], mask)))

        handles.append(block.register_forward_pre_hook(grid, with_kwargs=True))
        handles.append(attn.register_forward_pre_hook(window, with_kwargs=True))
    with torch.no_grad():
        logits = m(pixel_values=images.double()).logits
    for handle in handles:
        handle.remove()
    return found, logits
