"""BotaCLIP contrastive training: an adapter on cached DOFA features, or DOFA itself on pixels.

Three modes (``finetune.mode``):

- ``adapter``: DOFA stays frozen; an identity-initialised :class:`Adapter` and the relevé
  encoder train on cached DOFA features (:func:`train_adapter`). The region is embedded once
  with the frozen DOFA and the adapter is applied to the embeddings.
- ``partial``: the last ``trainable_blocks`` DOFA blocks (plus ``fc_norm``), or LoRA on
  ``attn.qkv`` of every block when ``lora_rank`` is set, train on pixels
  (:func:`train_backbone`).
- ``full``: all of DOFA trains on pixels (:func:`train_backbone`).

In the pixel modes there is no adapter: the image embedding is the fine-tuned DOFA's
``forward_features``, and the region is embedded with the saved ``backbone.pt``.

Both paths share one epoch loop (:func:`fit_epochs`): a generator seeded by (seed, epoch)
drives shuffling and augmentation, early stopping watches the loss on spatially held-out plots,
and a checkpoint with the model, optimiser and history is written atomically after every epoch,
so a run killed at any point resumes to the same weights as an uninterrupted run (on CPU).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from torch import Tensor, nn

from botaclip_core.catalog import FinetuneSettings, format_validation_error
from botaclip_core.chips import Augmentation
from botaclip_core.errors import CatalogError, InputDataError, StageError
from botaclip_core.losses import build_loss
from botaclip_core.models.dofa import DOFA, IMG_SIZE, build_dofa, save_dofa
from botaclip_core.models.heads import (
    Adapter,
    ReleveEncoder,
    apply_lora,
    merge_lora,
    set_trainable_blocks,
)
from botaclip_core.regularizers import build_regularizer

logger = logging.getLogger(__name__)

CHECKPOINT = "last.pt"
BEST = "model.pt"
BACKBONE = "backbone.pt"
HISTORY = "history.json"
CURVE = "training_curve.png"
MIN_PLOTS = 8
LORA_TARGET = "attn.qkv"
BRIGHTNESS_RANGE = (0.9, 1.1)

# settings that may change between a crash and the resume without invalidating the checkpoint
_RESUMABLE_CHANGES = frozenset({"epochs", "patience", "device", "botasp"})


@dataclass
class TrainingData:
    """Cached frozen features and the matching relevés.

    Attributes:
        features: ``(n_plots, n_views, D)`` frozen DOFA features, view 0 un-augmented.
        releves: ``(n_plots, n_species)`` cover or presence.
        coords: ``(n_plots, 2)`` map coordinates, for the spatial validation split.
        species: vocabulary.

    """

    features: np.ndarray
    releves: np.ndarray
    coords: np.ndarray
    species: list[str]


def spatial_split(coords: np.ndarray, val_fraction: float, *, seed: int) -> np.ndarray:
    """Boolean validation mask holding out whole spatial blocks (about 25 blocks in all)."""
    n = len(coords)
    span = np.ptp(coords, axis=0).max() or 1.0
    block = span / 5.0
    keys = np.floor((coords - coords.min(axis=0)) / block).astype(np.int64)
    block_id = keys[:, 0] * 1000 + keys[:, 1]
    blocks = np.unique(block_id)
    rng = np.random.default_rng(seed)
    rng.shuffle(blocks)
    val = np.zeros(n, dtype=bool)
    for b in blocks:
        if val.sum() >= val_fraction * n:
            break
        val |= block_id == b
    if val.all() or not val.any():
        raise StageError(
            f"cannot hold out {val_fraction:.0%} of {n} plots spatially; add relevés or change "
            "finetune.val_fraction"
        )
    return val


def releve_input(releves: np.ndarray, kind: str) -> np.ndarray:
    """Relevé encoder input: presence/absence, or cover as a fraction (0–1)."""
    if kind == "presence":
        return (releves > 0).astype(np.float32)
    top = float(releves.max()) or 1.0
    return (releves / (100.0 if top > 1.0 else 1.0)).astype(np.float32)


class BotaClip(nn.Module):
    """Adapter over frozen DOFA features + relevé encoder + contrastive loss."""

    def __init__(self, dim: int, n_species: int, settings: FinetuneSettings) -> None:
        super().__init__()
        self.adapter = Adapter(dim)
        self.releve_encoder = ReleveEncoder(n_species, dim, kind=settings.releve_encoder)
        self.loss = build_loss(settings.loss)

    def encode_image(self, features: torch.Tensor, *, normalize: bool = False) -> torch.Tensor:
        """Adapted embedding of frozen DOFA features."""
        z = self.adapter(features)
        return nn.functional.normalize(z, dim=-1) if normalize else z

    def encode_releve(self, releves: torch.Tensor, *, normalize: bool = False) -> torch.Tensor:
        """Embedding of relevé vectors."""
        z = self.releve_encoder(releves)
        return nn.functional.normalize(z, dim=-1) if normalize else z


class BotaClipBackbone(nn.Module):
    """A trainable DOFA on pixels + relevé encoder + contrastive loss (modes partial and full).

    The image embedding is DOFA's ``forward_features`` itself: no adapter.
    """

    wavelengths_um: Tensor

    def __init__(
        self,
        dofa: DOFA,
        n_species: int,
        settings: FinetuneSettings,
        wavelengths_um: Sequence[float],
    ) -> None:
        """Wrap a DOFA whose ``requires_grad`` flags are already set.

        Args:
            dofa: The backbone (possibly with LoRA layers).
            n_species: Length of the relevé vectors.
            settings: Relevé encoder kind and loss.
            wavelengths_um: Centre wavelength of each band, in µm.

        """
        super().__init__()
        self.dofa = dofa
        self.releve_encoder = ReleveEncoder(n_species, dofa.embed_dim, kind=settings.releve_encoder)
        self.loss = build_loss(settings.loss)
        waves = torch.as_tensor(list(wavelengths_um), dtype=torch.float32)
        self.register_buffer("wavelengths_um", waves, persistent=False)

    def encode_image(self, pixels: Tensor, *, normalize: bool = False) -> Tensor:
        """DOFA embedding of normalised images ``(B, C, H, W)``."""
        z = self.dofa.forward_features(pixels, self.wavelengths_um)
        return nn.functional.normalize(z, dim=-1) if normalize else z

    def encode_releve(self, releves: Tensor, *, normalize: bool = False) -> Tensor:
        """Embedding of relevé vectors."""
        z = self.releve_encoder(releves)
        return nn.functional.normalize(z, dim=-1) if normalize else z


# ---------------------------------------------------------------------------------------------
# machinery shared by every training path (BotaCLIP adapter, BotaCLIP backbone, BotaSP)


def check_settings(settings: FinetuneSettings) -> FinetuneSettings:
    """Validate settings again: ``model_copy(update=...)`` bypasses pydantic's validators.

    Raises:
        CatalogError: If a value or a combination of values is invalid.

    """
    try:
        return FinetuneSettings.model_validate(settings.model_dump())
    except ValidationError as exc:
        raise CatalogError(format_validation_error(exc, source="finetune settings")) from None


def resolve_device(requested: str | None) -> torch.device:
    """Pick the training device for ``finetune.device`` (``auto``: CUDA when available).

    Raises:
        CatalogError: If CUDA is requested but not available.

    """
    name = requested or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CatalogError(
            f"finetune.device is {name!r} but this machine has no usable CUDA device "
            "(torch.cuda.is_available() is False); set finetune.device to 'auto' or 'cpu'"
        )
    return device


def split_plots(coords: np.ndarray, settings: FinetuneSettings) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation plot indices from :func:`spatial_split`.

    Raises:
        StageError: If there are fewer than 8 plots or no spatial hold-out is possible.

    """
    n = len(coords)
    if n < MIN_PLOTS:
        raise StageError(
            f"only {n} relevés with image chips; BotaCLIP needs at least {MIN_PLOTS} to train"
        )
    val_mask = spatial_split(
        np.asarray(coords, dtype=np.float64), settings.val_fraction, seed=settings.seed
    )
    return np.flatnonzero(~val_mask), np.flatnonzero(val_mask)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator inside the block and restore the caller's state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def cpu_state(module: nn.Module) -> dict[str, Tensor]:
    """Copy a module's state dict to CPU, detached (portable checkpoints)."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def optimizer_step(optimizer: torch.optim.Optimizer, loss: Tensor) -> None:
    """One gradient step on ``loss``."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _settings_changes(saved: dict[str, Any], settings: FinetuneSettings) -> list[str]:
    now = settings.model_dump(mode="json")
    return sorted(
        k
        for k in set(saved) | set(now)
        if k not in _RESUMABLE_CHANGES and saved.get(k) != now.get(k)
    )


