"""Find the self-attention layers of a timm ViT and record their softmax weights for one forward.

timm attention modules (``Attention``, ``EvaAttention``, BEiT's ``Attention``...) compute the softmax matrix by
hand and pass it through ``attn_drop`` only when ``fused_attn`` is False; by default they call
``F.scaled_dot_product_attention`` and the matrix never exists. :func:`record_attention` therefore switches
``fused_attn`` off on the hooked modules only, hooks ``attn_drop``, and undoes both on exit, whatever happens.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "AttentionRecorder",
    "find_attention_modules",
    "find_vision_transformers",
    "record_attention",
    "record_head_attention",
    "supports_head_streaming",
]

#: Called for every attention layer as its hook fires: ``(layer_index, attention)`` with attention (B, heads, N, N).
AttentionCallback = Callable[[int, Tensor], None]


# timm layers that follow the same `fused_attn`/`attn_drop` pattern but are not token self-attention, so rollout
# over a token sequence does not apply to them; keyed by class name, the reason goes into the error message.
NOT_TOKEN_SELF_ATTENTION = {
    "WindowAttention": "Swin window attention (per local window, no global token)",
    "XCA": "XCiT cross-covariance attention (over channels, not tokens)",
    "ClassAttn": "CaiT/XCiT class attention (a single class query over the patches)",
    "TalkingHeadAttn": "CaiT talking-heads attention (heads mixed after the softmax)",
}


def _has_attention_api(module: nn.Module) -> bool:
    return isinstance(getattr(module, "attn_drop", None), nn.Module) and hasattr(module, "fused_attn")


def _is_attention(module: nn.Module) -> bool:
    return _has_attention_api(module) and type(module).__name__ not in NOT_TOKEN_SELF_ATTENTION


def find_attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Return ``(qualified_name, module)`` for every token self-attention layer of ``model``, in module order.

    A layer qualifies when it exposes both ``attn_drop`` (the module that receives the softmax weights) and
    ``fused_attn`` (timm's switch between SDPA and the explicit softmax path). This covers timm's ViT family
    (vit_*, deit*, deit3, dinov2, clip, flexivit), EVA/EVA02 and BEiT, whatever their class names.

    Raises:
        ValueError: if ``model`` has no such layer (a CNN, Swin window attention, XCiT channel attention, ...).

    Example::

        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)
        >>> [name for name, _ in find_attention_modules(vit)]
        ['blocks.0.attn', 'blocks.1.attn']
    """
    found = [(name, m) for name, m in model.named_modules() if _is_attention(m)]
    if not found:
        skipped = sorted({type(m).__name__ for m in model.modules() if _has_attention_api(m)})
        if skipped:
            reasons = "; ".join(f"{n}: {NOT_TOKEN_SELF_ATTENTION[n]}" for n in skipped)
            raise ValueError(
                f"{type(model).__name__} has attention layers, but none is token self-attention ({reasons}). "
                "Attention rollout needs a plain ViT-style encoder (vit_*, deit*, dinov2, clip, flexivit, eva02, "
                "beit); if only part of your model is one, pass that submodule."
            )
        raise ValueError(
            f"no attention layers with `attn_drop` and `fused_attn` found in {type(model).__name__}: "
            "lightning_attn records the softmax weights of timm token self-attention (vit_*, deit*, dinov2, clip, "
            "flexivit, eva02, beit). Swin window attention, XCiT channel attention, CaiT talking heads and CNNs are "
            "not token self-attention. If your ViT wraps the backbone, pass the backbone itself "
            "(e.g. `record_attention(model.backbone)` or `AttentionMonitor(module='backbone')`)."
        )
    return found


