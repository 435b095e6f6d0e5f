"""``AttentionMonitor``: the Lightning side of a probe pass — when to run it, on which module, under which precision,
on which rank, what to do when it fails, what to keep in a checkpoint, and which loggers get the results. The
pass itself is :class:`~lightning_attn.runner.ProbeRunner`'s, which needs no Lightning."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor, nn
from typing_extensions import override

from .alerts import Alert, AlertBook, AlertThresholds, check_alerts_mode, rules_for
from .backends import backend_for, find_vision_transformers, unsupported_message
from .html_report import report_iframe
from .layout import TokenLayout
from .maps import AGGREGATIONS
from .options import ProbeOptions
from .probes import BatchToProbes, Probes, load_images, take_from_loader
from .render import DEFAULT_COLOUR_RANGE
from .report import scalar_layout, tag_prefix
from .runner import ProbePass, ProbeRunner
from .sanity import SanityCheck, randomisable_blocks
from .writers import AttentionWriter, WriteError, WriterSet, in_background, writers_for

__all__ = ["AttentionMonitor"]

_ON_ERROR = ("warn", "raise")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


@contextmanager
def _full_parameters(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterator[None]:
    """Every parameter whole for the probe pass, which calls the ViT directly rather than through the strategy's
    wrapper: FSDP2 modules (``fully_shard``, ``ModelParallelStrategy``) are unsharded and resharded afterwards;
    an FSDP1 root (``FSDPStrategy``) summons its full parameters. All ranks take part, as they all run the pass."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        FSDPModule = None  # type: ignore[assignment,misc]  # noqa: N806
    sharded = [m for m in pl_module.modules() if FSDPModule is not None and isinstance(m, FSDPModule)]
    if sharded:
        inner = {id(d) for m in sharded for d in m.modules() if d is not m}
        for root in (m for m in sharded if id(m) not in inner):
            # FSDP2 picks its root at the first forward; before any (a baseline pass without a sanity check) the
            # ViT's own blocks would claim it. No public call does this; it is a no-op once a forward ran.
            state = root._get_fsdp_state()
            if getattr(state, "_is_root", True) is None:
                state._lazy_init()
        for module in sharded:
            module.unshard()
        try:
            yield
        finally:
            for module in sharded:
                module.reshard()
        return
    wrapped = getattr(trainer.strategy, "model", None)
    if type(wrapped).__name__ == "FullyShardedDataParallel":
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(wrapped, writeback=False):  # type: ignore[arg-type]  # not None: the type name
            yield
        return
    yield


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
        class_names: one name per class, shown on the grid rows instead of class indices.
        batch_to_probes: with ``probes=N``, reads a validation batch: ``batch -> images`` or
            ``batch -> (images, labels)``; default: tensors, tuples, dicts and dataclasses with common keys.
        layout: the token layout (:class:`~lightning_attn.TokenLayout`) of a ViT no backend knows, e.g. one built
            on ``nn.MultiheadAttention``; its attention layers are found in the LightningModule (or ``module``).
        alerts: ``True`` (default): after each pass, check the attention-health rules of
            :mod:`lightning_attn.alerts` on the curves so far and, when one starts to hold, warn once per episode
            (rule, step, layers, probes, the curve to open, what to try), write the message to every logger that
            takes text and record it in :attr:`alerts`; ``"stop"``: also stop training (``trainer.should_stop``),
            as ``EarlyStopping`` does; ``False``: off.
        alert_thresholds: the thresholds and patience of the rules to change, e.g. ``{"collapse_entropy": 0.1}``
            (keys and defaults: :class:`~lightning_attn.alerts.AlertThresholds`).
        memory_budget: bytes of float32 attention one layer may hold at once during the probe pass. The whole
            (probes, heads, N, N) softmax when it fits (fastest: one matmul, reused by timm layers for their
            output), else a few heads at a time, down to one. None: 256 MiB, on a GPU at most half of its free
            memory; 0: always one head at a time (least memory).
        scale: how heatmap colours are chosen. ``"relative"`` (default): each patch's share of the map relative to
            uniform attention, on one logarithmic scale for every tile, probe, layer and step (a colour bar under
            each grid reads it; uniform attention is one flat colour, so grids and animations show attention
            forming). ``"per_map"``: each tile stretched to its own min..max, to see the shape of a weak map;
            each tile then shows its peak-to-uniform ratio (``3.2x``).
        colour_range: ``R`` of the relative scale: colours run from 1/R to R times the uniform share.
        predictions: when grid rows name the model's prediction (``p<class>``): ``"auto"`` (default) when it
            means something: the model has class logits and either its classifier has moved since the baseline
            or the probes have labels; never for a classifier the training leaves alone (a self-supervised run's
            unused head); ``"always"``; ``"never"``.
        write_timeout: seconds the monitor waits at most, on an exception (Ctrl-C included) and at teardown, for
            passes still being written on a writer thread (an unreachable MLflow server); then it warns which passes
            were not written and lets the run end.
        report_layers: layers whose head-fused token x token attention of the probes each pass keeps (float16, in
            the checkpoint) for the interactive report (:func:`~lightning_attn.report_html`, ``lightning-attn
            report``), where clicking a patch shows what it attends to (raw, and rollout when every layer up to the
            chosen one is kept); the ``head_layers`` among them keep each head's too. None: every layer when they
            take at most 4 MiB a pass (layers x probes x tokens^2 x 2 bytes), else none; ``()``: none. The maps
            of every method and layer are kept either way (probes x layers x patches x 2 bytes per method).
        sanity_check: once, when a fresh run starts (after the baseline pass), run the model-randomisation sanity
            check (:func:`~lightning_attn.sanity_check`) on the probes: each method's final map against the maps of
            a copy of the model whose blocks are re-initialised from the top down, and one at a time. Logs the
            picture ``attention/sanity`` (per probe, one row per method: the trained map, then each step), the
            Spearman correlations as the text table ``attention/sanity_table`` and as scalars
            ``attention_sanity/<method>/top_XX`` and ``attention_sanity_independent/<method>/block_XX``, and keeps
            the result in :attr:`sanity`. It costs 1 + 2 L probe passes (L blocks), once.

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
        ...                      enable_progress_bar=False, enable_model_summary=False,
        ...                      logger=pl.loggers.TensorBoardLogger(getfixture("tmp_path")))
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
        class_names: Sequence[str] | None = None,
        batch_to_probes: BatchToProbes | None = None,
        layout: TokenLayout | None = None,
        alerts: bool | str = True,
        alert_thresholds: AlertThresholds | dict[str, float] | None = None,
        memory_budget: int | None = None,
        scale: str = "relative",
        colour_range: float = DEFAULT_COLOUR_RANGE,
        predictions: str = "auto",
        write_timeout: float = 10.0,
        report_layers: Sequence[int] | None = None,
        sanity_check: bool = False,
    ) -> None:
        super().__init__()
        # what a pass computes and draws: one options object, the same checks as the runner and the command line
        # ProbeOptions takes any sequences and keeps them as tuples (__post_init__): more than its field types say
        make_options: Callable[..., ProbeOptions] = ProbeOptions
        self.options = make_options(
            methods=methods,
            target=target,
            layers=layers,
            aggregates=aggregates,
            matrix_layers=matrix_layers,
            head_fusion=head_fusion,
            discard_ratio=discard_ratio,
            query=query,
            tile_size=tile_size,
            cmap=cmap,
            alpha=alpha,
            log_entropy=log_entropy,
            head_layers=head_layers,
            diagnostics=diagnostics,
            artifact_threshold=artifact_threshold,
            faithfulness=faithfulness,
            faithfulness_steps=faithfulness_steps,
            filmstrip_length=filmstrip_length,
            mean=mean,
            std=std,
            class_names=class_names,
            memory_budget=memory_budget,
            scale=scale,
            colour_range=colour_range,
            predictions=predictions,
            report_layers=report_layers,
        )
        # where the probes come from and when, where to, and how failures are handled: Lightning's side
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
            raise ValueError(
                "`labels`/`masks` go with tensor or image probes; with `probes=N` labels come from the loader"
            )
        if isinstance(probes, Tensor):
            Probes(probes, labels, masks)  # type: ignore[arg-type]  # validates (and converts) now, not at setup
        if module is not None and not isinstance(module, (str, nn.Module)):
            raise ValueError(f"`module` must be an attribute path (str) or an nn.Module, got {type(module).__name__}")
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"`every_n_epochs` must be an int >= 1, got {every_n_epochs!r}")
        if transform is not None and not callable(transform):
            raise ValueError(
                f"`transform` must be a callable PIL image -> (C, H, W) tensor, got {type(transform).__name__}"
            )
        if batch_to_probes is not None and not callable(batch_to_probes):
            raise ValueError(
                "`batch_to_probes` must be a callable `batch -> images` or `batch -> (images, labels)`, got "
                f"{type(batch_to_probes).__name__}"
            )
        if layout is not None and not isinstance(layout, TokenLayout):
            raise ValueError(
                "`layout` must be a lightning_attn.TokenLayout(num_prefix_tokens=..., grid_size=(gh, gw), "
                f"query='cls' or 'mean'), got {type(layout).__name__}"
            )
        if on_error not in _ON_ERROR:
            raise ValueError(f"`on_error` must be one of {_ON_ERROR}, got {on_error!r}")
        if name is not None and not (isinstance(name, str) and _NAME.fullmatch(name)):
            raise ValueError(
                f"`name` must be None or a word of letters, digits, '_' and '-' (e.g. 'student'), got {name!r}: "
                "it starts every tag, and loggers such as MLflow accept only such characters"
            )
        writers = [writer] if isinstance(writer, AttentionWriter) else writer
        if writers is not None and (
            not isinstance(writers, (list, tuple))
            or not writers
            or not all(isinstance(w, AttentionWriter) for w in writers)
        ):
            raise ValueError(
                "`writer` must be None (one writer per logger of the trainer), an AttentionWriter or a non-empty "
                f"list of them (subclass lightning_attn.writers.AttentionWriter), got {writer!r}"
            )
        if isinstance(write_timeout, bool) or not isinstance(write_timeout, (int, float)) or not write_timeout > 0:
            raise ValueError(f"`write_timeout` must be a number of seconds > 0, got {write_timeout!r}")
        self.write_timeout = float(write_timeout)
        self.alert_mode = check_alerts_mode(alerts)
        self._alert_book = AlertBook(rules_for(AlertThresholds.from_any(alert_thresholds), tag_prefix(name)))
        #: Why the monitor stopped training (``alerts="stop"``); None while it has not.
        self.stop_reason: str | None = None
        self.probes = probes
        self.labels = labels
        self.masks = masks
        self.module = module
        self.every_n_epochs = every_n_epochs
        self.log_baseline = log_baseline
        self.gif = gif
        self.transform = transform
        self.on_error = on_error
        self.name = name
        self.writer = writer
        self.batch_to_probes = batch_to_probes
        self.layout = layout
        if not isinstance(sanity_check, bool):
            raise ValueError(f"`sanity_check` must be True or False, got {sanity_check!r}")
        self.sanity_check = sanity_check
        #: The sanity check's result (``sanity_check=True``), once it ran; None before.
        self.sanity: SanityCheck | None = None

        #: Scalars of the latest probe pass, by tag (what was logged); empty before the first pass.
        self.last_metrics: dict[str, float] = {}
        self._vit: nn.Module | None = None
        self._probes: Probes | None = None
        self._runner: ProbeRunner | None = None
        self._pending_state: dict[str, Any] | None = None  # a checkpoint's runner state, until the runner exists
        self._user_writers = None if writers is None else list(writers)
        self._writer: WriterSet | None = self._own_writer()
        self._baseline_done = False
        self._last_step: int | None = None
        self._warned: set[str] = set()
        self._trainer_id: int | None = None  # the trainer this monitor's run belongs to
        self._logged: tuple[int, int] | None = None  # (trainer, step) of the latest pass written
        self._ckpt_steps: dict[str, int] = {}

    @property
    def methods(self) -> tuple[str, ...]:
        return self.options.methods

    @property
    def alerts(self) -> list[Alert]:
        """Every alert fired so far (rule, step, layers, probes, curve, message), oldest first; kept in the
        checkpoint, so a resumed run neither loses nor repeats them."""
        return self._alert_book.alerts

    @property
    def runner(self) -> ProbeRunner | None:
        """The probe runner (baseline, history, pictures); None until the probes are known."""
        return self._runner

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
            found = getattr(found, "_orig_mod", found)
            inner = [n for n, _ in find_vision_transformers(found)]
            if self.layout is None and inner and "" not in inner:  # a wrapper (lightly's backbones): name the ViT
                paths = [f"{self.module}.{n}" for n in inner]
                raise ValueError(
                    f"`module={self.module!r}` is a {type(found).__name__}, which holds the ViT at {paths}: pass "
                    f"`module={paths[0]!r}`"
                )
            return found
        candidates = find_vision_transformers(pl_module)
        if len(candidates) == 1:
            return candidates[0][1]
        if not candidates and self.layout is not None:
            return pl_module  # a custom ViT: its attention layers anywhere in the LightningModule, read with `layout`
        if not candidates:
            raise ValueError(f"no attention layers of a supported ViT found: {unsupported_message(pl_module)}")
        names = [n or "<the LightningModule>" for n, _ in candidates]
        raise ValueError(
            f"{type(pl_module).__name__} holds several ViTs: {names}. Pass `module=` one of these names "
            f"(e.g. AttentionMonitor(module={names[-1]!r}))"
        )

    def _start_runner(self, probes: Probes) -> None:
        assert self._vit is not None
        self._probes = probes
        self._runner = ProbeRunner(self._vit, probes, self.options, name=self.name, layout=self.layout)
        self._runner.animate = self.gif  # each pass adds its GIF frames: the end of fit only joins them
        state, self._pending_state = self._pending_state, None
        if state is not None:
            self._resume(state)

    def _resume(self, state: dict[str, Any]) -> None:
        """Take a checkpoint's runner state; other probes or map options than the checkpoint's restart the baseline."""
        runner = self._runner
        assert runner is not None
        runner.load_state_dict(state)
        changed = runner.differences(state)
        if changed:
            # maps of other probes or options cannot be compared with the checkpoint's: a new baseline, now
            runner.restart()
            self._alert_book.restart(len(runner.scalar_history))  # the rules read from the new baseline on
            self._baseline_done, self._last_step = False, None
            self._warn_once(
                "resume-changed",
                f"AttentionMonitor resumed with other settings than the checkpoint's ({'; '.join(changed)}): drift "
                "and the filmstrip start again from a new baseline at this step; the scalar curves go on.",
            )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        vit = self._resolve_module(pl_module)
        if self.sanity_check:
            randomisable_blocks(backend_for(vit, self.layout))  # no blocks to randomise: fails now, not at train start
        if self._trainer_id is not None and self._trainer_id != id(trainer):
            self._new_run()  # a monitor reused for another Trainer: its own writers, baseline and history
        self._trainer_id = id(trainer)
        if isinstance(self.probes, int) and trainer.limit_val_batches == 0 and self._probes is None:
            raise ValueError(
                f"`probes={self.probes}` takes validation images, but this Trainer has `limit_val_batches=0`: pass "
                "`probes` as a tensor or image paths, or let validation run"
            )
        if self._runner is not None and self._runner.model is vit:
            return self._setup_writers(trainer)  # fit, then validate: the same run goes on
        self._vit = vit
        probes = self._probes
        if probes is None and not isinstance(self.probes, int):
            if isinstance(self.probes, Tensor):
                images = self.probes.detach().clone()
            else:
                images = load_images(self.probes, self.transform or backend_for(self._vit).transform())
            probes = Probes(images, self.labels, self.masks)  # type: ignore[arg-type]  # label lists: converted
        if probes is not None:
            self._start_runner(probes)  # checks the model, the probes and the options against each other
        else:
            # loader probes come later; check the model and options now
            ProbeRunner.check_model(self._vit, self.options, self.layout)
        self._setup_writers(trainer)

    def _own_writer(self) -> WriterSet | None:
        """The user's `writer=` as one writer, or None: the trainer's loggers then get one each at setup."""
        return None if self._user_writers is None else WriterSet(in_background(self._user_writers))

    def _new_run(self) -> None:
        self._writer = self._own_writer()
        self._runner = None
        self._pending_state = None
        if isinstance(self.probes, int):
            self._probes = None  # the new run's validation data
        self._baseline_done = False
        self._last_step = None
        self.last_metrics = {}
        self._alert_book = AlertBook(self._alert_book.rules)  # a new run: its own alerts
        self.stop_reason = None

    def _setup_writers(self, trainer: pl.Trainer) -> None:
        callbacks = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's callback connector
        twins = [cb for cb in callbacks if isinstance(cb, AttentionMonitor) and cb is not self and cb.name == self.name]
        if twins:
            raise ValueError(
                f"{len(twins) + 1} AttentionMonitors share `name={self.name!r}`: their tags would overwrite each "
                "other's. Give each a different `name=` (e.g. name='teacher' and name='student')"
            )
        # log_dir must be read on every rank (it broadcasts); only rank zero keeps a writer.
        log_dir = trainer.log_dir or trainer.default_root_dir
        if trainer.is_global_zero and self._writer is None:
            # one per logger, picked by what it can do; those that take calls from any thread write off the loop
            self._writer = WriterSet(in_background(writers_for(trainer.loggers, Path(log_dir)).writers))

    # ------------------------------------------------------------------ when

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._runner is None:
            # take the probes now, not after an epoch of training: `probes=N` beyond the validation set fails here
            with isolate_rng():
                self._ensure_runner(trainer)
        if self.log_baseline and not self._baseline_done:
            self._run(trainer, pl_module)
            self._baseline_done = True
        if self.sanity_check and self.sanity is None and trainer.global_step == 0:
            self._sanity(trainer, pl_module)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.state.fn == "fit" and (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        self._run(trainer, pl_module)

    # ------------------------------------------------------------------ what

    def _loader_probes(self, trainer: pl.Trainer) -> Probes:
        assert isinstance(self.probes, int)
        loaders = trainer.val_dataloaders
        if loaders is None and trainer.state.fn == "fit":
            # Lightning sets validation data up lazily; doing it now is what its val loop does first anyway.
            try:
                trainer.fit_loop.epoch_loop.val_loop.setup_data()
            except Exception as err:  # noqa: BLE001
                # no `val_dataloader` anywhere: reported below. By name: `lightning` and the standalone
                # `pytorch_lightning` each raise their own MisconfigurationException class
                if type(err).__name__ != "MisconfigurationException":
                    raise
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
        return take_from_loader(loaders, self.probes, self.batch_to_probes)

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            rank_zero_warn(message, category=RuntimeWarning)

    def _ensure_runner(self, trainer: pl.Trainer) -> bool:
        """Start the runner if the probes are known or can be taken; False after a transient loader error."""
        if self._runner is not None:
            return True
        if self._probes is not None:  # restored from a checkpoint
            self._start_runner(self._probes)
            return True
        try:
            probes = self._loader_probes(trainer)
        except OSError as err:  # a flaky file system or network dataset: try again at the next pass
            if self.on_error == "raise":
                raise
            self._warn_once(
                "loader-" + type(err).__name__,
                f"AttentionMonitor could not take the probes from the validation data ({type(err).__name__}: "
                f"{err}); it tries again at the next pass. Training goes on.",
            )
            return False
        self._start_runner(probes)  # misconfiguration raises, always
        return True

    def _step(self, trainer: pl.Trainer) -> tuple[int, bool]:
        """The step a pass belongs to, and whether it is part of the run's history."""
        if trainer.state.fn == "fit":
            return trainer.global_step, True
        # `trainer.validate(model, ckpt_path=...)` on a fresh Trainer: the weights are the checkpoint's, so is the
        # step; a validate-only pass never enters the baseline, drift history or filmstrip
        path = getattr(trainer, "ckpt_path", None)
        if path and trainer.global_step == 0:
            if path not in self._ckpt_steps:
                from .loading import UntrustedCheckpointError, load_checkpoint_state

                try:  # weights only: reading the step must not run what a checkpoint holds
                    self._ckpt_steps[path] = int(load_checkpoint_state(path).get("global_step", 0))
                except UntrustedCheckpointError as err:
                    self._warn_once(
                        "ckpt-step",
                        f"AttentionMonitor logs this validation at step {trainer.global_step}, not the step of "
                        f"{err.path}: it reads the step with torch.load(weights_only=True), which refuses the "
                        f"{err.what} the file holds",
                    )
                    self._ckpt_steps[path] = trainer.global_step
            return self._ckpt_steps[path], False
        return trainer.global_step, False

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step, record = self._step(trainer)
        if (id(trainer), step) == self._logged:
            # e.g. trainer.validate() right after fit: same weights, same step, already logged here
            if "same-step" not in self._warned:
                self._warned.add("same-step")
                what = getattr(trainer.state.fn, "value", "pass")
                rank_zero_info(
                    f"AttentionMonitor logs nothing for this {what} at step {step}: the pass of this step, with these "
                    "weights, is already logged (at the end of fit)."
                )
            return
        assert self._vit is not None, "setup() must run before a probe pass"
        # Nothing here may draw from the global RNG (iterating a DataLoader does): training must not change.
        with isolate_rng():
            if not self._ensure_runner(trainer):
                self._stop_on(trainer, [])  # "stop": every rank must take part in the decision
                return
            runner = self._runner
            assert runner is not None
            plugin = trainer.precision_plugin
            fired: list[Alert] = []
            try:
                with _full_parameters(trainer, pl_module):
                    result = runner.run(
                        step,
                        render=trainer.is_global_zero,  # every rank runs the pass (DDP forwards), rank zero draws
                        record=record,
                        forward_context=plugin.forward_context,
                        convert_input=plugin.convert_input,
                    )
                fired = self._check_alerts(trainer, result)
                self.last_metrics = result.scalars
            except Exception as err:  # a transient fault must not kill a long run
                if self.on_error == "raise":
                    raise
                self._warn_once(
                    type(err).__name__,
                    f"AttentionMonitor skipped the probe pass at step {step}: {type(err).__name__}: {err}. "
                    "Training goes on; this warning is shown once per kind of error "
                    "(pass on_error='raise' to stop on it instead).",
                )
                self._stop_on(trainer, [])  # "stop": every rank must take part in the decision
                return
            if trainer.is_global_zero:
                self._write(result, fired)
        self._stop_on(trainer, fired)
        self._last_step = step
        self._logged = (id(trainer), step)

    def _sanity(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The sanity check on the probes, once; rank zero computes and writes it (a copy of the model, no
        collective), under the error policy of a pass."""
        runner = self._runner
        if runner is None:
            return
        with isolate_rng(), _full_parameters(trainer, pl_module):
            if not trainer.is_global_zero:
                return
            try:
                check = runner.sanity()
                self.sanity = check
                assert self._writer is not None
                options = self.options
                image, rows = check.picture(
                    runner.display(),
                    options.tile_size,
                    options.cmap,
                    options.alpha,
                    scale=options.scale,
                    colour_range=options.colour_range,
                )
                scalars = check.scalars(runner.prefix)
                self._writer.add_grid(f"{runner.prefix}/sanity", image, trainer.global_step, rows)
                self._writer.add_layout(scalar_layout(scalars))
                self._writer.add_scalars(scalars, trainer.global_step)
                self._writer.add_text(f"{runner.prefix}/sanity_table", check.table(), trainer.global_step)
                self._writer.flush()
            except Exception as err:
                if self.on_error == "raise":
                    raise
                self._warn_once(
                    "sanity " + type(err).__name__,
                    f"AttentionMonitor could not run the sanity check: {type(err).__name__}: {err}. Training goes on.",
                )

    def _stop_on(self, trainer: pl.Trainer, fired: Sequence[Alert]) -> None:
        """With ``alerts="stop"``, stop training when an alert fired, on every rank (as ``EarlyStopping`` does)."""
        if self.alert_mode != "stop":
            return
        # a collective, reached by every rank after each pass (a failed pass too): all ranks must agree
        if trainer.strategy.reduce_boolean_decision(bool(fired), all=False):
            trainer.should_stop = True
            self.stop_reason = fired[0].message if fired else "an alert fired on another rank"

    def _check_alerts(self, trainer: pl.Trainer, result: ProbePass) -> list[Alert]:
        """New alerts of this pass (every rank computes them from its own scalars); rank zero warns. The markers
        (1 for a rule that fired now, else 0) join the pass's scalars."""
        history = self._runner.scalar_history if self._runner is not None else []
        if self.alert_mode is False or not history or history[-1][0] != result.step:
            return []  # off, or this pass logged no scalar to read
        try:
            fired = self._alert_book.update(history, result.maps)
        except Exception as err:  # a faulty rule must cost neither the run nor this pass's pictures
            if self.on_error == "raise":
                raise
            self._warn_once(
                f"alerts {type(err).__name__}",
                f"AttentionMonitor could not check the alerts at step "
                f"{result.step}: {type(err).__name__}: {err}. Training goes on; shown once per kind of error.",
            )
            return []
        result.scalars.update(self._alert_book.markers(fired, self._runner.prefix))  # type: ignore[union-attr]  # a history
        for alert in fired:
            rank_zero_warn(alert.message, category=RuntimeWarning)
        return fired

    def _write(self, result: ProbePass, alerts: Sequence[Alert] = ()) -> None:
        """Hand the pass to the writers; a failure (this pass's, or an earlier one's on a writer thread) follows
        ``on_error`` and names the pass it belongs to: the pass itself ran and is in the history."""
        assert self._writer is not None
        try:
            result.write(self._writer, [(f"{tag_prefix(self.name)}/alerts/{a.rule}", a.message) for a in alerts])
        except Exception as err:
            if self.on_error == "raise":
                raise
            cause = err.__cause__ if isinstance(err, WriteError) and err.__cause__ is not None else err
            step = err.step if isinstance(err, WriteError) and err.step is not None else result.step
            self._warn_once(
                f"write {type(cause).__name__}",
                f"AttentionMonitor could not write the pass at step {step}: {err}. Training goes on; this warning is "
                "shown once per kind of error (pass on_error='raise' to stop on it instead).",
            )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        runner, writer = self._runner, self._writer
        if writer is None or not trainer.is_global_zero:
            return
        try:
            if self.gif and runner is not None and runner.history:
                for tag, frames in runner.animations().items():
                    writer.add_animation(tag, frames, trainer.global_step)
                writer.flush()
            if runner is not None and runner.report_history:
                # the interactive page of the whole run: a W&B HTML panel, an MLflow artifact, a file beside the logs
                writer.add_html(f"{runner.prefix}/report", self.report_html(), trainer.global_step)
                writer.flush()
            writer.drain()
        except Exception as err:  # the run is over, but a failing destination must still not crash its end
            if self.on_error == "raise":
                raise
            self._warn_once(
                f"fit end {type(err).__name__}", f"AttentionMonitor could not write everything at the end of fit: {err}"
            )

    def report_html(self, title: str | None = None) -> str:
        """The run's interactive report (:func:`~lightning_attn.report_html`) with the alerts that fired.

        Raises:
            ValueError: no probe pass has run yet.
        """
        if self._runner is None:
            raise ValueError("AttentionMonitor has run no probe pass yet: fit (or validate) first")
        return self._runner.report_html(title, self.alerts)

    def _repr_html_(self) -> str:
        """A notebook shows the report inline (in a frame of its own)."""
        if self._runner is None or not self._runner.report_history:
            return "<p>AttentionMonitor: no probe pass recorded yet.</p>"
        return report_iframe(self.report_html())

    def _drain(self, when: str) -> None:
        """Wait for the passes still being written on the writer thread (their errors follow ``on_error``). On an
        exception and at teardown the wait is bounded (``write_timeout``) and the thread stops: Lightning skips
        ``teardown`` when a run fails, so ``on_exception`` is the failed run's only way out."""
        writer = self._writer
        if writer is None:
            return
        try:
            writer.drain() if when == "checkpoint" else writer.close(timeout=self.write_timeout)
        except Exception as err:
            if self.on_error == "raise" and when != "exception":
                raise
            self._warn_once(
                f"{when} {type(err).__name__}", f"AttentionMonitor could not write everything ({when}): {err}"
            )

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # a checkpoint never claims a pass whose pictures are not stored yet
        self._drain("checkpoint")

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._drain("exception")  # the passes before the failure are kept

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._drain("teardown")  # stops the writer thread; the next run starts its own

    # ------------------------------------------------------------------ state

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "baseline_done": self._baseline_done,
            "last_step": self._last_step,
            # drift is measured from the first pass's maps, the filmstrip and layers x steps pictures show every
            # pass, and `lightning-attn replay` redraws them from here: all in the runner's state
            "runner": self._runner.state_dict() if self._runner is not None else self._pending_state,
            "alerts": self._alert_book.state_dict(),  # said once: a resumed run does not repeat them
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
        self._alert_book.load_state_dict(state_dict.get("alerts") or {})
        runner_state = state_dict.get("runner")
        if runner_state is None and "history" in state_dict:  # format 1: the runner's fields at the top level
            runner_state = {
                k: state_dict.get(k) for k in ("baseline_maps", "previous_maps", "history", "scalar_history")
            }
        stored = state_dict.get("probes")
        if isinstance(self.probes, int) and stored is not None:
            # the same N: the checkpoint's images; `probes=N` changed: N images afresh, and the runner, seeing other
            # probes, restarts the baseline
            self._probes = Probes(stored, state_dict.get("labels")) if len(stored) == self.probes else None
            self._runner = None
        if self._runner is not None and runner_state is not None:
            self._resume(runner_state)
        else:
            self._pending_state = runner_state
