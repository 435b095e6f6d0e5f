"""Load what the command line is pointed at: a model (Lightning checkpoint, timm name, Hugging Face directory) and
image files. Every failure is a ``ValueError`` whose message names the problem and the fix."""

from __future__ import annotations

import importlib
import os
import pickle
import re
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


#: The opt-in, named in every refusal, for a checkpoint that holds more than tensors and plain values.
TRUST_HINT = (
    "if you trust where the file comes from, pass `--trust-checkpoint` (Python: `trust_checkpoint=True`), "
    "which loads it as a pickle that may run code"
)


class UntrustedCheckpointError(ValueError):
    """A checkpoint the weights-only loader refused; ``what`` names what it holds beyond tensors and values."""

    def __init__(self, path: str | os.PathLike[str], err: Exception) -> None:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        self.path = str(path)
        self.what = f"`{found.group(1)}`" if found else "Python objects beyond tensors and plain values"
        super().__init__(
            f"refused to load {self.path!r}: it holds {self.what}, beyond the tensors and plain values a safe load "
            f"reads (a pickle can run code); {TRUST_HINT}"
        )


def load_checkpoint_state(path: str | os.PathLike[str], *, trust_checkpoint: bool = False) -> dict[str, Any]:
    """The raw dictionary of a Lightning checkpoint (loaded on the CPU).

    Loaded with ``torch.load(weights_only=True)``: tensors, containers and plain values only, so that a file from
    anywhere cannot run code (the monitor's own state loads this way). ``trust_checkpoint=True`` unpickles
    anything, for trusted files whose hyper-parameters hold other objects.

    Raises:
        ValueError: the file is not a readable checkpoint; :class:`UntrustedCheckpointError` (a ValueError): it
            holds objects the safe loader refuses (one line naming the file and the opt-in).

    Example::

        >>> import tempfile, torch
        >>> with tempfile.TemporaryDirectory() as d:
        ...     torch.save({"global_step": 8, "state_dict": {}}, f"{d}/last.ckpt")
        ...     load_checkpoint_state(f"{d}/last.ckpt")["global_step"]
        8
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=not trust_checkpoint)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err):
            raise UntrustedCheckpointError(path, err) from None
        detail = str(err).strip().splitlines()[0] if str(err).strip() else "the file is empty or cut short"
        raise ValueError(
            f"cannot read checkpoint {str(path)!r} ({type(err).__name__}: {detail}): pass a file saved by "
            "Lightning (ModelCheckpoint or trainer.save_checkpoint)"
        ) from None
    if not isinstance(state, dict):
        raise ValueError(
            f"{str(path)!r} holds a {type(state).__name__}, not a Lightning checkpoint: pass a file saved by "
            "Lightning (ModelCheckpoint or trainer.save_checkpoint)"
        )
    return state


def _from_checkpoint(path: Path, model_class: str | None, trust_checkpoint: bool) -> nn.Module:
    # read safely first: a refused file ends here with one line, before any class of the user's is imported
    hparams = load_checkpoint_state(path, trust_checkpoint=trust_checkpoint).get("hyper_parameters") or {}
    if model_class is None:
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
        model = loader(str(path), map_location="cpu", weights_only=not trust_checkpoint)
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


def load_model(
    spec: str, *, model_class: str | None = None, pretrained: bool = False, trust_checkpoint: bool = False
) -> nn.Module:
    """The model ``spec`` names, in eval mode on the CPU.

    Args:
        spec: a Lightning checkpoint (``*.ckpt``), ``timm:<name>`` (random weights unless ``pretrained``), or a
            local Hugging Face model folder (with ``config.json``).
        model_class: the checkpoint's LightningModule as ``pkg.mod.Class`` (LightningCLI checkpoints name it).
        pretrained: load hub weights for a ``timm:`` name (needs the internet or a filled cache).
        trust_checkpoint: load a checkpoint that holds more than tensors and plain values (a pickle: it can run
            code; only for files from a source you trust). Default: refused with one line naming the file.
    """
    if spec.startswith("timm:"):
        import timm

        name = spec[len("timm:") :]
        if not timm.is_model(name):
            raise ValueError(f"timm has no model {name!r}: see `timm.list_models('*vit*')`")
        return timm.create_model(name, pretrained=pretrained).eval()
    path = Path(spec)
    if path.is_file():
        return _from_checkpoint(path, model_class, trust_checkpoint)
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
