"""Load what the command line is pointed at: a model (Lightning checkpoint, timm name, Hugging Face directory) and
image files. Every failure is a ``ValueError`` whose message names the problem and the fix."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["IMAGE_SUFFIXES", "find_images", "load_checkpoint_state", "load_model"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def find_images(paths: list[str | os.PathLike[str]]) -> list[Path]:
    """Image files among ``paths``, folders searched recursively (sorted), in the order given.

    Raises:
        ValueError: a path that does not exist, or no image at all.
    """
    found: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif path.is_file():
            found.append(path)
        else:
            raise ValueError(f"image path {str(path)!r} does not exist: pass image files or folders that hold them")
    if not found:
        raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {[str(p) for p in paths]}")
    return found


def _import_class(dotted: str) -> type:
    module_name, _, class_name = dotted.rpartition(".")
    if not module_name:
        raise ValueError(f"`--model-class {dotted}` must be a dotted path such as `my_project.models.LitViT`")
    if os.getcwd() not in sys.path:  # the user's own project, run from its folder
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(
            f"cannot import `{module_name}` for the model class `{dotted}` ({err}): run from the folder that holds "
            "it, or add it to PYTHONPATH"
        ) from None
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise ValueError(f"`{module_name}` has no class `{class_name}`: check `--model-class {dotted}`")
    return cls


def load_checkpoint_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The raw dictionary of a Lightning checkpoint (loaded on the CPU)."""
    try:
        # a Lightning checkpoint holds hyper-parameters and callback state beside tensors: not weights-only
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        raise ValueError(f"cannot read checkpoint {str(path)!r}: {type(err).__name__}: {err}") from None


def _from_checkpoint(path: Path, model_class: str | None) -> nn.Module:
    if model_class is None:
        hparams = load_checkpoint_state(path).get("hyper_parameters") or {}
        model_class = hparams.get("_class_path")
        if not model_class:
            raise ValueError(
                f"{path.name} does not say which LightningModule it holds (only LightningCLI checkpoints store "
                "`_class_path`): pass `--model-class my_project.models.LitViT`"
            )
    cls = _import_class(model_class)
    loader = getattr(cls, "load_from_checkpoint", None)
    if loader is None:
        raise ValueError(f"`{model_class}` is not a LightningModule (it has no `load_from_checkpoint`)")
    try:
        model = loader(str(path), map_location="cpu")
    except (RuntimeError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"the weights in {path.name} do not fit `{model_class}` ({first}): pass the class the checkpoint was "
            "trained with (`--model-class`)"
        ) from None
    return model.eval()


def _from_hugging_face(path: Path) -> nn.Module:
    try:
        import transformers
    except ImportError:
        raise ValueError(f"{path} is a Hugging Face model folder: `pip install lightning-attn[transformers]`") from None
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    architectures = getattr(config, "architectures", None) or []
    cls = next((getattr(transformers, a) for a in architectures if hasattr(transformers, a)), transformers.AutoModel)
    return cls.from_pretrained(path, local_files_only=True).eval()


def load_model(spec: str, *, model_class: str | None = None, pretrained: bool = False) -> nn.Module:
    """The model ``spec`` names, in eval mode on the CPU.

    Args:
        spec: a Lightning checkpoint (``*.ckpt``), ``timm:<name>`` (random weights unless ``pretrained``), or a
            local Hugging Face model folder (with ``config.json``).
        model_class: the checkpoint's LightningModule as ``pkg.mod.Class`` (LightningCLI checkpoints name it).
        pretrained: load hub weights for a ``timm:`` name (needs the internet or a filled cache).
    """
    if spec.startswith("timm:"):
        import timm

        name = spec[len("timm:") :]
        if not timm.is_model(name):
            raise ValueError(f"timm has no model {name!r}: see `timm.list_models('*vit*')`")
        return timm.create_model(name, pretrained=pretrained).eval()
    path = Path(spec)
    if path.is_file():
        return _from_checkpoint(path, model_class)
    if path.is_dir() and (path / "config.json").is_file():
        return _from_hugging_face(path)
    if path.is_dir():
        raise ValueError(
            f"{spec!r} is a folder without `config.json`: pass a Hugging Face model folder or a .ckpt file"
        )
    raise ValueError(
        f"model {spec!r} does not exist: pass a Lightning checkpoint (.ckpt), `timm:<model name>` or a Hugging Face "
        "model folder"
    )
