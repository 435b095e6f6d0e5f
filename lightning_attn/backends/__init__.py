"""Model families: one module per library, the only code that knows timm, transformers or torchvision.

A new family is one file defining a :class:`~lightning_attn.backends.base.Backend` subclass named ``Backend``'s
way (see the three here) plus its module name in :data:`BACKENDS`. Backend modules are imported only when a model
could be theirs, so transformers and torchvision stay optional.
"""

from __future__ import annotations

import importlib
import sys

from torch import nn

from ..layout import TokenLayout
from .base import Backend, GenericBackend

__all__ = [
    "BACKENDS",
    "Backend",
    "backend_for",
    "find_vision_transformers",
    "layer_backend",
    "register_slice",
    "supported_models",
    "token_layout",
]

#: Registered families: module name under ``lightning_attn.backends`` -> (class name, top-level library).
BACKENDS: dict[str, tuple[str, str]] = {
    "timm": ("TimmBackend", "timm"),
    # before "transformers": Swin V2's attention layer would otherwise look like a ViT layer to its is_attention_layer
    "transformers_swin": ("TransformersSwinBackend", "transformers"),
    "transformers": ("TransformersBackend", "transformers"),
    "torchvision": ("TorchvisionBackend", "torchvision"),
    "timm_swin": ("TimmSwinBackend", "timm"),
    "torchvision_swin": ("TorchvisionSwinBackend", "torchvision"),
}


_CLASSES: dict[str, type[Backend]] = {}  # backend classes imported so far, by module name


def _loaded() -> list[type[Backend]]:
    """The backends whose library is imported: a model of a library nobody imported cannot be in memory.
    Asked for every layer of every pass, so each backend module is imported once and kept."""
    found = []
    for module_name, (class_name, library) in BACKENDS.items():
        if library in sys.modules:
            if module_name not in _CLASSES:
                _CLASSES[module_name] = getattr(importlib.import_module(f".{module_name}", __name__), class_name)
            found.append(_CLASSES[module_name])
    return found


def supported_models() -> str:
    """One line per family: what can be watched."""
    lines = []
    for module_name, (class_name, _) in BACKENDS.items():
        try:
            lines.append(getattr(importlib.import_module(f".{module_name}", __name__), class_name).supported)
        except ImportError:  # pragma: no cover - a family whose library is not installed still gets named
            lines.append(module_name)
    return "; ".join(lines)


def layer_backend(module: nn.Module) -> type[Backend] | None:
    """The backend that can record attention layer ``module``, or None if it is not one."""
    return next((b for b in _loaded() if b.is_attention_layer(module)), None)


def _unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "_orig_mod", module)  # torch.compile wrapper: hooks go on the eager module


def backend_for(model: nn.Module, layout: TokenLayout | None = None) -> Backend:
    """The backend of a whole ViT ``model`` (a ``torch.compile`` wrapper is looked through).

    With ``layout`` given, a model no backend recognises is still accepted when it holds attention layers some
    family can record (:class:`~lightning_attn.backends.base.GenericBackend`: called as ``model(images)``).

    Raises:
        ValueError: ``model`` is no supported ViT; the message lists what is supported and, where known, why this
            model is not.

    Example::

        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)
        >>> backend_for(vit).name, [name for name, _ in backend_for(vit).attention_layers()]
        ('timm', ['blocks.0.attn', 'blocks.1.attn'])
    """
    model = _unwrap(model)
    for backend in _loaded():
        if backend.recognises(model):
            return backend(model)
    if layout is not None:
        layers = _recordable_layers(model)
        if layers:
            return GenericBackend(model, layers, layout)
    raise ValueError(unsupported_message(model))


