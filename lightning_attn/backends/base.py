"""What every model family's backend provides, and the tensor helpers they share.

A backend is the only code that knows one library's ViTs (timm, Hugging Face transformers, torchvision). It
answers two kinds of question:

* about **attention layers** (class methods, so a bare layer can be recorded without its model): is this module
  one of mine, can its softmax weights be rebuilt head by head from q and k while the model keeps its fused
  kernel, and how to hook it so each call hands over its weights;
* about a **whole model** (an instance wrapping it): its attention layers in forward order, the token layout of an
  input size, display statistics and preprocessing, how to call it on probe images and where its class logits are.

Everything past the backend (maps, rollout, diagnostics, render, the callback) sees tensors and
:class:`~lightning_attn.layout.TokenLayout` only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple, cast

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..layout import TokenLayout

__all__ = [
    "Backend",
    "CPU_CHUNK_BYTES",
    "Chunk",
    "DEFAULT_MEMORY_BUDGET",
    "EmitAttention",
    "EmitHeads",
    "Undo",
    "capture_budget",
    "chunk_steps",
    "stream_softmax",
    "take_calls",
    "take_softmax",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

#: Hands over one call's softmax weights (B, heads, N, N) of ``module``; the tensor the layer used (in the graph).
EmitAttention = Callable[[nn.Module, Tensor], None]
#: Hands over a chunk of float32 softmax weights: ``(module, chunk, weights)``, weights (b, h, N, N) for the probes
#: and heads the :class:`Chunk` names.
EmitHeads = Callable[[nn.Module, "Chunk", Tensor], None]
#: Undo actions, run last-first when a recording ends (hook removal, flag and config restoration).
Undo = list[Callable[[], None]]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_pair(value: object) -> tuple[int, int]:
    """``8`` -> (8, 8); ``(8, 16)`` -> (8, 16)."""
    if isinstance(value, int):
        return value, value
    a, b = cast("tuple[Any, Any]", value)  # a pair, or the unpacking raises as before
    return int(a), int(b)


#: Bytes of float32 attention a layer may hold at once while its weights are captured, unless told otherwise: the
#: whole (B, heads, N, N) softmax when it fits (one batched matmul, and timm layers reuse it for their output), else
#: as many heads at a time as fit, down to one.
DEFAULT_MEMORY_BUDGET = 256 * 2**20


def capture_budget(memory_budget: int | None, device: torch.device) -> int:
    """The bytes one layer's capture may use on ``device``: ``memory_budget`` (default
    :data:`DEFAULT_MEMORY_BUDGET`), on a GPU also at most half of what is free there (the driver's free memory
    plus what PyTorch's cache holds unused), so a probe pass never runs a nearly full GPU out of memory."""
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else int(memory_budget)
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        budget = min(budget, (free + cached) // 2)
    return max(0, budget)


class Chunk(NamedTuple):
    """Where a chunk of softmax weights sits in its layer call's (B, heads, N, N) attention: weights (b, h, N, N)
    of probes ``probes`` and heads ``heads``, out of ``num_probes`` and ``num_heads``. The chunks of a call come
    probes first, then heads: every head of probes 0..b-1, then of the next probes."""

    probes: slice
    heads: slice
    num_probes: int
    num_heads: int

    @property
    def ends_probes(self) -> bool:
        """The last chunk of its probes: every head of them has been handed over."""
        return self.heads.stop == self.num_heads

    @property
    def ends_call(self) -> bool:
        """The last chunk of the layer call."""
        return self.ends_probes and self.probes.stop == self.num_probes


#: On a CPU the probe pass rebuilds a layer's softmax a few probes at a time, each chunk's float32 weights at most
#: this many bytes, so that its logits and weights stay in the cache while they are reduced and multiplied by the
#: values, as the fused kernel's tiles do. A ViT-S/16 layer, 16 probes, 2 threads: 1.00x its fused forward this way,
#: 1.37x with every probe at once; smaller chunks were slower on every ViT size, 4 MiB on ViT-Ti and at 577 tokens
#: (``benchmarks/bench_chunks.py``).
CPU_CHUNK_BYTES = 2 * 2**20


def chunk_steps(
    probes: int, heads: int, n_query: int, n_key: int, budget: int, cache_bytes: int | None
) -> tuple[int, int, bool]:
    """How many probes and heads one chunk of a layer's softmax holds, and whether every head of a chunk's
    probes is there at once (then the layer's output may be computed from the weights).

    The heads come all at once when their float32 logits and weights fit in ``budget`` bytes, else as many as fit,
    down to one. With ``cache_bytes`` the probes come a few at a time, their weights within ``cache_bytes``, and the
    heads too when one probe's heads exceed it (the output still comes from the weights when the budget held them).
    """
    per = 4 * n_query * n_key  # one head of one probe, float32
    probe_step = probes if cache_bytes is None else min(probes, max(1, cache_bytes // (per * heads)))
    whole = 2 * per * probe_step * heads <= budget
    head_step = heads if whole else max(1, budget // (2 * per * probe_step))
    if cache_bytes is not None:
        head_step = min(head_step, max(1, cache_bytes // (per * probe_step)))
    return probe_step, head_step, whole


def stream_softmax(
    query: Tensor,
    key: Tensor,
    scale: float,
    bias: Callable[[int, int], Tensor | None],
    emit: Callable[[Chunk, Tensor], None],
    budget: int,
    value: Tensor | None = None,
    cache_bytes: int | None = None,
) -> Tensor | None:
    """Rebuild ``softmax(q k^T * scale + bias)`` in float32 and hand it to ``emit`` in chunks.

    ``query``/``key`` are (B, heads, N, D) exactly as the layer feeds them to its attention kernel; ``bias(h0, h1)``
    gives heads h0..h1-1's additive bias (broadcastable to (B, h1 - h0, N, N)) or None. :func:`chunk_steps` says
    what a chunk holds: every probe and as many heads as ``budget`` takes (their float32 logits and weights
    together, at least one head), or with ``cache_bytes`` a few probes at a time. ``emit(chunk, weights)``
    receives each as (b, h, N, N) with its :class:`Chunk`; only one chunk exists at a time, so with a small budget
    memory does not grow with the heads. With ``cache_bytes`` the weights handed over are overwritten by the next
    chunk's: clone what you keep.

    Returns the attention output ``weights @ value``, (B, heads, N, Dv) (a view of (B, N, heads, Dv) memory, the
    layout layers reshape to), computed chunk by chunk from the weights, when ``value`` is given, float32, autograd
    is off and the budget held every head of a chunk: the kernel's math path without q k^T and the softmax a
    second time. None otherwise: the layer's own kernel gives its output. Pass ``value`` only for dropout-free calls.
    Autocast is switched off: under bf16 it would turn these matmuls back into bf16.
    """
    b, heads, n_q, _ = query.shape
    if key.shape[1] != heads:  # grouped-query attention: each key head serves several query heads
        key = key.repeat_interleave(heads // key.shape[1], dim=1)
    n_k = key.shape[2]
    probe_step, head_step, whole = chunk_steps(b, heads, n_q, n_k, budget, cache_bytes)
    reuse = whole and value is not None and value.dtype == torch.float32 and not torch.is_grad_enabled()
    out = None
    if reuse:
        assert value is not None
        if value.shape[1] != heads:  # grouped-query attention
            value = value.repeat_interleave(heads // value.shape[1], dim=1)
        out = value.new_empty(b, n_q, heads, value.shape[-1]).transpose(1, 2)
    with torch.no_grad(), torch.autocast(device_type=query.device.type, enabled=False):
        q, k = query.float(), key.float()
        # One scratch buffer for the layer call, each chunk's operands contiguous views of it: a fresh tensor per
        # chunk costs the allocator new pages whenever it has just given freed ones back to the system. The weights
        # too with cache_bytes (the probe pass's reducer keeps nothing of them); without, each chunk's weights are
        # new memory, which a caller may keep.
        most = probe_step * head_step
        d_v = value.shape[-1] if out is not None and value is not None else 0
        shapes = [(n_q, n_k), (n_q, q.shape[-1]), (n_k, k.shape[-1]), (n_k, d_v), (n_q, d_v)]
        if cache_bytes is not None:
            shapes.append((n_q, n_k))
        scratch = q.new_empty(most * sum(rows * cols for rows, cols in shapes))
        # a chunk of heads' bias serves each chunk of probes: built once per call, not once per chunk
        biases: dict[int, Tensor | None] = {}
        for b0 in range(0, b, probe_step):
            b1 = min(b, b0 + probe_step)
            for h0 in range(0, heads, head_step):
                h1 = min(heads, h0 + head_step)
                shape = (b1 - b0, h1 - h0)
                logits, q_chunk, k_chunk, v_chunk, o_chunk, *weights_memory = _views(
                    scratch, most, shape[0] * shape[1], shapes
                )
                # scaling q (N x D) rather than the logits (N x N): fewer multiplies, and it makes the strided q
                # slice contiguous for the matmul in the same pass (timm's unfused path does the same)
                q_chunk = torch.mul(q[b0:b1, h0:h1], scale, out=q_chunk.view(*shape, n_q, -1))
                k_chunk = k_chunk.view(*shape, n_k, -1).copy_(k[b0:b1, h0:h1])
                logits = torch.matmul(q_chunk, k_chunk.transpose(-2, -1), out=logits.view(*shape, n_q, n_k))
                extra = biases[h0] if h0 in biases else bias(h0, h1)
                if probe_step < b:
                    biases[h0] = extra
                if extra is not None:
                    logits.add_(extra[b0:b1] if extra.dim() == 4 and extra.shape[0] > 1 else extra)
                if weights_memory:
                    weights = torch.softmax(logits, dim=-1, out=weights_memory[0].view(*shape, n_q, n_k))
                else:
                    weights = logits.softmax(dim=-1)
                emit(Chunk(slice(b0, b1), slice(h0, h1), b, heads), weights)
                if out is not None:
                    assert value is not None
                    v_chunk = v_chunk.view(*shape, n_k, d_v).copy_(value[b0:b1, h0:h1])
                    out[b0:b1, h0:h1] = torch.matmul(weights, v_chunk, out=o_chunk.view(*shape, n_q, d_v))
    return out


def _views(scratch: Tensor, most: int, size: int, shapes: list[tuple[int, int]]) -> list[Tensor]:
    """Flat, contiguous views of ``scratch`` for one chunk of ``size`` (probe, head) pairs: for each operand its
    ``shapes`` entry per pair; operand i starts where room for ``most`` pairs of the operands before it ends."""
    views, start = [], 0
    for rows, cols in shapes:
        views.append(scratch[start : start + size * rows * cols])
        start += most * rows * cols
    return views


def additive_bias(
    mask: Tensor | None,
    heads: slice,
    n_query: int,
    n_key: int,
    is_causal: bool,
    like: Tensor,
    true_means_keep: bool = True,
) -> Tensor | None:
    """The additive float32 bias of the heads in ``heads`` from an attention mask as attention kernels take it,
    broadcastable to (B, h, N, N), or None.

    ``mask`` may be bool (``true_means_keep``: SDPA's convention; False for ``nn.MultiheadAttention``, where True
    masks out) or additive float, shaped (N, N), (B, N, N), (B, 1 or heads, N, N).
    """
    bias: Tensor | None = None
    if is_causal:
        bias = torch.full((n_query, n_key), float("-inf"), device=like.device).triu(1)
    if mask is not None:
        if mask.dim() == 3:
            mask = mask[:, None]
        elif mask.dim() == 4 and mask.shape[1] > 1:
            mask = mask[:, heads]
        if mask.dtype == torch.bool:
            keep = mask if true_means_keep else ~mask
            extra = torch.zeros(mask.shape, dtype=torch.float32, device=like.device).masked_fill(~keep, float("-inf"))
        else:
            extra = mask.float()
        bias = extra if bias is None else bias + extra
    return bias


class _TakeCall(TorchFunctionMode):
    """Routes calls of the torch function ``func`` to ``handler``; every other torch function runs as usual.
    Pushed only while one layer runs (inside the handler the mode is off, so the real function runs)."""

    def __init__(self, func: Callable[..., Any], handler: Callable[..., Any]) -> None:
        super().__init__()
        self.func = func
        self.handler = handler

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is self.func:
            return self.handler(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def take_calls(module: nn.Module, func: Callable[..., Any], handler: Callable[..., Any], undo: Undo) -> None:
    """While ``module`` runs, route its calls of the torch function ``func`` (``F.scaled_dot_product_attention``,
    ``F.softmax``) to ``handler``: a torch function mode pushed by a forward pre-hook and popped by a forward hook
    that fires even when the layer raises; ``undo`` removes both and pops a mode left pushed."""
    mode = _TakeCall(func, handler)
    active: list[bool] = []

    def enter(*_: Any) -> None:
        mode.__enter__()
        active.append(True)

    def leave(*_: Any) -> None:
        if active:
            active.pop()
            mode.__exit__(None, None, None)

    undo.append(module.register_forward_pre_hook(enter).remove)
    # always_call: the mode is popped even when the layer raises
    undo.append(module.register_forward_hook(leave, always_call=True).remove)

    def leave_all() -> None:
        while active:
            leave()

    undo.append(leave_all)


def take_softmax(module: nn.Module, emit: EmitAttention, undo: Undo) -> None:
    """Hand every ``F.softmax`` result computed while ``module`` runs to ``emit``, for layers that compute their
    softmax once by hand (torchvision's and Hugging Face Swin V2's window attention): the tensor handed over is the
    one the layer goes on to use, in the autograd graph."""
    import torch.nn.functional as F

    def softmax(input: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        weights = F.softmax(input, *args, **kwargs)
        emit(module, weights)
        return weights

    take_calls(module, F.softmax, softmax, undo)


class Backend(ABC):
    """One model family. Subclass it in ``backends/<family>.py`` and add the module's name to
    ``lightning_attn.backends.BACKENDS``: that is all a new family needs.

    Class attributes:
        name: short family name (``"timm"``).
        supported: what is supported, one line for error messages and README.
    """

    name: ClassVar[str]
    supported: ClassVar[str]

    # ------------------------------------------------------------------ attention layers

    @classmethod
    @abstractmethod
    def is_attention_layer(cls, module: nn.Module) -> bool:
        """Whether ``module`` is a token self-attention layer of this family that can be recorded."""

    @classmethod
    def unsupported_layer(cls, module: nn.Module) -> str | None:
        """Why ``module``, an attention layer of this family, cannot be recorded (None if it is not one)."""
        return None

    @classmethod
    @abstractmethod
    def attach_recording(cls, module: nn.Module, emit: EmitAttention, undo: Undo) -> None:
        """Make every call of ``module`` hand its softmax weights, as used by the layer, to ``emit``."""

    @classmethod
    def can_stream_heads(cls, module: nn.Module) -> bool:
        """Whether :meth:`attach_head_stream` can rebuild ``module``'s weights from the q and k its kernel takes."""
        return False

    @classmethod
    def attach_head_stream(
        cls, module: nn.Module, emit: EmitHeads, undo: Undo, budget: int, cache_bytes: int | None = None
    ) -> None:
        """Make every call of ``module`` hand its float32 weights to ``emit`` in chunks (:func:`stream_softmax`:
        heads that fit in ``budget`` bytes, with ``cache_bytes`` a few probes at a time), its output as without
        the recording (to rounding where a layer computes it from the weights)."""
        raise NotImplementedError(f"{cls.name} cannot stream the heads of {type(module).__name__}")

    # ------------------------------------------------------------------ models

    @classmethod
    @abstractmethod
    def recognises(cls, module: nn.Module) -> bool:
        """Whether ``module`` is a whole ViT of this family that :class:`Backend` can watch."""

    @classmethod
    def unsupported_model(cls, module: nn.Module) -> str | None:
        """Why ``module``, a model of this family's library, cannot be watched (None if it is not one)."""
        return None

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @abstractmethod
    def attention_layers(self) -> list[tuple[str, nn.Module]]:
        """``(qualified name, module)`` of every token self-attention layer, in forward order."""

    @abstractmethod
    def layout(self, image_size: tuple[int, int], query: str = "auto") -> TokenLayout:
        """The token layout for inputs of ``image_size`` (H, W); ``query="auto"`` picks the token(s) the head reads."""

    @abstractmethod
    def input_size(self) -> tuple[int, int] | None:
        """The (H, W) the model was built for, or None when it takes any size."""

    @abstractmethod
    def check_images(self, images: Tensor) -> None:
        """Raise a ``ValueError`` naming the fix when ``images`` cannot go through the model."""

    @abstractmethod
    def display_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of the model's input normalisation (to turn probes back into pixels)."""

    @abstractmethod
    def transform(self) -> Callable[[Any], Tensor]:
        """The model's evaluation preprocessing of a PIL image: resize, crop, normalise."""

    def forward(self, images: Tensor) -> Any:
        """Run the model on preprocessed ``images``, as the probe pass and the faithfulness curves do."""
        return self.model(images)

    @abstractmethod
    def class_logits(self, output: Any) -> Tensor | None:
        """The (B, num_classes) class logits in ``output`` of :meth:`forward`, or None if the model has none."""

    @property
    @abstractmethod
    def has_class_logits(self) -> bool:
        """Whether :meth:`forward` returns class logits (gradient methods can then explain a class index)."""

    @property
    def num_classes(self) -> int | None:
        """How many classes the logits have, when known without a forward."""
        return None

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """``(qualified name, module)`` of the transformer block holding each attention layer, in forward order:
        the layer or its nearest ancestor that is an element of an ``nn.ModuleList`` or ``nn.Sequential``
        (timm's ``blocks.3``, Hugging Face's ``vit.layers.3``, torchvision's ``encoder.layers.encoder_layer_3``), else
        the layer itself. What :func:`~lightning_attn.sanity.sanity_check` randomises."""
        modules = dict(self.model.named_modules())
        found: list[tuple[str, nn.Module]] = []
        for name, layer in self.attention_layers():
            block = (name, layer)
            parts = name.split(".")
            for cut in range(len(parts), 0, -1):  # the layer itself, then its ancestors, nearest first
                if isinstance(modules.get(".".join(parts[: cut - 1])), (nn.ModuleList, nn.Sequential)):
                    block = (".".join(parts[:cut]), modules[".".join(parts[:cut])])
                    break
            if all(block[1] is not other for _, other in found):
                found.append(block)
        return found

    def reinitialise(self, block: nn.Module) -> None:
        """Draw ``block``'s parameters afresh from the global RNG, as when the model was built: by default each
        submodule's own ``reset_parameters()`` (``nn.MultiheadAttention``'s ``_reset_parameters()``), i.e.
        PyTorch's default initialisation. Parameters of modules with neither keep their values."""
        for module in block.modules():
            reset = getattr(module, "reset_parameters", None) or getattr(module, "_reset_parameters", None)
            if callable(reset):
                reset()

    def _check_query(self, query: str, has_cls: bool) -> None:
        from ..layout import QUERIES

        if query not in QUERIES:
            raise ValueError(f"`query` must be one of {QUERIES}, got {query!r}")
        if query in ("cls", "cls_dist") and not has_cls:
            raise ValueError(f"`query={query!r}` but {type(self.model).__name__} has no class token; use query='mean'")


class GenericBackend(Backend):
    """Any module holding attention layers some family can record, when the caller gives the token layout
    (a custom ViT built on ``nn.MultiheadAttention``, a wrapper): called as ``model(images)``, its output taken as
    class logits when it is a (B, num_classes) tensor."""

    name = "generic"
    supported = "any model holding recordable attention layers, with `layout=` given"

    @classmethod
    def is_attention_layer(cls, module: nn.Module) -> bool:
        return False

    @classmethod
    def attach_recording(cls, module: nn.Module, emit: EmitAttention, undo: Undo) -> None:
        raise NotImplementedError("GenericBackend records through each layer's own family")

    @classmethod
    def recognises(cls, module: nn.Module) -> bool:
        return False

    def __init__(self, model: nn.Module, layers: list[tuple[str, nn.Module]], layout: TokenLayout) -> None:
        super().__init__(model)
        self._layers = layers
        self._layout = layout

    def attention_layers(self) -> list[tuple[str, nn.Module]]:
        return self._layers

    def layout(self, image_size: tuple[int, int], query: str = "auto") -> TokenLayout:
        return self._layout

    def check_images(self, images: Tensor) -> None:
        return None

    def input_size(self) -> tuple[int, int] | None:
        return None

    def display_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        raise ValueError(f"cannot tell the input normalisation of {type(self.model).__name__}: pass `mean` and `std`")

    def transform(self) -> Callable[[Any], Tensor]:
        raise ValueError(f"cannot tell the preprocessing of {type(self.model).__name__}: pass `transform`")

    @property
    def has_class_logits(self) -> bool:
        return True  # checked on the output

    def class_logits(self, output: Any) -> Tensor | None:
        return output if isinstance(output, Tensor) and output.dim() == 2 else None
