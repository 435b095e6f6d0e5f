"""Record the softmax attention weights of a ViT's self-attention layers for the forwards in a block.

Model-agnostic: which modules are attention layers and how to hook them is each model family's backend's business
(:mod:`lightning_attn.backends`); this module owns the hooks and restorations of one recording, so that they are
undone on every exit, errors included, and hands the weights over in forward order. Fused attention kernels never
materialise the softmax matrix (timm's ``fused_attn``, Hugging Face ``sdpa``, ``nn.MultiheadAttention`` with
``need_weights=False``), which is why hooks that merely watch for it, as the widely copied recipes do, record
nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .backends import find_vision_transformers, layer_backend, layers_of, unsupported_message
from .backends.base import Chunk, Undo

__all__ = [
    "AttentionRecorder",
    "find_attention_modules",
    "find_vision_transformers",
    "record_attention",
    "record_head_attention",
    "stream_attention",
    "supports_head_streaming",
]

#: Called for every attention layer as its hook fires: ``(layer_index, attention)`` with attention (B, heads, N, N).
AttentionCallback = Callable[[int, Tensor], None]


def find_attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Return ``(qualified_name, module)`` for every token self-attention layer of ``model``, in forward order.

    For a supported ViT (see :func:`~lightning_attn.backends.backend_for`) these are its backend's layers (a
    ``CLIPModel``'s vision tower only, say); for any other module, every attention layer a backend can record
    (a bare layer, a wrapper).

    Raises:
        ValueError: if ``model`` has no such layer (a CNN, XCiT channel attention, CaiT class attention, ...),
            with what is supported.

    Example::

        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)
        >>> [name for name, _ in find_attention_modules(vit)]
        ['blocks.0.attn', 'blocks.1.attn']
    """
    found = layers_of(model)
    if not found:
        raise ValueError(f"no attention layers found in {type(model).__name__}: {unsupported_message(model)}")
    return found


class AttentionRecorder:
    """Owns the hooks and restorations of one recording; use it through :func:`record_attention`.

    Attributes:
        names: qualified names of the hooked layers, in module order.
        attentions: one (B, heads, N, N) tensor per layer call, in the order the layers ran (empty when
            ``store=False``); each is the tensor the layer went on to use, so gradients with respect to it are the
            layer's own.
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
        self._undo: Undo = []

    @property
    def num_calls(self) -> int:
        """How many attention matrices were seen since the recording started."""
        return self._calls

    def _emit(self, module: nn.Module, attn: Tensor) -> None:
        index = self._calls
        self._calls += 1
        if self._store:
            self.attentions.append(attn)
        if self._on_attention is not None:
            self._on_attention(index, attn)

    def attach(self) -> None:
        try:
            for module in self._modules:
                backend = layer_backend(module)
                assert backend is not None, "record_attention checked every module"
                backend.attach_recording(module, self._emit, self._undo)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Remove every hook and restore every flag and config; safe to call twice."""
        while self._undo:
            self._undo.pop()()