def find_vision_transformers(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost submodules of ``root`` (``root`` itself included, as ``""``) that look like a ViT: a
    ``patch_embed`` module plus token self-attention layers beneath. ``torch.compile`` wrappers are skipped in
    favour of the eager module they hold, so hooks never touch a compiled graph.

    Example::

        >>> import timm
        >>> wrapper = nn.ModuleDict({"vit": timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1)})
        >>> [name for name, _ in find_vision_transformers(wrapper)]
        ['vit']
    """
    found: list[tuple[str, nn.Module]] = []
    for name, module in root.named_modules():
        if hasattr(module, "_orig_mod"):
            continue
        if any(name == outer or name.startswith(outer + ".") or outer == "" for outer, _ in found):
            continue
        if isinstance(getattr(module, "patch_embed", None), nn.Module) and any(
            _is_attention(m) for m in module.modules()
        ):
            found.append((name, module))
    return found


class AttentionRecorder:
    """Owns the hooks and ``fused_attn`` flags of one recording; use it through :func:`record_attention`.

    Attributes:
        names: qualified names of the hooked layers, in module order.
        attentions: one (B, heads, N, N) tensor per layer call, in the order the layers ran (empty when
            ``store=False``).
    """

    def __init__(
        self,
        modules: Sequence[tuple[str, nn.Module]],
        on_attention: AttentionCallback | None = None,
        store: bool = True,
    ) -> None:
        self.names = [name for name, _ in modules]
        self.attentions: list[Tensor] = []
        self._modules = [m for _, m in modules]
        self._on_attention = on_attention
        self._store = store
        self._calls = 0
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._saved_flags: list[tuple[nn.Module, object]] = []

    @property
    def num_calls(self) -> int:
        """How many attention matrices were seen since the recording started."""
        return self._calls

    def _hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        # The input of attn_drop is the softmax matrix itself (before dropout, which is a no-op in eval anyway).
        attn = inputs[0]
        index = self._calls
        self._calls += 1
        if self._store:
            self.attentions.append(attn)
        if self._on_attention is not None:
            self._on_attention(index, attn)

    def attach(self) -> None:
        try:
            for module in self._modules:
                self._saved_flags.append((module, module.fused_attn))
                module.fused_attn = False
                self._handles.append(module.attn_drop.register_forward_hook(self._hook))
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Remove every hook and restore every ``fused_attn`` flag; safe to call twice."""
        while self._handles:
            self._handles.pop().remove()
        while self._saved_flags:
            module, flag = self._saved_flags.pop()
            module.fused_attn = flag


@contextmanager
def record_attention(
    model: nn.Module,
    modules: Sequence[nn.Module] | Sequence[tuple[str, nn.Module]] | None = None,
    on_attention: AttentionCallback | None = None,
    store: bool = True,
) -> Iterator[AttentionRecorder]:
    """Record the softmax attention of every self-attention layer of ``model`` during the forwards in the block.

    Inside the block, fused attention is off on the hooked layers only; on exit (also when the block raises)
    all hooks are removed and every ``fused_attn`` flag is back to its previous value, so outside the block the
    model runs exactly as before.

    Args:
        model: a timm ViT (or any module holding timm-style attention layers).
        modules: the attention layers to hook; default: :func:`find_attention_modules` of ``model``.
        on_attention: called as each layer's hook fires with ``(index, attention)``; lets a caller reduce each
            matrix at once instead of keeping L of them (see :func:`lightning_attn.attention_maps`).
        store: keep the matrices in ``recorder.attentions``; turn off when ``on_attention`` consumes them.

    Example::

        >>> import timm, torch
        >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)
        >>> with record_attention(vit.eval()) as rec, torch.no_grad():
        ...     _ = vit(torch.randn(2, 3, 32, 32))
        >>> [tuple(a.shape) for a in rec.attentions]
        [(2, 3, 17, 17), (2, 3, 17, 17)]
    """
    if modules is None:
        named = find_attention_modules(model)
    else:
        named = [m if isinstance(m, tuple) else (type(m).__name__, m) for m in modules]
        bad = [name for name, m in named if not _is_attention(m)]
        if bad or not named:
            raise ValueError(
                f"`modules` must be attention layers exposing `attn_drop` and `fused_attn`; got {bad or 'none'}. "
                "Leave `modules=None` to find them automatically."
            )
    recorder = AttentionRecorder(named, on_attention=on_attention, store=store)
    recorder.attach()
    try:
        yield recorder
    finally:
        recorder.release()


