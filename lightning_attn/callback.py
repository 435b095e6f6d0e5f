"""``AttentionMonitor``: a thin Lightning callback that runs the functional core on fixed probes and logs it."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor, nn
from typing_extensions import override

from .backends import Backend, backend_for, find_vision_transformers, unsupported_message
from .faithfulness import PerturbationCurves, perturbation_curves, random_perturbation_curves
from .layout import QUERIES
from .maps import AGGREGATIONS, GRADIENT_METHODS, METHODS, AttentionMaps, attention_maps, check_explainable
from .probes import Probes, display_stats, load_images, take_from_loader
from .render import check_cmap, filmstrip, layer_step_image, make_grid, matrix_tiles, overlay, to_display
from .report import layer_series, scalar_layout, scalar_report, tag_prefix
from .rollout import check_discard_ratio, check_head_fusion
from .writers import AttentionWriter, WriterSet, writers_for

__all__ = ["AttentionMonitor"]

_ON_ERROR = ("warn", "raise")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def _check_layer_list(name: str, layers: Sequence[int] | None, allow_none: bool) -> tuple[int, ...] | None:
    if layers is None and allow_none:
        return None
    if isinstance(layers, int) or not all(isinstance(l, int) and not isinstance(l, bool) for l in layers or ()):
        raise ValueError(f"`{name}` must be a sequence of layer indices (ints, negative counts from the end), got {layers!r}")
    if len(set(layers)) != len(layers):  # type: ignore[arg-type]
        raise ValueError(f"`{name}` has repeated layers: {layers!r}")
    return tuple(layers)  # type: ignore[arg-type]


class AttentionMonitor(Callback):
    r"""Log where each layer of a ViT looks on fixed probe images, at every ``every_n_epochs``-th validation.

    Works with timm, Hugging Face transformers and torchvision ViTs (``lightning_attn.supported_models()``).

    Every logged step writes, per method, one image grid (rows = probes; columns = the probe, then one heatmap
    overlay per chosen layer), a grid of the aggregates over layers (mean / max / min of the raw maps), optionally
    token x token attention matrices, and per-layer normalised-entropy scalars (0 = all attention on one patch,
    1 = uniform). A baseline pass runs when training starts, before any update. Hooks exist only during the probe
    pass, which runs in eval mode on the training device under the trainer's precision; the model's modes, grad
    flags, fused-attention flags and the global RNG state are as they were afterwards.

    Every logger of the trainer gets everything, at ``trainer.global_step``: the scalars through its
    ``log_metrics``, the images and animations through a writer picked by what the logger can do (TensorBoard,
    Weights & Biases, MLflow; PNG/GIF files under its ``log_dir`` for any other, CSV included; see
    :func:`lightning_attn.writers.writers_for`). Tags start with ``attention`` (``attention_<name>`` with
    ``name=``); scalar tags read ``attention_<metric>/<chart>/<line>``, so TensorBoard shows one section per
    metric, and a custom-scalars layout draws one chart per metric and method with a line per layer. Every rank
    runs the probe pass; only global rank zero writes.

    Args:
        probes: fixed images to watch: a (B, C, H, W) tensor preprocessed for the model; a list of image paths
            or PIL images (preprocessed with the model's own evaluation transform, or ``transform``); or an int N, the
            first N images of the validation dataloader, taken once and kept for the whole run.
        labels: optional (B,) class of each probe (shown on the grid rows).
        masks: optional (B, H, W) object mask of each probe: the pointing game (share of each method's final
            map inside the mask) is logged when given.
        module: the ViT inside the LightningModule, as an attribute path (``"model.backbone"``) or the module;
            default: found automatically (the one supported ViT it holds).
        methods: maps to log, any of ``"raw"`` (each layer's attention of the query token), ``"rollout"``
            (attention rollout up to each layer), and the class-targeted ``"grad_rollout"`` (gradient-weighted
            rollout) and ``"relevance"`` (Chefer et al. 2021), which explain each probe's label when ``labels``
            are known, else its predicted class (a backward pass on the probes; parameters' ``.grad`` untouched).
        target: for the class-targeted methods and faithfulness of a model without class logits (a Hugging Face
            base model, a CLIP or SigLIP tower): a callable taking the model's output (for a ``CLIPModel``, the
            (B, D) image embedding) and returning a (B,) score to explain, e.g. the similarity to a text embedding.
        layers: layer indices shown as columns (negative counts from the end); default all.
        aggregates: reductions over layers of the raw maps shown in the aggregates grid; ``()`` turns it off.
        matrix_layers: layers whose full token x token attention (head-fused) is logged; default none.
        every_n_epochs: log at the end of every n-th validation epoch.
        log_baseline: log once when training starts, before any update (step 0 of a fresh run).
        head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads.
        discard_ratio: share in [0, 1) of each fused attention's smallest entries zeroed before the rollout.
        query: ``"auto"`` (class token when the head reads it, else the mean over patch tokens), ``"cls"``, ``"mean"``.
        tile_size: pixels on the long side of each tile.
        cmap: matplotlib colormap name of the heatmaps.
        alpha: heatmap opacity over the image, in [0, 1].
        log_entropy: log the per-layer normalised entropy scalars.
        head_layers: layers whose per-head maps are logged, one tile per head (DINO's view); ``()`` turns it off.
        diagnostics: log drift from the baseline and from the previous pass (Jensen–Shannon divergence), artifact
            tokens, register-token share and mean attention distance per layer.
        artifact_threshold: a patch is an artifact token when it takes more than this many times the median share
            of the query row.
        faithfulness: log deletion AUCs (most / least important patches first) of each method's final-layer map
            and of a random map, each pass (2 x ``faithfulness_steps`` extra forwards of the probes per method).
        faithfulness_steps: removal steps of the deletion curves.
        filmstrip_length: the filmstrip shows the baseline and this many most recent passes of the final-layer map.
        gif: at the end of fit, log an animated GIF per probe of that map over all logged steps to every
            writer (TensorBoard: images tab and ``<log_dir>/attention/``; W&B: a video; MLflow: an artifact).
        transform: preprocessing for path / PIL probes instead of the model's own.
        mean: per-channel mean that un-normalises probe pixels for display (default: the model's data config).
        std: per-channel std, likewise.
        on_error: ``"warn"`` (default): a failing probe pass warns once per kind of error and is skipped,
            training goes on; ``"raise"``: the error stops training.
        name: a word that makes every tag start with ``attention_<name>`` and enters the ``state_key``, so that
            several monitors (a teacher and a student, two sets of ``methods``) share one trainer.
        writer: your own :class:`~lightning_attn.writers.AttentionWriter` (or a list of them) to take every
            image, animation and scalar instead of the writers chosen for the trainer's loggers.

    Raises:
        ValueError: at construction, for any invalid option; at setup, when the model has no (or several
            candidate) ViTs, or the probes do not fit the model.

    Example::

        >>> import timm, torch, lightning.pytorch as pl
        >>> from lightning_attn import AttentionMonitor
        >>> class LitViT(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.model = timm.create_model("vit_tiny_patch16_224", pretrained=False,
        ...                                        img_size=32, patch_size=8, depth=2, num_classes=2)
        ...     def forward(self, x):
        ...         return self.model(x)
        ...     def training_step(self, batch, _):
        ...         return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])
        ...     def validation_step(self, batch, _):
        ...         self.log("val_loss", torch.nn.functional.cross_entropy(self(batch[0]), batch[1]))
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.01)
        >>> data = torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 2, (8,)))
        >>> loader = torch.utils.data.DataLoader(data, batch_size=4)
        >>> monitor = AttentionMonitor(probes=torch.randn(2, 3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)
        >>> trainer = pl.Trainer(max_epochs=1, callbacks=[monitor], default_root_dir=getfixture("tmp_path"),
        ...                      enable_progress_bar=False, enable_model_summary=False, logger=pl.loggers.TensorBoardLogger(getfixture("tmp_path")))
        >>> trainer.fit(LitViT(), loader, loader)
        >>> sorted(k for k in monitor.last_metrics if k.startswith("attention_entropy/raw"))
        ['attention_entropy/raw/layer_00', 'attention_entropy/raw/layer_01']
    """

    def __init__(
        self,
        probes: Tensor | Sequence[str | os.PathLike[str] | Any] | int = 8,
        *,
        labels: Tensor | Sequence[int] | None = None,
        masks: Tensor | None = None,
        module: str | nn.Module | None = None,
        methods: Sequence[str] = ("raw", "rollout"),
        target: Callable[[Any], Tensor] | None = None,
        layers: Sequence[int] | None = None,
        aggregates: Sequence[str] = AGGREGATIONS,
        matrix_layers: Sequence[int] = (),
        every_n_epochs: int = 1,
        log_baseline: bool = True,
        head_fusion: str = "mean",
        discard_ratio: float = 0.0,
        query: str = "auto",
        tile_size: int = 96,
        cmap: str = "jet",
        alpha: float = 0.5,
        log_entropy: bool = True,
        head_layers: Sequence[int] = (-1,),
        diagnostics: bool = True,
        artifact_threshold: float = 10.0,
        faithfulness: bool = False,
        faithfulness_steps: int = 10,
        filmstrip_length: int = 8,
        gif: bool = True,
        transform: Callable[[Any], Tensor] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        on_error: str = "warn",
        name: str | None = None,
        writer: AttentionWriter | Sequence[AttentionWriter] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(probes, bool) or not isinstance(probes, (int, Tensor, list, tuple)):
            raise ValueError(
                "`probes` must be a (B, C, H, W) tensor, a list of image paths or PIL images, or an int N "
                f"(the first N validation images), got {type(probes).__name__}"
            )
        if isinstance(probes, int) and probes < 1:
            raise ValueError(f"`probes` as an int must be >= 1 (number of validation images), got {probes}")
        if isinstance(probes, (list, tuple)) and not probes:
            raise ValueError("`probes` is an empty list: pass at least one image path or PIL image")
        if isinstance(probes, int) and (labels is not None or masks is not None):
            raise ValueError("`labels`/`masks` go with tensor or image probes; with `probes=N` labels come from the loader")
        if isinstance(probes, Tensor):
            Probes(probes, labels, masks)  # validates shapes now, not at setup
        if module is not None and not isinstance(module, (str, nn.Module)):
            raise ValueError(f"`module` must be an attribute path (str) or an nn.Module, got {type(module).__name__}")
        if isinstance(methods, str) or not methods or any(m not in METHODS for m in methods):
            raise ValueError(f"`methods` must be a non-empty sequence of {METHODS}, got {methods!r}")
        if target is not None and (isinstance(target, Tensor) or not callable(target)):
            raise ValueError(
                "`target` must be a callable `output -> (B,) score` (for models without class logits); class "
                f"indices come from `labels`; got {type(target).__name__}"
            )
        if isinstance(aggregates, str) or any(a not in AGGREGATIONS for a in aggregates):
            raise ValueError(f"`aggregates` must be a sequence of {AGGREGATIONS} (or empty), got {aggregates!r}")
        self.layers = _check_layer_list("layers", layers, allow_none=True)
        if self.layers is not None and not self.layers:
            raise ValueError("`layers` is empty: pass None for all layers or at least one index")
        self.matrix_layers = _check_layer_list("matrix_layers", matrix_layers, allow_none=False) or ()
        self.head_layers = _check_layer_list("head_layers", head_layers, allow_none=False) or ()
        for option, value, low in (("faithfulness_steps", faithfulness_steps, 1), ("filmstrip_length", filmstrip_length, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"`{option}` must be an int >= {low}, got {value!r}")
        if isinstance(artifact_threshold, bool) or not isinstance(artifact_threshold, (int, float)) or artifact_threshold <= 1:
            raise ValueError(f"`artifact_threshold` must be a number > 1 (times the median share), got {artifact_threshold!r}")
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"`every_n_epochs` must be an int >= 1, got {every_n_epochs!r}")
        check_head_fusion(head_fusion)
        check_discard_ratio(discard_ratio)
        if query not in QUERIES:
            raise ValueError(f"`query` must be one of {QUERIES}, got {query!r}")
        if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 8:
            raise ValueError(f"`tile_size` must be an int >= 8 (pixels), got {tile_size!r}")
        check_cmap(cmap)
        if not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"`alpha` must be in [0, 1], got {alpha!r}")
        for option, stats in (("mean", mean), ("std", std)):
            if stats is not None and len(stats) not in (1, 3):
                raise ValueError(f"`{option}` must hold 1 or 3 values (one per channel), got {stats!r}")
        if std is not None and any(s <= 0 for s in std):
            raise ValueError(f"`std` values must be > 0, got {std!r}")
        if on_error not in _ON_ERROR:
            raise ValueError(f"`on_error` must be one of {_ON_ERROR}, got {on_error!r}")
        if name is not None and not (isinstance(name, str) and _NAME.fullmatch(name)):
            raise ValueError(
                f"`name` must be None or a word of letters, digits, '_' and '-' (e.g. 'student'), got {name!r}: "
                "it starts every tag, and loggers such as MLflow accept only such characters"
            )
        writers = [writer] if isinstance(writer, AttentionWriter) else writer
        if writers is not None and (
            isinstance(writers, (str, bytes)) or not writers or not all(isinstance(w, AttentionWriter) for w in writers)
        ):
            raise ValueError(
                "`writer` must be None (one writer per logger of the trainer), an AttentionWriter or a non-empty "
                f"list of them (subclass lightning_attn.writers.AttentionWriter), got {writer!r}"
            )

        self.probes = probes
        self.labels = labels
        self.masks = masks
        self.module = module
        self.methods = tuple(methods)
        self.target = target
        self.aggregates = tuple(aggregates)
        self.every_n_epochs = every_n_epochs
        self.log_baseline = log_baseline
        self.head_fusion = head_fusion
        self.discard_ratio = float(discard_ratio)
        self.query = query
        self.tile_size = tile_size
        self.cmap = cmap
        self.alpha = float(alpha)
        self.log_entropy = log_entropy
        self.diagnostics = diagnostics
        self.artifact_threshold = float(artifact_threshold)
        self.faithfulness = faithfulness
        self.faithfulness_steps = faithfulness_steps
        self.filmstrip_length = filmstrip_length
        self.gif = gif
        # the map whose evolution the filmstrip and GIFs show: the final-layer rollout when logged
        self._film_method = "rollout" if "rollout" in self.methods else self.methods[0]
        self.transform = transform
        self.mean = mean
        self.std = std
        self.on_error = on_error
        self.name = name
        self.writer = writer
        # every tag starts with it: "attention", or "attention_<name>" so that several monitors can share loggers
        self._prefix = tag_prefix(name)

        #: Scalars of the latest probe pass, by tag (what was logged); empty before the first pass.
        self.last_metrics: dict[str, float] = {}
        self._vit: nn.Module | None = None
        self._backend: Backend | None = None
        self._layer_idx: list[int] = []
        self._matrix_idx: list[int] = []
        self._head_idx: list[int] = []
        self._registers: slice | None = None
        self._log_dir: Path | None = None
        self._baseline_maps: dict[str, Tensor] | None = None
        self._previous_maps: dict[str, Tensor] | None = None
        self._history: list[tuple[int, Tensor]] = []  # (step, final-layer map (B, gh, gw)) of every logged pass
        self._probes: Probes | None = None
        self._display: Tensor | None = None
        self._stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None
        self._writer: AttentionWriter | None = None if writers is None else WriterSet(writers)
        self._scalar_history: list[tuple[int, dict[str, float]]] = []  # every pass's scalars: layers x steps pictures
        self._baseline_done = False
        self._last_step: int | None = None
        self._warned: set[str] = set()

    @property
    @override
    def state_key(self) -> str:
        if self.name is None:  # unnamed: the key of earlier versions, so their checkpoints still resume
            return self._generate_state_key(methods=self.methods, every_n_epochs=self.every_n_epochs)
        return self._generate_state_key(name=self.name, methods=self.methods, every_n_epochs=self.every_n_epochs)

    # ------------------------------------------------------------------ setup

    def _resolve_module(self, pl_module: pl.LightningModule) -> nn.Module:
        if isinstance(self.module, nn.Module):
            return getattr(self.module, "_orig_mod", self.module)
        if isinstance(self.module, str):
            try:
                found = pl_module.get_submodule(self.module)
            except AttributeError as err:
                names = [n or "<the LightningModule>" for n, _ in find_vision_transformers(pl_module)]
                raise ValueError(
                    f"`module={self.module!r}` is not a submodule of {type(pl_module).__name__}: {err}. "
                    f"ViT candidates found: {names or 'none'}"
                ) from None
            return getattr(found, "_orig_mod", found)
        candidates = find_vision_transformers(pl_module)
        if len(candidates) == 1:
            return candidates[0][1]
        if not candidates:
            raise ValueError(f"no attention layers of a supported ViT found: {unsupported_message(pl_module)}")
        names = [n or "<the LightningModule>" for n, _ in candidates]
        raise ValueError(
            f"{type(pl_module).__name__} holds several ViTs: {names}. Pass `module=` one of these names "
            f"(e.g. AttentionMonitor(module={names[-1]!r}))"
        )

    def _check_probe_images(self, images: Tensor) -> None:
        assert self._backend is not None
        self._backend.check_images(images)

    def _resolve_layers(self, requested: Sequence[int] | None, num_layers: int, name: str) -> list[int]:
        if requested is None:
            return list(range(num_layers))
        bad = [l for l in requested if not -num_layers <= l < num_layers]
        if bad:
            raise ValueError(f"`{name}` {bad} out of range: the model has {num_layers} attention layers")
        return [l % num_layers for l in requested]

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._vit = self._resolve_module(pl_module)
        self._backend = backend_for(self._vit)  # names what is supported when the module is not
        num_layers = len(self._backend.attention_layers())
        self._layer_idx = self._resolve_layers(self.layers, num_layers, "layers")
        self._matrix_idx = self._resolve_layers(self.matrix_layers, num_layers, "matrix_layers")
        self._head_idx = self._resolve_layers(self.head_layers, num_layers, "head_layers")
        if any(m in GRADIENT_METHODS for m in self.methods) or self.faithfulness:
            check_explainable(self._backend, self.target)
        self._registers = self._backend.layout(self._backend.input_size() or (224, 224)).register_slice
        self._stats = display_stats(self._vit, self.mean, self.std)
        if self._probes is None and not isinstance(self.probes, int):
            if isinstance(self.probes, Tensor):
                images = self.probes.detach().clone()
            else:
                images = load_images(self.probes, self.transform or self._backend.transform())
            self._probes = Probes(images, self.labels, self.masks)
        if self._probes is not None:
            self._check_probe_images(self._probes.images)
        # log_dir must be read on every rank (it broadcasts); only rank zero keeps a writer.
        log_dir = trainer.log_dir or trainer.default_root_dir
        self._log_dir = Path(log_dir)
        twins = [cb for cb in trainer.callbacks if isinstance(cb, AttentionMonitor) and cb is not self and cb.name == self.name]
        if twins:
            raise ValueError(
                f"{len(twins) + 1} AttentionMonitors share `name={self.name!r}`: their tags would overwrite each "
                "other's. Give each a different `name=` (e.g. name='teacher' and name='student')"
            )
        if trainer.is_global_zero and self._writer is None:
            self._writer = writers_for(trainer.loggers, Path(log_dir))  # one per logger, picked by what it can do

    # ------------------------------------------------------------------ when

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.log_baseline and not self._baseline_done:
            self._run(trainer, pl_module)
            self._baseline_done = True

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.state.fn == "fit" and (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        self._run(trainer, pl_module)

    # ------------------------------------------------------------------ what

    def _ensure_probes(self, trainer: pl.Trainer, device: torch.device) -> Probes:
        if self._probes is None:
            assert isinstance(self.probes, int)
            loaders = trainer.val_dataloaders
            if loaders is None and trainer.state.fn == "fit":
                # Lightning sets validation data up lazily; doing it now is what its val loop does first anyway.
                try:
                    trainer.fit_loop.epoch_loop.val_loop.setup_data()
                except MisconfigurationException:  # no `val_dataloader` anywhere: reported below
                    pass
                loaders = trainer.val_dataloaders
            if isinstance(loaders, dict):
                loaders = next(iter(loaders.values()), None)
            if isinstance(loaders, (list, tuple)):
                loaders = loaders[0] if loaders else None
            if loaders is None:
                raise ValueError(
                    f"`probes={self.probes}` takes images from the validation dataloader, but this run has none: "
                    "define `val_dataloader` or pass `probes` as a tensor or image paths"
                )
            self._probes = take_from_loader(loaders, self.probes)
            self._check_probe_images(self._probes.images)
        if self._probes.images.device != device:
            self._probes = self._probes.to(device)
            self._display = None
        if self._display is None:
            mean, std = self._stats or ((0.0,), (1.0,))
            self._display = to_display(self._probes.images.float(), mean, std)
        return self._probes

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            rank_zero_warn(message, category=RuntimeWarning)

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return  # e.g. trainer.validate() right after fit: same weights, same step, already logged
        assert self._vit is not None, "setup() must run before a probe pass"
        # Nothing here may draw from the global RNG (iterating a DataLoader does): training must not change.
        with isolate_rng():
            probes = self._ensure_probes(trainer, pl_module.device)  # misconfiguration raises, always
            try:
                maps, curves = self._compute(trainer, probes)
                metrics = scalar_report(
                    maps,
                    self.methods,
                    entropy=self.log_entropy,
                    baseline=self._baseline_maps if self.diagnostics else None,
                    previous=self._previous_maps if self.diagnostics else None,
                    registers=self._registers if self.diagnostics else None,
                    artifact_threshold=self.artifact_threshold if self.diagnostics else None,
                    masks=probes.masks,
                    faithfulness=curves,
                    prefix=self._prefix,
                )
                self._remember(maps, step)
                if trainer.is_global_zero:
                    self._write(maps, probes, metrics, step)
                self.last_metrics = metrics
            except Exception as err:  # a transient fault must not kill a long run
                if self.on_error == "raise":
                    raise
                self._warn_once(
                    type(err).__name__,
                    f"AttentionMonitor skipped the probe pass at step {step}: {type(err).__name__}: {err}. "
                    "Training goes on; this warning is shown once per kind of error "
                    "(pass on_error='raise' to stop on it instead).",
                )
                return
        self._last_step = step

    def _compute(self, trainer: pl.Trainer, probes: Probes) -> tuple[AttentionMaps, dict[str, PerturbationCurves]]:
        plugin = trainer.precision_plugin
        vit = self._vit
        assert vit is not None
        images = plugin.convert_input(probes.images)
        # class indices from the labels when known; a callable score for models without class logits
        target = self.target if self.target is not None else probes.labels
        with plugin.forward_context():
            maps = attention_maps(
                vit,
                images,
                methods=self.methods,
                head_fusion=self.head_fusion,
                discard_ratio=self.discard_ratio,
                query=self.query,
                keep_matrices=self._matrix_idx,
                target=target,
                head_layers=self._head_idx,
                attention_distance=self.diagnostics,
            )
        for method in self.methods:
            bad = (~torch.isfinite(maps[method])).flatten(2).any(-1).any(0)
            if bad.any():
                layers = bad.nonzero().flatten().tolist()
                raise FloatingPointError(f"{method} maps contain NaN or inf at layers {layers}; not drawn")
        curves: dict[str, PerturbationCurves] = {}
        if self.faithfulness:
            # explain the same class as the gradient methods: the label when known, else the prediction
            if target is None:
                assert maps.logits is not None, "setup checked that the model has class logits"
                target = maps.logits.argmax(-1)
            options = dict(target=target, steps=self.faithfulness_steps)
            with plugin.forward_context():
                for method in self.methods:
                    curves[method] = perturbation_curves(vit, images, maps[method][:, -1], **options)
                curves["random"] = random_perturbation_curves(vit, images, maps.grid_size, **options)
        return maps, curves

    def _remember(self, maps: AttentionMaps, step: int) -> None:
        current = {m: maps[m].detach() for m in self.methods}
        if self._baseline_maps is None:
            self._baseline_maps = current
        self._previous_maps = current
        self._history.append((step, maps[self._film_method][:, -1].detach()))

    def _row_labels(self, probes: Probes, maps: AttentionMaps, method: str = "raw") -> list[str]:
        if method in GRADIENT_METHODS and maps.target is not None:
            # class-targeted maps: the row says which class is explained
            return [f"#{i} t{t}" for i, t in enumerate(maps.target.tolist())]
        predicted = maps.logits.argmax(-1).tolist() if maps.logits is not None else None
        labels = probes.labels.tolist() if probes.labels is not None else None
        rows = []
        for i in range(len(probes)):
            # short enough for the rotated strip beside a small tile: "#3 y2 p0" (probe, label, prediction)
            text = f"#{i}"
            if labels is not None:
                text += f" y{labels[i]}"
            if predicted is not None:
                text += f" p{predicted[i]}"
            rows.append(text)
        return rows

    def _write(self, maps: AttentionMaps, probes: Probes, metrics: dict[str, float], step: int) -> None:
        writer = self._writer
        display = self._display
        assert writer is not None and display is not None
        p = self._prefix
        rows = self._row_labels(probes, maps)
        render = dict(tile_size=self.tile_size, cmap=self.cmap, alpha=self.alpha)
        columns = ["image"] + [f"L{l}" for l in self._layer_idx]
        for method in self.methods:
            tiles = overlay(display, maps[method][:, self._layer_idx], **render)
            labels = self._row_labels(probes, maps, method)
            writer.add_grid(f"{p}/{method}", make_grid(tiles, columns, labels), step, labels)
        if self.aggregates and "raw" in self.methods:
            stacked = torch.stack([maps.aggregate(r, "raw") for r in self.aggregates], dim=1)
            tiles = overlay(display, stacked, **render)
            writer.add_grid(f"{p}/raw_aggregates", make_grid(tiles, ["image", *self.aggregates], rows), step, rows)
        if self._matrix_idx:
            matrices = torch.stack([maps.matrices[l] for l in self._matrix_idx], dim=1)
            tiles = matrix_tiles(matrices, self.tile_size * 2, self.cmap)
            writer.add_grid(f"{p}/matrix", make_grid(tiles, [f"L{l}" for l in self._matrix_idx], rows), step, rows)
        for layer in self._head_idx:
            heads = maps.head_maps[layer]
            tiles = overlay(display, heads, **render)
            header = ["image"] + [f"h{h}" for h in range(heads.shape[1])]
            writer.add_grid(f"{p}/heads/layer_{layer:02d}", make_grid(tiles, header, rows), step, rows)
        # baseline plus the most recent passes of the final-layer map, one row per probe
        frames = self._history[:1] + self._history[1:][-self.filmstrip_length:]
        tiles = overlay(display, torch.stack([m.to(display.device) for _, m in frames], dim=1), **render)
        header = ["image"] + [f"s{s}" for s, _ in frames]
        writer.add_grid(f"{p}/filmstrip", make_grid(tiles, header, rows), step, rows)
        if metrics:
            writer.add_layout(scalar_layout(metrics))  # writers add only charts they have not drawn yet
            writer.add_scalars(metrics, step)
            # the whole run of each per-layer metric in one picture (rows = layers, columns = logged steps)
            self._scalar_history.append((step, dict(metrics)))
            for chart, (layers, steps, values) in layer_series(self._scalar_history).items():
                section, _, rest = chart.partition("/")
                picture = layer_step_image(values, steps, chart, layers=layers)
                writer.add_image(f"{p}_layers_steps/{section[len(p) + 1:]}" + (f"/{rest}" if rest else ""), picture, step)
        writer.flush()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not (self.gif and trainer.is_global_zero and self._history and self._display is not None):
            return
        writer = self._writer
        if writer is None:
            return
        steps = [f"step {s}" for s, _ in self._history]
        maps = torch.stack([m.to(self._display.device) for _, m in self._history], dim=1)  # (B, T, gh, gw)
        try:
            for i in range(maps.shape[0]):
                frames = [
                    filmstrip(self._display[i], maps[i, t : t + 1], steps[t : t + 1], self.tile_size * 2, self.cmap, self.alpha)
                    for t in range(maps.shape[1])
                ]
                writer.add_animation(f"{self._prefix}/{self._film_method}_evolution/probe_{i:02d}", frames, trainer.global_step)
            writer.flush()
        except Exception as err:  # the run is over, but a failing destination must still not crash its end
            if self.on_error == "raise":
                raise
            self._warn_once(type(err).__name__, f"AttentionMonitor could not write the evolution animations: {type(err).__name__}: {err}")

    # ------------------------------------------------------------------ state

    @override
    def state_dict(self) -> dict[str, Any]:
        cpu = lambda maps: None if maps is None else {m: t.cpu() for m, t in maps.items()}  # noqa: E731
        state: dict[str, Any] = {
            "baseline_done": self._baseline_done,
            "last_step": self._last_step,
            # drift is measured from the maps of the first pass and the filmstrip shows every pass: both must
            # survive a resume
            "baseline_maps": cpu(self._baseline_maps),
            "previous_maps": cpu(self._previous_maps),
            "history": [(s, m.cpu()) for s, m in self._history],
            # the layers x steps pictures show the whole run, across resumes too
            "scalar_history": [(s, dict(m)) for s, m in self._scalar_history],
        }
        if isinstance(self.probes, int) and self._probes is not None:
            # probes taken from the loader must stay the same images after a resume
            state["probes"] = self._probes.images.cpu()
            state["labels"] = None if self._probes.labels is None else self._probes.labels.cpu()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._baseline_done = bool(state_dict.get("baseline_done", False))
        self._last_step = state_dict.get("last_step")
        self._baseline_maps = state_dict.get("baseline_maps")
        self._previous_maps = state_dict.get("previous_maps")
        self._history = list(state_dict.get("history", []))
        self._scalar_history = [(s, dict(m)) for s, m in state_dict.get("scalar_history", [])]
        if isinstance(self.probes, int) and state_dict.get("probes") is not None:
            self._probes = Probes(state_dict["probes"], state_dict.get("labels"))
            self._display = None
