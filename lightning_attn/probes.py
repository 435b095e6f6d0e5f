"""Probe images: turn what the user passes (a tensor, image paths or PIL images, or N loader images) into one
fixed batch for the model, plus the statistics that turn it back into displayable pixels."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import torch
from torch import Tensor, nn

__all__ = [
    "MANY_PROBES",
    "BatchToProbes",
    "Probes",
    "split_batch",
    "display_stats",
    "load_images",
    "model_transform",
    "take_from_loader",
]

if TYPE_CHECKING:  # PIL is imported when images are loaded, not with the package
    import PIL.Image

ImageLike = Union[str, Path, "PIL.Image.Image"]

# Keys under which dict batches commonly carry their images and labels (torchvision, HF datasets, timm).
_IMAGE_KEYS = ("image", "images", "img", "pixel_values", "input", "inputs", "x")
_LABEL_KEYS = ("label", "labels", "target", "targets", "y")


#: Above this many probes a pass costs seconds and its grids megabytes (measured in benchmarks/): warn.
MANY_PROBES = 64


def _check_images(images: object) -> Tensor:
    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"probe images must form a (B, C, H, W) tensor, got {shape}")
    if images.shape[0] == 0:
        raise ValueError("probe images are an empty batch (B = 0): pass at least one image")
    if images.is_meta:
        raise ValueError(
            "probe images are on the meta device (no data): create them on the CPU, e.g. "
            "`torch.randn(8, 3, 224, 224)`, or load real images"
        )
    if not images.is_floating_point():
        raise ValueError(
            f"probe images are {images.dtype} pixels, not model inputs: pass float tensors preprocessed like the "
            "training inputs (e.g. `(images / 255 - mean) / std`), or pass image paths / PIL images, which the model's "
            "own transform preprocesses"
        )
    if not torch.isfinite(images).all():
        raise ValueError("probe images contain NaN or inf: pass finite, preprocessed images")
    return images


def _check_labels(labels: object, batch: int) -> Tensor:
    if isinstance(labels, (str, bytes)) or (
        isinstance(labels, (list, tuple)) and any(isinstance(v, (str, bytes)) for v in labels)
    ):
        raise ValueError(
            f"`labels` must be class indices (ints), got {labels!r}: map class names to indices, and pass the names "
            "as `class_names=` to show them on the rows"
        )
    try:
        values = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"`labels` must be a sequence or tensor of class indices, got {type(labels).__name__}: {err}"
        ) from None
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise ValueError(
            f"`labels` must be integer class indices, got {values.dtype} (floats would be truncated): pass "
            "`labels.long()` if they hold whole numbers"
        )
    if values.dim() > 1:
        # (B, 1) would read as B labels, one-hot (B, C) as B x C: say which shape, not guess
        raise ValueError(
            f"`labels` must be 1-D, one class index per probe, got shape {tuple(values.shape)}: pass "
            "`labels.view(-1)` for (B, 1) labels, `labels.argmax(1)` for one-hot ones"
        )
    values = values.long().reshape(-1)
    if values.shape[0] != batch:
        raise ValueError(f"`labels` has {values.shape[0]} entries for {batch} probes: pass one per probe")
    if (values < 0).any():
        raise ValueError(f"`labels` must be class indices >= 0, got {values.tolist()}")
    return values


def _check_masks(masks: object, images: Tensor) -> Tensor:
    values = torch.as_tensor(masks)
    b, _, h, w = images.shape
    if values.dim() == 4 and values.shape[1] == 1:
        values = values[:, 0]
    if values.dim() != 3 or values.shape[0] != b:
        raise ValueError(f"`masks` must be (B, H, W) with B = {b} probes, got {tuple(values.shape)}")
    if tuple(values.shape[1:]) != (h, w):
        swapped = " (H and W swapped?)" if tuple(values.shape[1:]) == (w, h) else ""
        raise ValueError(
            f"`masks` are {values.shape[1]}x{values.shape[2]} but the probes are {h}x{w}{swapped}: give each probe "
            "a mask of its own height and width"
        )
    if values.dtype != torch.bool:
        if not (
            values.is_floating_point()
            or values.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
        ):
            raise ValueError(f"`masks` must be bool or hold values in [0, 1], got {values.dtype}")
        if values.is_floating_point() and not torch.isfinite(values).all():
            raise ValueError("`masks` contain NaN or inf: pass bool masks or values in [0, 1]")
        if values.numel() and (values.min() < 0 or values.max() > 1):
            hint = " (0/255 image masks: pass `masks > 127`)" if values.max() > 1 and values.max() <= 255 else ""
            raise ValueError(
                f"`masks` must be bool or hold values in [0, 1], got values up to {values.max().item()}{hint}"
            )
    return values


@dataclass
class Probes:
    """A fixed batch of probe images with optional per-probe labels (B,) and masks (B, H, W).

    Everything is checked on construction, with the fix in the message: float, finite, non-empty images off the
    meta device; integer class labels (one per probe, >= 0); masks bool or in [0, 1], of the probes' own H x W.
    """

    images: Tensor
    labels: Tensor | None = None
    masks: Tensor | None = None

    def __post_init__(self) -> None:
        self.images = _check_images(self.images)
        b = self.images.shape[0]
        if self.labels is not None:
            self.labels = _check_labels(self.labels, b)
        if self.masks is not None:
            self.masks = _check_masks(self.masks, self.images)

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device) -> Probes:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Probes(self.images.to(device), move(self.labels), move(self.masks))


def model_transform(model: nn.Module) -> Callable[[Any], Tensor]:
    """The model's own evaluation transform (resize, crop, normalise) for its input size, from its backend."""
    from .backends import backend_for

    return backend_for(model).transform()


