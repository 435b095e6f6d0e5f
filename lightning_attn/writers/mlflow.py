"""MLflow: images as run artifacts (time-stepped with ``key``/``step`` from mlflow 2.12.1), GIFs as artifacts."""

from __future__ import annotations

import inspect
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .base import Animation, LoggerWriter, check_image
from .files import file_name, save_gif

__all__ = ["MLflowWriter"]


class MLflowWriter(LoggerWriter):
    """Writes through a Lightning ``MLFlowLogger`` (or anything with a ``run_id`` and an ``experiment`` that is an
    ``MlflowClient``): images with ``log_image(run_id, image, key=tag, step=step)`` (mlflow >= 2.12.1; older:
    ``artifact_file="attention/<tag>_step<step>.png"``), animations as GIF artifacts under ``attention/``, scalars
    with the logger's ``log_metrics``. mlflow itself is imported by the logger, only when used.

    Args:
        logger: the logger.
    """

    thread_safe = True  # each call is one request of MLflow's client, which keeps no state between them

    def __init__(self, logger: Any) -> None:
        self.logger = logger
        client = logger.experiment
        try:
            self._stepped = "key" in inspect.signature(client.log_image).parameters
        except (TypeError, ValueError):
            self._stepped = False

    @staticmethod
    def accepts(logger: Any) -> bool:
        """True for loggers with a ``run_id`` whose ``experiment`` has ``log_image`` and ``log_artifact``."""
        if getattr(logger, "run_id", None) is None:
            return False
        client = getattr(logger, "experiment", None)
        return callable(getattr(client, "log_image", None)) and callable(getattr(client, "log_artifact", None))

    @classmethod
    def for_logger(cls, logger: Any, directory: Path) -> MLflowWriter:
        """The writer for ``logger`` (``directory`` is not used: everything goes to the run's artifact store)."""
        return cls(logger)

    def add_image(self, tag: str, image: np.ndarray, step: int) -> None:
        check_image(image)
        client, run_id = self.logger.experiment, self.logger.run_id
        if self._stepped:
            client.log_image(run_id, image, key=tag, step=step)
        else:
            client.log_image(run_id, image, artifact_file=f"attention/{file_name(tag)}_step{step:07d}.png")

    def add_text(self, tag: str, text: str, step: int) -> None:
        """A text artifact ``alerts/<tag with / as __>_step<step>.txt`` (``MlflowClient.log_text``)."""
        artifact = f"alerts/{file_name(tag)}_step{step:07d}.txt"
        self.logger.experiment.log_text(self.logger.run_id, text, artifact_file=artifact)

    def add_html(self, tag: str, page: str, step: int) -> None:
        """An artifact ``<tag with / as __>.html`` (``MlflowClient.log_text``): MLflow's artifact view shows it."""
        self.logger.experiment.log_text(self.logger.run_id, page, artifact_file=f"{file_name(tag)}.html")

    def add_animation(self, tag: str, frames: Animation, step: int, duration_ms: int = 500) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = save_gif(frames, Path(tmp) / f"{file_name(tag)}.gif", duration_ms)
            self.logger.experiment.log_artifact(self.logger.run_id, str(path), artifact_path="attention")