def fit_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    settings: FinetuneSettings,
    out_dir: Path,
    train_epoch: Callable[[np.random.Generator], float],
    validate: Callable[[], dict[str, float]],
    save_best: Callable[[], None],
    stem: str = "",
    label: str = "finetune",
) -> tuple[list[dict[str, float]], dict[str, float]]:
    """Run epochs with early stopping and a resumable per-epoch checkpoint.

    The checkpoint ``out_dir/{stem}last.pt`` holds ``model``'s and ``optimizer``'s state, the
    history, the best epoch and the early-stopping counter; if it exists the run continues after
    its epoch. Build ``model`` and ``optimizer`` the same way on every run (same seed), so that
    resuming reproduces an uninterrupted run. The history is written to ``{stem}history.json``
    and plotted to ``{stem}training_curve.png``.

    Args:
        model: Every trainable module of the run (its state is checkpointed).
        optimizer: The optimiser over ``model``'s trainable parameters.
        settings: ``seed``, ``epochs`` and ``patience`` are used.
        out_dir: Output folder.
        train_epoch: Trains one epoch with the given generator (seeded by seed and epoch) and
            returns the mean training loss; called with ``model`` in training mode.
        validate: Returns validation metrics including ``val_loss`` (lower is better); called in
            eval mode under ``torch.no_grad``.
        save_best: Writes the best model; called when ``val_loss`` improves.
        stem: Prefix of the checkpoint, history and curve file names.
        label: Name used in log messages.

    Returns:
        The history (one dict per epoch) and the best epoch's metrics (``epoch`` -1 if none).

    Raises:
        StageError: If the checkpoint was written with different settings, or no epoch had a
            finite validation loss.

    """
    history: list[dict[str, float]] = []
    best: dict[str, float] = {"val_loss": math.inf, "epoch": -1}
    stale = 0
    start_epoch = 0
    ckpt_path = out_dir / f"{stem}{CHECKPOINT}"
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        changed = _settings_changes(state["settings"], settings) if "settings" in state else []
        if changed:
            raise StageError(
                f"{ckpt_path} was written with other finetune settings ({', '.join(changed)} "
                "differ); delete it to start over, or train into a new folder"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history, best, stale = state["history"], state["best"], state["stale"]
        start_epoch = state["epoch"] + 1
        logger.info("%s: resuming after epoch %d from %s", label, state["epoch"], ckpt_path)

    for epoch in range(start_epoch, settings.epochs):
        if stale >= settings.patience:
            break
        gen = np.random.default_rng([settings.seed, epoch])
        model.train()
        train_loss = train_epoch(gen)
        model.eval()
        with torch.no_grad():
            metrics = validate()
        history.append({"epoch": epoch, "train_loss": train_loss, **metrics})
        logger.info(
            "%s epoch %d: %s",
            label,
            epoch,
            " ".join(f"{k} {v:.4f}" for k, v in history[-1].items() if k != "epoch"),
        )
        if metrics["val_loss"] < best["val_loss"] - 1e-6:
            best, stale = {"epoch": epoch, **metrics}, 0
            save_best()
        else:
            stale += 1
        save_atomic(
            {
                "model": cpu_state(model),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch,
                "history": history,
                "best": best,
                "stale": stale,
                "settings": settings.model_dump(mode="json"),
            },
            ckpt_path,
        )
    (out_dir / f"{stem}{HISTORY}").write_text(json.dumps(history, indent=1))
    plot_history(history, out_dir / f"{stem}{CURVE}")
    if best["epoch"] < 0:
        raise StageError(
            f"{label}: the validation loss was never finite ({[h['val_loss'] for h in history]}); "
            f"no model was saved. Lower finetune.lr (now {settings.lr}) or check the inputs for "
            f"NaN, then delete {ckpt_path} and rerun"
        )
    return history, best


def _mean_loss(losses: list[Tensor]) -> float:
    return float(torch.stack(losses).mean()) if losses else math.nan


def _retrieval_recall(img: torch.Tensor, rel: torch.Tensor, k: int = 5) -> float:
    """Share of images whose own relevé is among the k most similar relevés."""
    sims = nn.functional.normalize(img, dim=-1) @ nn.functional.normalize(rel, dim=-1).T
    topk = sims.topk(min(k, sims.shape[1]), dim=1).indices
    arange = torch.arange(len(img), device=topk.device).unsqueeze(1)
    return float((topk == arange).any(dim=1).float().mean())


def _n_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------
# mode "adapter": cached frozen features


def feature_batches(
    gen: np.random.Generator, feats: torch.Tensor, train_idx: np.ndarray, batch: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled batches of (plot indices, one random cached view per plot); ragged tail dropped.

    Draws the order and the views from ``gen`` (seeded per epoch), so a resumed epoch sees the
    same batches as an uninterrupted one.
    """
    n, n_views = feats.shape[:2]
    order = gen.permutation(train_idx)
    views = np.asarray(gen.integers(0, n_views, size=n))
    for s in range(0, len(order) - batch + 1, batch):
        rows = order[s : s + batch]
        idx = torch.from_numpy(rows).to(feats.device)
        yield idx, feats[idx, torch.from_numpy(views[rows]).to(feats.device)]


def train_adapter(data: TrainingData, settings: FinetuneSettings, out_dir: Path) -> dict[str, Any]:
    """Train BotaCLIP's adapter + relevé encoder; resumes from ``out_dir/last.pt``.

    Each epoch draws its shuffling and views from a generator seeded by (seed, epoch), and the
    checkpoint written after every epoch holds all trainable state, so a run killed at any
    point and resumed ends with the same weights as an uninterrupted run.

    Args:
        data: Cached frozen features and relevés.
        settings: ``mode`` must be ``"adapter"``.
        out_dir: Output folder (``model.pt``, ``last.pt``, ``history.json``,
            ``training_curve.png``).

    Returns:
        Summary with best epoch, metrics, the path of the best model and model-card fields.

    Raises:
        CatalogError: If the settings are invalid or not for mode ``adapter``.
        StageError: If there are too few plots for a spatial hold-out.

    """
    settings = check_settings(settings)
    if settings.mode != "adapter":
        raise CatalogError(
            f"train_adapter trains finetune.mode 'adapter', got {settings.mode!r}; modes "
            "'partial' and 'full' train DOFA on pixel chips with train_backbone"
        )
    n, n_views, dim = data.features.shape
    train_idx, val_idx = split_plots(data.coords, settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(settings.device)
    feats = torch.from_numpy(np.ascontiguousarray(data.features, dtype=np.float32)).to(device)
    rels = torch.from_numpy(releve_input(data.releves, settings.releve_input)).to(device)

    with seeded(settings.seed):
        model = BotaClip(dim, rels.shape[1], settings).to(device)
    regularizer = build_regularizer(settings.regularizer, module=model.adapter)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    batch = min(settings.batch_size, len(train_idx))
    val_t = torch.from_numpy(val_idx).to(device)

    def train_epoch(gen: np.random.Generator) -> float:
        losses = []
        for idx, frozen in feature_batches(gen, feats, train_idx, batch):
            img = model.encode_image(frozen)
            rel = model.encode_releve(rels[idx])
            total = model.loss(img, rel) + settings.reg_weight * regularizer(img, frozen)
            optimizer_step(optimizer, total)
            losses.append(total.detach())
        return _mean_loss(losses)

    def validate() -> dict[str, float]:
        vimg = model.encode_image(feats[val_t, 0])
        vrel = model.encode_releve(rels[val_t])
        return {
            "val_loss": float(model.loss(vimg, vrel)),
            "val_recall_at_5": _retrieval_recall(vimg, vrel),
        }

    def save_best() -> None:
        save_atomic(
            {"model": cpu_state(model), "dim": dim, "species": data.species}, out_dir / BEST
        )

    history, best = fit_epochs(
        model,
        optimizer,
        settings=settings,
        out_dir=out_dir,
        train_epoch=train_epoch,
        validate=validate,
        save_best=save_best,
    )
    card = {
        "model": "BotaCLIP: identity-initialised adapter over frozen DOFA features",
        "mode": "adapter",
        "embedding": "frozen DOFA features through the adapter of model.pt",
        "trainable": "adapter, relevé encoder, loss temperature",
        "trainable_parameters": _n_trainable(model),
        "device": str(device),
        "precision": "fp32",
        "loss": settings.loss,
        "regularizer": settings.regularizer,
        "reg_weight": settings.reg_weight,
        "augmentation": f"{n_views} cached views per plot (view 0 plain)",
    }
    return _summary(history, best, train_idx, val_idx, out_dir, card)


def _summary(
    history: list[dict[str, float]],
    best: dict[str, float],
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    out_dir: Path,
    card: dict[str, Any],
) -> dict[str, Any]:
    return {
        "best_epoch": best["epoch"],
        "best_val_loss": best["val_loss"],
        "val_recall_at_5": best.get("val_recall_at_5"),
        "n_train": int(len(train_idx)),
        "n_val": int(len(val_idx)),
        "epochs_run": len(history),
        "history": history,
        "model": str(out_dir / BEST),
        "training_curve": str(out_dir / CURVE),
        "card": card,
    }


# ---------------------------------------------------------------------------------------------
# modes "partial" and "full": DOFA trained on pixels


def draw_epoch_augmentations(
    gen: np.random.Generator, n: int, max_shift: int
) -> list[Augmentation]:
    """One random augmentation per plot: crop offset (chip-centre shift), flip, rot90, brightness.

    Drawn for every plot (not only the batch's), so a plot's augmentation depends only on the
    generator, never on the batch composition.
    """
    shifts = gen.integers(-max_shift, max_shift + 1, size=(n, 2))
    flips = gen.integers(0, 2, size=n)
    rots = gen.integers(0, 4, size=n)
    brightness = gen.uniform(*BRIGHTNESS_RANGE, size=n)
    return [
        Augmentation(
            flip=bool(flips[i]),
            rot90=int(rots[i]),
            shift_rows=int(shifts[i, 0]),
            shift_cols=int(shifts[i, 1]),
            brightness=float(brightness[i]),
        )
        for i in range(n)
    ]


def crop_chip(chip: np.ndarray, aug: Augmentation, *, margin: int, size: int) -> np.ndarray:
    """Cut the ``size`` px window of a ``(C, size + 2 margin, ...)`` chip, then flip and rotate.

    The order (window, flip, rotation) is :class:`botaclip_core.chips.ChipReader`'s; brightness
    is applied later, on the device.
    """
    r0, c0 = margin + aug.shift_rows, margin + aug.shift_cols
    out = chip[:, r0 : r0 + size, c0 : c0 + size]
    if aug.flip:
        out = out[:, :, ::-1]
    if aug.rot90:
        out = np.rot90(out, aug.rot90, axes=(1, 2))
    return out


class PixelBatches:
    """Turns plot indices + augmentations into normalised DOFA inputs on the device.

    Calling it with rows and per-plot augmentations (or None for the plain centre window)
    returns ``(len(rows), bands, S, S)`` float32 images standardised with ``mean``/``std``.

    Args:
        chips: ``(n_plots, bands, S + 2 * margin, S + 2 * margin)`` DN, 0 = nodata.
        margin: Pixels around the model window (the largest chip-centre shift).
        mean: Per-band normalisation mean, in DN.
        std: Per-band normalisation std, in DN.
        device: Where the images go.

    """

    def __init__(
        self,
        chips: np.ndarray,
        *,
        margin: int,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
    ) -> None:
        self.chips = chips
        self.margin = margin
        self.size = chips.shape[-1] - 2 * margin
        self.device = device
        bands = chips.shape[1]
        self.mean = torch.as_tensor(np.asarray(mean, np.float32), device=device).view(
            1, bands, 1, 1
        )
        self.std = torch.as_tensor(np.asarray(std, np.float32), device=device).view(1, bands, 1, 1)
        dtype = chips.dtype
        self.top = float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else math.inf

    def __call__(self, rows: np.ndarray, augs: Sequence[Augmentation] | None) -> Tensor:
        """Images of plots ``rows``; ``augs`` is indexed by plot (None: plain centre window)."""
        if augs is None:
            m, s = self.margin, self.size
            crops = np.ascontiguousarray(self.chips[rows][:, :, m : m + s, m : m + s])
        else:
            crops = np.stack(
                [
                    crop_chip(self.chips[i], augs[i], margin=self.margin, size=self.size)
                    for i in rows
                ]
            )
        if crops.dtype == np.uint16 or crops.dtype == np.uint32:  # torch lacks most uint16 ops
            crops = crops.astype(np.int64 if crops.dtype == np.uint32 else np.int32)
        x = torch.from_numpy(crops).to(self.device, non_blocking=True).float()
        if augs is not None:
            factor = torch.tensor([augs[i].brightness for i in rows], dtype=torch.float32)
            factor = factor.to(self.device).view(-1, 1, 1, 1)
            # nodata (0) stays nodata, and valid pixels stay valid and in the data type's range
            x = torch.where(x > 0, (x * factor).clamp(1.0, self.top), x)
        return (x - self.mean) / self.std


def precision_context(
    device: torch.device,
) -> tuple[Callable[[], contextlib.AbstractContextManager[Any]], str]:
    """Return the autocast context factory for DOFA forwards and its name for the model card.

    bf16 autocast on CUDA; plain fp32 elsewhere (CPU autocast is slower than fp32 on most CPUs).
    """
    if device.type == "cuda":
        return (lambda: torch.autocast("cuda", dtype=torch.bfloat16)), "bf16 autocast"
    return contextlib.nullcontext, "fp32"


def _make_trainable(dofa: DOFA, settings: FinetuneSettings, size: str) -> str:
    """Set which DOFA parameters train for the mode; return a description for the model card."""
    if settings.mode == "full":
        # pos_embed is the fixed sine-cosine table and stays frozen, as in DOFA's pre-training
        return "all DOFA parameters (position embedding fixed)"
    if settings.lora_rank is not None:
        apply_lora(dofa, settings.lora_rank, settings.lora_alpha, target=LORA_TARGET)
        rank, alpha = settings.lora_rank, settings.lora_alpha
        return f"LoRA rank {rank}, alpha {alpha:g} on {LORA_TARGET} of every block"
    depth = len(dofa.blocks)
    if settings.trainable_blocks > depth:
        raise CatalogError(
            f"finetune.trainable_blocks={settings.trainable_blocks} but DOFA {size!r} has "
            f"{depth} blocks; use 0–{depth}, or mode: full to train all of DOFA"
        )
    set_trainable_blocks(dofa, settings.trainable_blocks)
    return f"last {settings.trainable_blocks} of {depth} DOFA blocks + fc_norm"


def _check_pixel_inputs(
    chips: np.ndarray,
    releves: np.ndarray,
    coords: np.ndarray,
    species: list[str],
    wavelengths_um: Sequence[float],
    mean: Sequence[float],
    std: Sequence[float],
    margin: int,
) -> None:
    if chips.ndim != 4 or chips.shape[-1] != chips.shape[-2]:
        raise InputDataError(
            f"pixel chips have shape {tuple(chips.shape)}; expected square chips "
            "(n_plots, bands, S + 2 * max_shift, S + 2 * max_shift)"
        )
    n, bands, side = chips.shape[0], chips.shape[1], chips.shape[-1]
    if len(releves) != n or len(coords) != n or releves.shape[1] != len(species):
        raise InputDataError(
            f"{n} chips but {len(releves)} relevés and {len(coords)} coordinates "
            f"(relevés have {releves.shape[1]} species columns, vocabulary {len(species)}); "
            "pass one chip, relevé and coordinate pair per plot"
        )
    for name, values in (("wavelengths_um", wavelengths_um), ("mean", mean), ("std", std)):
        if len(values) != bands:
            raise InputDataError(f"{name} has {len(values)} values for {bands}-band chips")
    size = side - 2 * margin
    if size < 16:
        raise InputDataError(
            f"chips of {side} px with finetune.max_shift={margin} leave a {size} px window; cut "
            f"chips of {IMG_SIZE} + 2 * max_shift = {IMG_SIZE + 2 * margin} px"
        )
    if size != IMG_SIZE:
        logger.warning(
            "finetune: %d px model input (chips of %d px minus 2 x max_shift %d); DOFA was "
            "trained at %d px, so its position embedding is resampled",
            size,
            side,
            margin,
            IMG_SIZE,
        )


def train_backbone(
    chips: np.ndarray,
    releves: np.ndarray,
    coords: np.ndarray,
    species: list[str],
    *,
    size: str,
    weights: str | Path | None,
    wavelengths_um: Sequence[float],
    mean: Sequence[float],
    std: Sequence[float],
    settings: FinetuneSettings,
    out_dir: Path,
    device: str | None = None,
) -> dict[str, Any]:
    """Fine-tune DOFA itself (modes ``partial`` and ``full``) contrastively on pixel chips.

    Every epoch, a generator seeded by (seed, epoch) shuffles the training plots and draws one
    augmentation per plot: a random window inside the margin (a chip-centre shift of at most
    ``max_shift`` px), a horizontal flip, a 90° rotation and a brightness factor in [0.9, 1.1]
    (nodata pixels stay 0). Validation uses the un-augmented centre window of the spatially
    held-out plots. On CUDA the DOFA forward runs under bf16 autocast; on CPU in fp32.

    Regularisers: ``l2sp`` penalises the squared distance of the trainable DOFA parameters to
    their pretrained values (for LoRA: of the LoRA factors to their initialisation, i.e. the
    size of the update); ``similarity`` compares the batch's similarity structure with that of
    a frozen copy of the pretrained DOFA on the same augmented images.

    Args:
        chips: ``(n_plots, bands, S + 2 * max_shift, S + 2 * max_shift)`` DN around each plot
            (uint8, uint16 or float; 0 is nodata), S = 224; may be a memory map.
        releves: ``(n_plots, n_species)`` cover or presence.
        coords: ``(n_plots, 2)`` map coordinates, for the spatial validation split.
        species: Vocabulary.
        size: DOFA size (``model.dofa.size``).
        weights: Pretrained DOFA checkpoint, or None for the seeded random initialisation.
        wavelengths_um: Centre wavelength of each band, in µm.
        mean: Per-band normalisation mean, in DN.
        std: Per-band normalisation std, in DN.
        settings: ``mode`` must be ``"partial"`` or ``"full"``.
        out_dir: Output folder: ``backbone.pt`` (best DOFA, TorchGeo layout, LoRA merged),
            ``model.pt`` (relevé encoder + loss), ``last.pt``, ``history.json``,
            ``training_curve.png``.
        device: Overrides ``settings.device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).

    Returns:
        Summary like :func:`train_adapter`'s, plus ``backbone`` (the path of ``backbone.pt``).

    Raises:
        CatalogError: If the settings are invalid, not for a pixel mode, or ask for more blocks
            than DOFA has.
        InputDataError: If the arrays do not match.
        StageError: If there are too few plots for a spatial hold-out.
        WeightsError: If the DOFA weights cannot be loaded.

    """
    settings = check_settings(settings)
    if settings.mode not in ("partial", "full"):
        raise CatalogError(
            f"train_backbone trains DOFA on pixels (finetune.mode 'partial' or 'full'), got "
            f"{settings.mode!r}; mode 'adapter' trains on cached features with train_adapter"
        )
    margin = settings.max_shift
    _check_pixel_inputs(chips, releves, coords, species, wavelengths_um, mean, std, margin)
    train_idx, val_idx = split_plots(coords, settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device or settings.device)
    autocast, precision = precision_context(dev)

    with seeded(settings.seed):
        dofa = build_dofa(size, weights, seed=settings.seed)
        frozen = None
        if settings.regularizer == "similarity":
            frozen = copy.deepcopy(dofa).requires_grad_(False).eval().to(dev)
        trainable = _make_trainable(dofa, settings, size)
        model = BotaClipBackbone(dofa, len(species), settings, wavelengths_um).to(dev)
    # after freezing and moving: the start point is the pretrained values of what trains
    regularizer = build_regularizer(settings.regularizer, module=model.dofa).to(dev)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=settings.lr)
    rels = torch.from_numpy(releve_input(np.asarray(releves), settings.releve_input)).to(dev)
    pixels = PixelBatches(chips, margin=margin, mean=mean, std=std, device=dev)
    batch = min(settings.batch_size, len(train_idx))
    val_t = torch.from_numpy(val_idx).to(dev)
    waves = model.wavelengths_um

    def embed(encode: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        with autocast():
            out = encode(x)
        return out.float()  # losses and regularisers in fp32

    def train_epoch(gen: np.random.Generator) -> float:
        order = gen.permutation(train_idx)
        augs = draw_epoch_augmentations(gen, len(chips), margin)
        losses = []
        for s in range(0, len(order) - batch + 1, batch):  # drop the ragged last batch
            rows = order[s : s + batch]
            x = pixels(rows, augs)
            img = embed(model.encode_image, x)
            rel = model.encode_releve(rels[torch.from_numpy(rows).to(dev)])
            reference = None
            if frozen is not None:
                with torch.no_grad():
                    reference = embed(partial(frozen.forward_features, wavelengths=waves), x)
            total = model.loss(img, rel) + settings.reg_weight * regularizer(img, reference)
            optimizer_step(optimizer, total)
            losses.append(total.detach())
        return _mean_loss(losses)

    def validate() -> dict[str, float]:
        vimg = torch.cat(
            [
                embed(model.encode_image, pixels(val_idx[s : s + batch], None))
                for s in range(0, len(val_idx), batch)
            ]
        )
        vrel = model.encode_releve(rels[val_t])
        return {
            "val_loss": float(model.loss(vimg, vrel)),
            "val_recall_at_5": _retrieval_recall(vimg, vrel),
        }

    def save_best() -> None:
        export = copy.deepcopy(model.dofa).cpu()
        merge_lora(export)
        tmp = out_dir / f".{BACKBONE}.tmp"
        save_dofa(export, tmp, format="torchgeo")
        os.replace(tmp, out_dir / BACKBONE)
        heads = {
            f"{name}.{key}": value
            for name in ("releve_encoder", "loss")
            for key, value in cpu_state(model.get_submodule(name)).items()
        }
        save_atomic(
            {
                "model": heads,
                "dim": model.dofa.embed_dim,
                "species": species,
                "mode": settings.mode,
                "dofa_size": size,
                "backbone": BACKBONE,
            },
            out_dir / BEST,
        )

    history, best = fit_epochs(
        model,
        optimizer,
        settings=settings,
        out_dir=out_dir,
        train_epoch=train_epoch,
        validate=validate,
        save_best=save_best,
    )
    card = {
        "model": f"BotaCLIP: DOFA fine-tuned on pixels ({trainable})",
        "mode": settings.mode,
        "embedding": "DOFA forward_features of backbone.pt (no adapter)",
        "trainable": trainable,
        "trainable_parameters": _n_trainable(model.dofa),
        "dofa_parameters": sum(p.numel() for p in model.dofa.parameters()),
        "dofa": {"size": size, "weights": str(weights) if weights else "random initialisation"},
        "image_size": pixels.size,
        "max_shift": margin,
        "augmentation": (
            f"random window (chip-centre shift up to {margin} px), horizontal flip, 90° "
            f"rotations, brightness x U{BRIGHTNESS_RANGE}"
        ),
        "device": str(dev),
        "precision": precision,
        "batch_size": batch,
        "loss": settings.loss,
        "regularizer": settings.regularizer,
        "reg_weight": settings.reg_weight,
    }
    summary = _summary(history, best, train_idx, val_idx, out_dir, card)
    summary["backbone"] = str(out_dir / BACKBONE)
    return summary


# ---------------------------------------------------------------------------------------------
# outputs


def plot_history(history: list[dict[str, float]], path: Path) -> None:
    """Training and validation loss per epoch as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax.plot(epochs, [h["val_loss"] for h in history], label="validation (spatial hold-out)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def load_adapter(path: Path) -> BotaClip:
    """Load the model saved by :func:`train_adapter` (weights only, no pickled objects).

    Raises:
        StageError: If ``path`` was written by :func:`train_backbone` (no adapter).

    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    model_state = state["model"]
    if "adapter.weight" not in model_state:
        raise StageError(
            f"{path} holds no adapter: it was trained with finetune.mode "
            f"{state.get('mode', 'partial/full')!r}; embed the region with the fine-tuned DOFA "
            f"({state.get('backbone', BACKBONE)} next to it) instead"
        )
    n_species = model_state["releve_encoder." + _first_linear_key(model_state)].shape[1]
    settings = FinetuneSettings.model_validate(
        {
            "releve_encoder": "mlp" if _is_mlp(model_state) else "linear",
            "loss": "sigmoid" if "loss.logit_bias" in model_state else "infonce",
        }
    )
    model = BotaClip(int(state["dim"]), int(n_species), settings)
    model.load_state_dict(model_state)
    model.eval()
    return model


def _first_linear_key(state: dict[str, torch.Tensor]) -> str:
    keys = sorted(
        k.removeprefix("releve_encoder.")
        for k in state
        if k.startswith("releve_encoder.") and k.endswith("weight")
    )
    return keys[0]


def _is_mlp(state: dict[str, torch.Tensor]) -> bool:
    return sum(1 for k in state if k.startswith("releve_encoder.") and k.endswith("weight")) > 1