def display_stats(
    model: nn.Module, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std that un-normalise probe pixels for display: the given ones, else the model's own."""
    if mean is None or std is None:
        from .backends import backend_for

        own_mean, own_std = backend_for(model).display_stats()
        mean = own_mean if mean is None else mean
        std = own_std if std is None else std
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _open_image(path: Path) -> Any:
    """``path`` as an RGB PIL image; a missing, unreadable or oversized file is a ``ValueError`` naming it."""
    from PIL import Image

    if not path.is_file():
        raise ValueError(f"probe image {str(path)!r} does not exist")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Image.DecompressionBombError as err:
        raise ValueError(
            f"cannot read an image: {str(path)!r} has more pixels than PIL opens by default ({err}): shrink it, or "
            "raise `PIL.Image.MAX_IMAGE_PIXELS` if you trust the file"
        ) from None
    except (OSError, SyntaxError, ValueError) as err:  # not an image, empty, truncated
        detail = str(err).strip().splitlines()[0] if str(err).strip() else "empty or cut short"
        raise ValueError(
            f"cannot read an image: {str(path)!r} is not an image file PIL can open ({type(err).__name__}: "
            f"{detail}): pass PNG, JPEG or other image files"
        ) from None


def load_images(images: Iterable[ImageLike], transform: Callable[[Any], Tensor]) -> Tensor:
    """Open paths (or take PIL images), convert to RGB and stack ``transform(image)`` into (B, C, H, W)."""
    from PIL import Image

    out = []
    for item in images:
        if isinstance(item, (str, Path)):
            item = _open_image(Path(item))
        elif isinstance(item, Image.Image):
            item = item.convert("RGB")
        else:
            raise ValueError(f"probes must be image paths or PIL images, got {type(item).__name__}")
        tensor = transform(item)
        if not isinstance(tensor, Tensor) or tensor.dim() != 3:
            got = type(tensor).__name__ if not isinstance(tensor, Tensor) else f"a {tensor.dim()}-d tensor"
            raise ValueError(
                f"`transform` returned {got}, not a (C, H, W) tensor: end it with `transforms.ToTensor()` (then "
                "`transforms.Normalize(mean, std)` as in training)"
            )
        out.append(tensor)
    if not out:
        raise ValueError("`probes` is an empty list: pass at least one image")
    return torch.stack(out)


#: Reads one validation batch: ``batch -> images`` or ``batch -> (images, labels or None)``.
BatchToProbes = Callable[[Any], Union[Tensor, "tuple[Tensor, Tensor | None]"]]

_FIX = "pass `batch_to_probes=lambda batch: (images, labels)` (or `probes` as a tensor)"


def _is_labels(value: Any, batch: int) -> bool:
    return (
        isinstance(value, Tensor)
        and value.dim() == 1
        and value.shape[0] == batch
        and not (value.is_floating_point() or value.dtype == torch.bool)
    )


def split_batch(batch: Any) -> tuple[Tensor, Tensor | None, str | None]:
    """``(images, labels or None, why no labels or None)`` of one validation batch in a common layout: a tensor,
    a tuple/list with the images first, a dict (or dataclass) with image and label keys.

    Labels are the batch's 1-D integer tensor with one entry per image (so (images, masks, labels) works); when a
    batch carries other things but none is recognisably the labels, the reason says so instead of dropping them
    silently.
    """
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        batch = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    if isinstance(batch, Tensor):
        return batch, None, None
    if isinstance(batch, dict):
        image_key = next((k for k in _IMAGE_KEYS if k in batch), None)
        if image_key is None or not isinstance(batch[image_key], Tensor):
            raise ValueError(
                f"cannot find images in a validation batch with keys {sorted(map(str, batch))}: expected one of "
                f"{_IMAGE_KEYS}; {_FIX}"
            )
        images = batch[image_key]
        label_key = next((k for k in _LABEL_KEYS if k in batch), None)
        if label_key is not None and _is_labels(batch[label_key], images.shape[0]):
            return images, batch[label_key], None
        others = sorted(str(k) for k in batch if k != image_key)
        return (
            images,
            None,
            (f"no integer labels under {_LABEL_KEYS} among the batch's keys {others}" if others else None),
        )
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        images = batch[0]
        found = [v for v in batch[1:] if _is_labels(v, images.shape[0])]
        if len(found) == 1:
            return images, found[0], None
        if len(batch) > 1:
            why = "several 1-D integer tensors" if found else "no 1-D integer tensor with one entry per image"
            return images, None, f"{why} among the batch's {len(batch) - 1} other elements"
        return images, None, None
    raise ValueError(
        f"cannot find images in a validation batch of type {type(batch).__name__}: expected a tensor, "
        f"(images, labels, ...), a dict or a dataclass; {_FIX}"
    )


def _read(batch: Any, batch_to_probes: BatchToProbes | None) -> tuple[Tensor, Tensor | None, str | None]:
    if batch_to_probes is None:
        return split_batch(batch)
    out = batch_to_probes(batch)
    if isinstance(out, Tensor):
        out = (out, None)
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[0], Tensor)):
        got = type(out).__name__ if not isinstance(out, (tuple, list)) else f"a {len(out)}-item {type(out).__name__}"
        raise ValueError(f"`batch_to_probes` must return images (a (B, C, H, W) tensor) or (images, labels), got {got}")
    images, labels = out
    return images, labels, None


