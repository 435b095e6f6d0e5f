"""Weights & Biases: images with a caption naming the probe rows, evolution animations as GIF videos."""

from __future__ import annotations

import inspect
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .base import Animation, LoggerWriter, check_image
from .files import file_name, save_gif

__all__ = ["WandbWriter"]


class WandbWriter(LoggerWriter):
    """Writes through a Lightning ``WandbLogger`` (or anything with its ``log_image`` / ``log_video`` /
    ``log_metrics``): each image is one ``log_image`` call, each animation a GIF handed to ``log_video``,
    the scalars one ``log_metrics`` call per pass; all carry ``trainer/global_step`` = ``step``. wandb itself is
    imported by the logger, only when used.

    Args:
        logger: the logger.
        directory: where the GIF files handed to ``log_video`` are written (W&B copies them into its run);
            default: a temporary folder.
    """

    def __init__(self, logger: Any, directory: str | Path | None = None) -> None:
        self.logger = logger
        self.directory = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="lightning_attn_"))

    @staticmethod
    def accepts(logger: Any) -> bool:
        """True for loggers with W&B's ``log_image(key, images, step, **kwargs)`` and ``log_video``."""
        log_image = getattr(logger, "log_image", None)
        if not callable(log_image) or not callable(getattr(logger, "log_video", None)):
            return False
        try:
            params = inspect.signature(log_image).parameters
        except (TypeError, ValueError):
            return False
        return {"key", "images", "step"} <= set(params)

    @classmethod
    def for_logger(cls, logger: Any, directory: Path) -> WandbWriter:
        """The writer for ``logger``; its GIFs are staged under ``directory/attention_gifs``."""
        return cls(logger, Path(getattr(logger, "save_dir", None) or directory) / "attention_gifs")

    def add_image(self, tag: str, image: np.ndarray, step: int) -> None:
        check_image(image)
        self.logger.log_image(key=tag, images=[image], step=step)

    def add_grid(self, tag: str, image: np.ndarray, step: int, rows: Sequence[str]) -> None:
        check_image(image)
        # W&B shows the caption under the image: the probe of each row, top to bottom
        caption = "rows: " + " | ".join(rows)
        self.logger.log_image(key=tag, images=[image], step=step, caption=[caption])

    def add_text(self, tag: str, text: str, step: int) -> None:
        """A one-row table (columns ``step``, ``text``) through the logger's ``log_text``, when it has one."""
        log_text = getattr(self.logger, "log_text", None)
        if callable(log_text):
            log_text(key=tag, columns=["step", "text"], data=[[step, text]], step=step)

    def add_html(self, tag: str, page: str, step: int) -> None:
        """An HTML panel: ``wandb.Html(page)`` through the logger's ``log_metrics`` (as its ``log_image`` does)."""
        import wandb

        self.logger.log_metrics({tag: wandb.Html(page, inject=False)}, step=step)

    def add_animation(self, tag: str, frames: Animation, step: int, duration_ms: int = 500) -> None:
        path = save_gif(frames, self.directory / f"{file_name(tag)}.gif", duration_ms)
        self.logger.log_video(key=tag, videos=[str(path)], step=step, format=["gif"])