def unsupported_message(model: nn.Module) -> str:
    """Why no backend watches ``model`` and what is supported."""
    reasons = []
    for name, module in model.named_modules():
        for backend in _loaded():
            why = backend.unsupported_model(module)
            if why:
                reasons.append(f"`{name or '<the model>'}` is {why}")
                break
        if len(reasons) == 3:
            break
    if not reasons:
        layers = sorted({why for m in model.modules() for b in _loaded() for why in [b.unsupported_layer(m)] if why})
        reasons = [f"its attention layers are {', '.join(layers)}: not token self-attention"] if layers else []
    detail = f" ({'; '.join(reasons)})" if reasons else ""
    if any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        # a ViT of one's own, as in Lightning's tutorials: recordable once its token layout is known
        custom = (
            " Its attention layers are `nn.MultiheadAttention`: a ViT of your own on them works with "
            "`AttentionMonitor(layout=TokenLayout(num_prefix_tokens=1, grid_size=(gh, gw), query='cls'), mean=..., "
            "std=...)` (see docs/options.md)."
        )
    else:
        custom = " If your model wraps one, pass the wrapped ViT itself (e.g. `AttentionMonitor(module='backbone')`)."
    return (
        f"{type(model).__name__} is not a supported Vision Transformer{detail}. Supported: {supported_models()}."
        + custom
    )


def find_vision_transformers(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost submodules of ``root`` (``root`` itself included, as ``""``) that a backend can watch.
    ``torch.compile`` wrappers are skipped in favour of the eager module they hold, so hooks never touch a
    compiled graph.

    Example::

        >>> import timm
        >>> wrapper = nn.ModuleDict({"vit": timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1)})
        >>> [name for name, _ in find_vision_transformers(wrapper)]
        ['vit']
    """
    backends = _loaded()
    found: list[tuple[str, nn.Module]] = []
    for name, module in root.named_modules():
        if hasattr(module, "_orig_mod"):
            continue
        if any(outer == "" or name == outer or name.startswith(outer + ".") for outer, _ in found):
            continue
        if any(b.recognises(module) for b in backends):
            found.append((name, module))
    return found


def token_layout(model: nn.Module, image_size: tuple[int, int], query: str = "auto") -> TokenLayout:
    """The token layout of ``model`` for inputs of ``image_size`` (H, W), read by its backend.

    The grid comes from the actual input, not from the size the model was built for, so non-square and dynamic
    image sizes work. ``query="auto"`` picks the token(s) the model's head reads: the class token, the class and
    distillation tokens (distilled DeiT), or the mean over patches (average or attention pooling, no class token).

    Example::

        >>> import timm
        >>> vit = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=(28, 42))
        >>> token_layout(vit, (28, 42))
        TokenLayout(num_prefix_tokens=5, grid_size=(2, 3), query='cls', patch_size=(14, 14), num_registers=4)
    """
    return backend_for(model).layout(image_size, query)


def layers_of(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Attention layers of ``model``: its backend's when it is a whole ViT, else every recordable layer in it."""
    model = _unwrap(model)
    try:
        return backend_for(model).attention_layers()
    except ValueError:
        pass
    return _recordable_layers(model)


def _recordable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every attention layer in ``model`` that some family can record, whatever holds it."""
    backends = _loaded()
    return [(n, m) for n, m in model.named_modules() if any(b.is_attention_layer(m) for b in backends)]


def register_slice(model: nn.Module) -> slice | None:
    """Where ``model``'s register tokens sit in its token sequence, or None if it has none.

    Registers are the last prefix tokens in every supported family: ``[class][registers][patches]``
    (``vit_*_reg4_dinov2``: tokens 1..4; Hugging Face ``Dinov2WithRegistersModel`` likewise), ``[registers][patches]``
    without a class token (``*_reg4_gap_*``: tokens 0..3).

    Example::

        >>> import timm
        >>> vit = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=28, depth=1)
        >>> register_slice(vit), register_slice(timm.create_model("vit_tiny_patch16_224", pretrained=False))
        (slice(1, 5, None), None)
    """
    backend = backend_for(model)
    return backend.layout(backend.input_size() or (224, 224)).register_slice