def take_from_loader(loader: Iterable[Any], n: int, batch_to_probes: BatchToProbes | None = None) -> Probes:
    """The first ``n`` images (and labels, when the batches carry them) of ``loader``, copied off the loader.

    Raises:
        ValueError: the loader has fewer than ``n`` images or its batches cannot be read (the message names
            ``batch_to_probes``).
    """
    images, labels = [], []
    count = 0
    why_not: str | None = None
    for batch in loader:
        x, y, why = _read(batch, batch_to_probes)
        why_not = why_not or why
        images.append(x.detach().clone().cpu())
        labels.append(None if y is None else torch.as_tensor(y).detach().clone().cpu())
        count += x.shape[0]
        if count >= n:
            break
    if count < n:
        raise ValueError(
            f"`probes={n}` asks for {n} validation images but the validation dataloader has only {count}: "
            "lower `probes` or pass a tensor of probe images"
        )
    has_labels = all(y is not None for y in labels)
    if not has_labels and why_not:
        warnings.warn(
            f"AttentionMonitor took the probes without labels ({why_not}); rows show predictions only and the "
            f"class-targeted maps explain them. To keep the labels, {_FIX}.",
            RuntimeWarning,
            stacklevel=2,
        )
    return Probes(
        torch.cat(images)[:n],
        torch.cat(labels)[:n] if has_labels else None,  # type: ignore[arg-type]
    )
