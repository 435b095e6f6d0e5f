"""Probe images: turn what the user passes (a tensor, image paths or PIL images, or N loader images) into one
fixed batch for the model, plus the statistics that turn it back into displayable pixels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, Union

import torch
from torch import Tensor, nn

__all__ = ["Probes", "display_stats", "load_images", "model_transform", "take_from_loader"]

ImageLike = Union[str, Path, "PIL.Image.Image"]  # noqa: F821

# Keys under which dict batches commonly carry their images and labels (torchvision, HF datasets, timm).
_IMAGE_KEYS = ("image", "images", "img", "pixel_values", "input", "inputs", "x")
_LABEL_KEYS = ("label", "labels", "target", "targets", "y")


@dataclass
class Probes:
    """A fixed batch of probe images with optional per-probe labels (B,) and masks (B, H, W)."""

    images: Tensor
    labels: Tensor | None = None
    masks: Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.images, Tensor) or self.images.dim() != 4:
            shape = tuple(self.images.shape) if isinstance(self.images, Tensor) else type(self.images).__name__
            raise ValueError(f"probe images must form a (B, C, H, W) tensor, got {shape}")
        b = self.images.shape[0]
        if self.labels is not None:
            self.labels = torch.as_tensor(self.labels).long().reshape(-1)
            if self.labels.shape[0] != b:
                raise ValueError(f"`labels` has {self.labels.shape[0]} entries for {b} probes: pass one per probe")
        if self.masks is not None:
            self.masks = torch.as_tensor(self.masks)
            if self.masks.dim() == 4 and self.masks.shape[1] == 1:
                self.masks = self.masks[:, 0]
            if self.masks.dim() != 3 or self.masks.shape[0] != b:
                raise ValueError(
                    f"`masks` must be (B, H, W) with B = {b} probes, got {tuple(self.masks.shape)}"
                )

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device) -> "Probes":
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


def load_images(images: Iterable[ImageLike], transform: Callable[[Any], Tensor]) -> Tensor:
    """Open paths (or take PIL images), convert to RGB and stack ``transform(image)`` into (B, C, H, W)."""
    from PIL import Image

    out = []
    for item in images:
        if isinstance(item, (str, Path)):
            path = Path(item)
            if not path.is_file():
                raise ValueError(f"probe image {str(path)!r} does not exist")
            with Image.open(path) as img:
                item = img.convert("RGB")
        elif isinstance(item, Image.Image):
            item = item.convert("RGB")
        else:
            raise ValueError(f"probes must be image paths or PIL images, got {type(item).__name__}")
        out.append(transform(item))
    if not out:
        raise ValueError("`probes` is an empty list: pass at least one image")
    return torch.stack(out)


def _split_batch(batch: Any) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, dict):
        image_key = next((k for k in _IMAGE_KEYS if k in batch), None)
        if image_key is None:
            raise ValueError(
                f"cannot find images in a validation batch with keys {sorted(batch)}: expected one of "
                f"{_IMAGE_KEYS}; pass `probes` as a tensor instead"
            )
        label_key = next((k for k in _LABEL_KEYS if k in batch), None)
        return batch[image_key], batch[label_key] if label_key else None
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) and batch[1].dim() == 1 else None
        return batch[0], labels
    raise ValueError(
        f"cannot find images in a validation batch of type {type(batch).__name__}: expected a tensor, "
        "(images, labels, ...) or a dict; pass `probes` as a tensor instead"
    )


def take_from_loader(loader: Iterable[Any], n: int) -> Probes:
    """The first ``n`` images (and labels, when the batches carry them) of ``loader``, copied off the loader."""
    images, labels = [], []
    count = 0
    for batch in loader:
        x, y = _split_batch(batch)
        images.append(x.detach().clone().cpu())
        labels.append(None if y is None else y.detach().clone().cpu())
        count += x.shape[0]
        if count >= n:
            break
    if count < n:
        raise ValueError(
            f"`probes={n}` asks for {n} validation images but the validation dataloader has only {count}: "
            "lower `probes` or pass a tensor of probe images"
        )
    has_labels = all(y is not None for y in labels)
    return Probes(
        torch.cat(images)[:n],
        torch.cat(labels)[:n] if has_labels else None,  # type: ignore[arg-type]
    )