#: Called once per head as a layer runs: ``(layer_index, head_index, num_heads, attention)`` with attention
#: (B, N, N) float32, the softmax weights of that head.
HeadCallback = Callable[[int, int, int, Tensor], None]


def supports_head_streaming(module: nn.Module) -> bool:
    """Whether :func:`record_head_attention` can rebuild ``module``'s softmax weights from its normalised q and k.

    True for timm's plain ``Attention`` (vit_*, deit*, dinov2, clip, flexivit): its logits are exactly
    ``q * scale @ k^T`` plus an optional mask. EVA (rotary embeddings applied after ``k_norm``) and BEiT (relative
    position bias) add terms that q and k do not show, so they go through :func:`record_attention`.
    """
    from timm.layers.attention import Attention

    return type(module) is Attention and isinstance(module.q_norm, nn.Module) and isinstance(module.k_norm, nn.Module)


def _head_bias(mask: Tensor | None, is_causal: bool, head: int, n: int, like: Tensor) -> Tensor | None:
    """The additive bias SDPA applies to one head's logits, as (B or 1, N, N) float32 (None when there is none)."""
    if is_causal:
        return torch.full((n, n), float("-inf"), dtype=torch.float32, device=like.device).triu(1)
    if mask is None:
        return None
    if mask.dim() == 4:
        mask = mask[:, head if mask.shape[1] > 1 else 0]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32, device=like.device).masked_fill(~mask, float("-inf"))
    return mask.float()


@contextmanager
def record_head_attention(model: nn.Module, modules: Sequence[nn.Module], on_head: HeadCallback) -> Iterator[None]:
    """Hand the softmax attention of each layer to ``on_head`` one head at a time, keeping timm's fused kernel.

    Hooks on ``q_norm`` and ``k_norm`` see the exact q and k the layer feeds to ``scaled_dot_product_attention``;
    each head's weights ``softmax(q_h * scale @ k_h^T + bias)`` are rebuilt in float32 and passed on, so at most
    one head's (B, N, N) matrix exists at a time: the extra memory does not grow with the number of heads, where
    the unfused path materialises (B, heads, N, N) scores and weights. Every module must pass
    :func:`supports_head_streaming`. Hooks are removed on exit, errors included; no flag is changed.
    """
    bad = [type(m).__name__ for m in modules if not supports_head_streaming(m)]
    if bad or not modules:
        raise ValueError(f"record_head_attention needs timm `Attention` layers, got {bad or 'none'}; use record_attention")
    handles: list[torch.utils.hooks.RemovableHandle] = []
    calls = [0]

    def hooks_for(module: nn.Module) -> None:
        state: dict[str, Any] = {}

        def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            state["mask"] = kwargs.get("attn_mask", args[1] if len(args) > 1 else None)
            state["causal"] = bool(kwargs.get("is_causal", args[2] if len(args) > 2 else False))

        def keep_q(mod: nn.Module, args: tuple, q: Tensor) -> None:
            state["q"] = q

        def use_k(mod: nn.Module, args: tuple, k: Tensor) -> None:
            q = state.pop("q")
            index = calls[0]
            calls[0] += 1
            heads, n = q.shape[1], q.shape[2]
            # float32 whatever the training precision: autocast would turn these matmuls back into bf16
            with torch.autocast(device_type=q.device.type, enabled=False):
                for h in range(heads):
                    logits = (q[:, h].float() * module.scale) @ k[:, h].float().transpose(-2, -1)
                    bias = _head_bias(state.get("mask"), state.get("causal", False), h, n, logits)
                    if bias is not None:
                        logits = logits + bias
                    on_head(index, h, heads, logits.softmax(dim=-1))

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.q_norm.register_forward_hook(keep_q))
        handles.append(module.k_norm.register_forward_hook(use_k))

    try:
        for module in modules:
            hooks_for(module)
        yield
    finally:
        while handles:
            handles.pop().remove()