@contextmanager
def record_attention(
    model: nn.Module,
    modules: Sequence[nn.Module] | Sequence[tuple[str, nn.Module]] | None = None,
    on_attention: AttentionCallback | None = None,
    store: bool = True,
) -> Iterator[AttentionRecorder]:
    """Record the softmax attention of every self-attention layer of ``model`` during the forwards in the block.

    Inside the block the hooked layers compute their attention explicitly (timm: ``fused_attn`` off; Hugging Face:
    the eager computation through an attention function registered for the block; ``nn.MultiheadAttention``:
    recomputed in a forward hook); on exit (also when the block raises) every hook is removed and every flag and
    attention implementation is back to its previous value, so outside the block the model runs exactly as before.

    Args:
        model: a ViT of a supported family (timm, Hugging Face transformers, torchvision), or any module holding
            attention layers of one.
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
        bad = [name for name, m in named if layer_backend(m) is None]
        if bad or not named:
            raise ValueError(
                f"`modules` must be attention layers of a supported family (see find_attention_modules); got "
                f"{bad or 'none'}. Leave `modules=None` to find them automatically."
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

#: Called for each chunk of heads as a layer runs: ``(layer_index, first_head, num_heads, attention)`` with attention
#: (B, h, N, N) float32, the softmax weights of heads ``first_head .. first_head + h - 1``.
ChunkCallback = Callable[[int, int, int, Tensor], None]


def supports_head_streaming(module: nn.Module) -> bool:
    """Whether :func:`stream_attention` can rebuild ``module``'s softmax weights from the q and k its attention
    kernel takes, while the layer keeps its fused kernel.

    True for timm's ``Attention`` (vit_*, deit*, dinov2, clip, flexivit), EVA's and BEiT's attention (q and k after
    the rotary embeddings, the relative position bias as the kernel's mask), Hugging Face attention layers and
    ``nn.MultiheadAttention``.
    """
    backend = layer_backend(module)
    return backend is not None and backend.can_stream_heads(module)


@contextmanager
def stream_attention(
    model: nn.Module,
    modules: Sequence[nn.Module],
    on_chunk: ChunkCallback,
    memory_budget: int | None = None,
) -> Iterator[None]:
    """Hand each layer's float32 softmax weights to ``on_chunk`` as the layer runs, in chunks of heads, keeping the
    model's fused attention kernel.

    The weights ``softmax(q k^T * scale + bias)`` are rebuilt in float32 from the exact q, k and mask the layer feeds
    its kernel. A chunk holds as many heads as fit in ``memory_budget`` bytes (logits and weights, float32; default
    :data:`~lightning_attn.backends.base.DEFAULT_MEMORY_BUDGET`, on a GPU at most half its free memory): usually all
    of them, one batched matmul, and then timm and Hugging Face layers compute their output from these very weights
    instead of running q k^T a second time (float32, no grad; the output equals the fused kernel's to rounding).
    Over the budget, the heads come a few at a time, down to one: the extra memory stops growing with the heads,
    and the layer's own kernel gives its output. The gradients of the model are never involved. Every module must
    pass :func:`supports_head_streaming`; everything is undone on exit, errors included.
    """

    def every_probe(index: int, chunk: Chunk, attention: Tensor) -> None:
        on_chunk(index, chunk.heads.start, chunk.num_heads, attention)

    with stream_chunks(model, modules, every_probe, memory_budget):
        yield


@contextmanager
def stream_chunks(
    model: nn.Module,
    modules: Sequence[nn.Module],
    on_chunk: Callable[[int, Chunk, Tensor], None],
    memory_budget: int | None = None,
    cache_bytes: int | None = None,
) -> Iterator[None]:
    """:func:`stream_attention` with chunks of probes as well as heads: ``on_chunk(layer_index, chunk, weights)``,
    weights (b, h, N, N) for the probes and heads the :class:`~lightning_attn.backends.base.Chunk` names. With
    ``cache_bytes`` (on a CPU, :data:`~lightning_attn.backends.base.CPU_CHUNK_BYTES`) a chunk's weights stay within
    that many bytes, a few probes at a time, so that rebuilding, reducing them and computing the layer's output
    from them happen in the cache; without, every chunk holds every probe, as in :func:`stream_attention`."""
    from .backends.base import capture_budget

    bad = [type(m).__name__ for m in modules if not supports_head_streaming(m)]
    if bad or not modules:
        raise ValueError(f"streaming needs layers that stream heads, got {bad or 'none'}; use record_attention")
    if memory_budget is not None and (
        isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 0
    ):
        raise ValueError(f"`memory_budget` must be None or an int >= 0 (bytes), got {memory_budget!r}")
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    budget = capture_budget(memory_budget, device)
    undo: Undo = []
    calls: dict[int, int] = {}  # id(module) -> layer index of its current call
    order = [0]

    def emit(module: nn.Module, chunk: Chunk, attention: Tensor) -> None:
        if chunk.probes.start == 0 and chunk.heads.start == 0:
            calls[id(module)] = order[0]
            order[0] += 1
        on_chunk(calls[id(module)], chunk, attention)

    try:
        for module in modules:
            backend = layer_backend(module)
            assert backend is not None, "checked above"
            backend.attach_head_stream(module, emit, undo, budget, cache_bytes)
        yield
    finally:
        while undo:
            undo.pop()()


@contextmanager
def record_head_attention(
    model: nn.Module, modules: Sequence[nn.Module], on_head: HeadCallback, memory_budget: int | None = 0
) -> Iterator[None]:
    """Hand the softmax attention of each layer to ``on_head`` one head at a time, keeping the fused kernel.

    :func:`stream_attention` with a per-head callback: with the default ``memory_budget=0`` each head's (B, N, N)
    weights are rebuilt alone, so at most one head's matrix exists at a time and the layer's output is computed as
    without the recording; a larger budget rebuilds several heads at once and hands them over one by one.
    """

    def on_chunk(index: int, first: int, heads: int, attention: Tensor) -> None:
        for offset in range(attention.shape[1]):
            on_head(index, first + offset, heads, attention[:, offset])

    with stream_attention(model, modules, on_chunk, memory_budget):
        yield
