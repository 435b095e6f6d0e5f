"""Where rendered grids, animations and scalars go: one writer per destination behind :class:`AttentionWriter`.

:func:`writers_for` gives each of the trainer's loggers its writer, chosen by what the logger can do
(:data:`LOGGER_WRITERS`, first match; PNG/GIF files otherwise). A new logger is one new module with a class that
has ``accepts(logger)`` and ``for_logger(logger, directory)``, plus one line in :data:`LOGGER_WRITERS`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .background import BackgroundWriter, in_background
from .base import Animation, AttentionWriter, ChartLayout, WriteError, check_image
from .files import PNGWriter, gif_bytes, save_gif
from .mlflow import MLflowWriter
from .select import WriterSet
from .select import writers_for as _writers_for
from .tensorboard import IMAGE_FORMATS, TensorBoardWriter, encode_image
from .wandb import WandbWriter

__all__ = [
    "IMAGE_FORMATS",
    "LOGGER_WRITERS",
    "Animation",
    "AttentionWriter",
    "BackgroundWriter",
    "ChartLayout",
    "MLflowWriter",
    "PNGWriter",
    "TensorBoardWriter",
    "WandbWriter",
    "WriteError",
    "WriterSet",
    "check_image",
    "encode_image",
    "gif_bytes",
    "in_background",
    "save_gif",
    "writers_for",
]

#: Writers for loggers, tried in order; the first whose ``accepts(logger)`` is true serves that logger.
LOGGER_WRITERS = (TensorBoardWriter, WandbWriter, MLflowWriter)


def writers_for(loggers: Sequence[Any], directory: str | Path) -> WriterSet:
    """A :class:`WriterSet` with one writer per logger, picked from :data:`LOGGER_WRITERS` (see
    :func:`lightning_attn.writers.select.writers_for`)."""
    return _writers_for(loggers, directory, LOGGER_WRITERS)
