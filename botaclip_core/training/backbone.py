"""Modes ``partial`` and ``full``: DOFA itself fine-tuned contrastively on pixel chips."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from botaclip_core.catalog import FinetuneSettings
from botaclip_core.errors import CatalogError
from botaclip_core.losses import build_loss
from botaclip_core.models.checkpoints import build_dofa, save_dofa
from botaclip_core.models.dofa import DOFA
from botaclip_core.models.heads import ReleveEncoder, apply_lora, merge_lora, set_trainable_blocks
from botaclip_core.regularizers import build_regularizer
from botaclip_core.seeding import seeded
from botaclip_core.store import replace_durably, temporary_path
from botaclip_core.training.data import releve_input, split_plots
from botaclip_core.training.loop import (
    BACKBONE,
    BEST,
    cpu_state,
    fit_run,
    mean_loss,
    n_trainable,
    optimizer_step,
    save_atomic,
)
from botaclip_core.training.metrics import contrastive_metrics
from botaclip_core.training.pixels import (
    BRIGHTNESS_RANGE,
    PixelBatches,
    check_pixel_inputs,
    draw_epoch_augmentations,
)
from botaclip_core.training.runtime import check_settings, resolve_device

LORA_TARGET = "attn.qkv"

AutocastFactory = Callable[[], contextlib.AbstractContextManager[Any]]


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


def precision_context(device: torch.device) -> tuple[AutocastFactory, str]:
    """Return the autocast context factory for DOFA forwards and its name for the model card.

    bf16 autocast on CUDA; plain fp32 elsewhere (CPU autocast is slower than fp32 on most CPUs).

    Args:
        device: The training device.

    Returns:
        A factory of the context to run DOFA forwards in, and its description.

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


class _Dofa(NamedTuple):
    """The DOFA a pixel-mode run starts from, and the bands it sees."""

    size: str
    weights: str | Path | None
    wavelengths_um: Sequence[float]


def _build_model(
    spec: _Dofa, settings: FinetuneSettings, n_species: int, device: torch.device
) -> tuple[BotaClipBackbone, DOFA | None, str]:
    """Seeded model, frozen pretrained copy (similarity regulariser only), trainable description."""
    with seeded(settings.seed):
        dofa = build_dofa(spec.size, spec.weights, seed=settings.seed)
        frozen = None
        if settings.regularizer == "similarity":
            frozen = copy.deepcopy(dofa).requires_grad_(False).eval().to(device)
        trainable = _make_trainable(dofa, settings, spec.size)
        model = BotaClipBackbone(dofa, n_species, settings, spec.wavelengths_um).to(device)
    return model, frozen, trainable


class _BackboneRun:
    """The model, optimiser and pixel batches of one pixel-mode run, and its epoch callbacks.

    Training embeds each plot's augmented window; the regulariser sees the trainable DOFA's
    start values (``l2sp``) or a frozen pretrained copy's embeddings of the same images
    (``similarity``).
    """

    def __init__(
        self,
        pixels: PixelBatches,
        releves: np.ndarray,
        species: list[str],
        dofa: _Dofa,
        settings: FinetuneSettings,
        split: tuple[np.ndarray, np.ndarray],
        out_dir: Path,
    ) -> None:
        """Build the model and optimiser.

        Args:
            pixels: The plots' chips, on the training device.
            releves: ``(n_plots, n_species)`` cover or presence.
            species: Vocabulary.
            dofa: Which DOFA to build.
            settings: Validated settings for a pixel mode.
            split: The training and validation plot indices.
            out_dir: Output folder.

        """
        device = pixels.device
        self.settings, self.species, self.split, self.out_dir = settings, species, split, out_dir
        self.pixels, self.device, self.n_plots = pixels, device, len(pixels.chips)
        self.dofa = dofa
        self.train_idx, self.val_idx = split
        self.autocast, self.precision = precision_context(device)
        self.model, self.frozen, self.trainable = _build_model(dofa, settings, len(species), device)
        # after freezing and moving: the start point is the pretrained values of what trains
        regularizer = build_regularizer(settings.regularizer, module=self.model.dofa)
        self.regularizer = regularizer.to(device)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(trainable, lr=settings.lr)
        rels = releve_input(np.asarray(releves), settings.releve_input)
        self.rels = torch.from_numpy(rels).to(device)
        self.batch = min(settings.batch_size, len(self.train_idx))
        self.val_t = torch.from_numpy(self.val_idx).to(device)

    def _embed(self, encode: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        with self.autocast():
            out = encode(x)
        return out.float()  # losses and regularisers in fp32

    def _reference(self, x: Tensor) -> Tensor | None:
        """Embeddings of the frozen pretrained DOFA, which the similarity regulariser needs."""
        if self.frozen is None:
            return None
        forward = partial(self.frozen.forward_features, wavelengths=self.model.wavelengths_um)
        with torch.no_grad():
            return self._embed(forward, x)

    def _train_step(self, rows: np.ndarray, x: Tensor) -> Tensor:
        model = self.model
        img = self._embed(model.encode_image, x)
        rel = model.encode_releve(self.rels[torch.from_numpy(rows).to(self.device)])
        reference = self._reference(x)
        total = model.loss(img, rel) + self.settings.reg_weight * self.regularizer(img, reference)
        optimizer_step(self.optimizer, total)
        return total.detach()

    def train_epoch(self, gen: np.random.Generator) -> float:
        order = gen.permutation(self.train_idx)
        augs = draw_epoch_augmentations(gen, self.n_plots, self.settings.max_shift)
        batch = self.batch
        # the ragged last batch is dropped; the next batches' crops are cut on a loader thread
        batches = [order[s : s + batch] for s in range(0, len(order) - batch + 1, batch)]
        losses = [
            self._train_step(rows, x)
            for rows, x in zip(batches, self.pixels.stream(batches, augs), strict=True)
        ]
        return mean_loss(losses)

    def validate(self) -> dict[str, float]:
        val_idx, batch = self.val_idx, self.batch
        vimg = torch.cat(
            [
                self._embed(self.model.encode_image, self.pixels(val_idx[s : s + batch], None))
                for s in range(0, len(val_idx), batch)
            ]
        )
        vrel = self.model.encode_releve(self.rels[self.val_t])
        return contrastive_metrics(self.model.loss, vimg, vrel)

    def save_best(self) -> None:
        export = copy.deepcopy(self.model.dofa).cpu()
        merge_lora(export)
        tmp = temporary_path(self.out_dir / BACKBONE)
        save_dofa(export, tmp, format="torchgeo")
        replace_durably(tmp, self.out_dir / BACKBONE)
        heads = {
            f"{name}.{key}": value
            for name in ("releve_encoder", "loss")
            for key, value in cpu_state(self.model.get_submodule(name)).items()
        }
        best = {
            "model": heads,
            "dim": self.model.dofa.embed_dim,
            "species": self.species,
            "mode": self.settings.mode,
            "dofa_size": self.dofa.size,
            "backbone": BACKBONE,
        }
        save_atomic(best, self.out_dir / BEST)

    def card(self) -> dict[str, Any]:
        settings, margin, dofa = self.settings, self.settings.max_shift, self.model.dofa
        weights = str(self.dofa.weights) if self.dofa.weights else "random initialisation"
        return {
            "model": f"BotaCLIP: DOFA fine-tuned on pixels ({self.trainable})",
            "mode": settings.mode,
            "embedding": "DOFA forward_features of backbone.pt (no adapter)",
            "trainable": self.trainable,
            "trainable_parameters": n_trainable(dofa),
            "dofa_parameters": sum(p.numel() for p in dofa.parameters()),
            "dofa": {"size": self.dofa.size, "weights": weights},
            "image_size": self.pixels.size,
            "max_shift": margin,
            "augmentation": (
                f"random window (chip-centre shift up to {margin} px), horizontal flip, 90° "
                f"rotations, brightness x U{BRIGHTNESS_RANGE}"
            ),
            "device": str(self.device),
            "precision": self.precision,
            "batch_size": self.batch,
            "loss": settings.loss,
            "regularizer": settings.regularizer,
            "reg_weight": settings.reg_weight,
        }


def _check_call(
    settings: FinetuneSettings,
    chips: np.ndarray,
    releves: np.ndarray,
    coords: np.ndarray,
    species: list[str],
    bands: tuple[Sequence[float], Sequence[float], Sequence[float]],
) -> FinetuneSettings:
    """Validated settings for a pixel mode, after checking that the arrays match."""
    settings = check_settings(settings)
    if settings.mode not in ("partial", "full"):
        raise CatalogError(
            f"train_backbone trains DOFA on pixels (finetune.mode 'partial' or 'full'), got "
            f"{settings.mode!r}; mode 'adapter' trains on cached features with train_adapter"
        )
    check_pixel_inputs(chips, releves, coords, species, *bands, settings.max_shift)
    return settings


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

    ``partial`` trains the last ``trainable_blocks`` blocks and ``fc_norm`` (LoRA on ``attn.qkv``
    of every block with ``lora_rank``), ``full`` all of DOFA; the image embedding is DOFA's
    ``forward_features``. Each epoch draws one augmentation per plot (shifted window, flip,
    rotation, brightness; nodata stays 0); validation uses the held-out plots' centre windows.

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
        Summary like :func:`~botaclip_core.training.adapter.train_adapter`'s, plus
        ``backbone`` (the path of ``backbone.pt``).

    Raises:
        CatalogError: If the settings are invalid, not for a pixel mode, or ask for more blocks
            than DOFA has.
        InputDataError: If the arrays do not match.
        StageError: If there are too few plots for a spatial hold-out.
        WeightsError: If the DOFA weights cannot be loaded.

    """
    settings = _check_call(settings, chips, releves, coords, species, (wavelengths_um, mean, std))
    split = split_plots(coords, settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device or settings.device)
    pixels = PixelBatches(chips, margin=settings.max_shift, mean=mean, std=std, device=dev)
    dofa = _Dofa(size, weights, wavelengths_um)
    run = _BackboneRun(pixels, releves, species, dofa, settings, split, out_dir)
    summary = fit_run(run, settings=settings, out_dir=out_dir)
    summary["backbone"] = str(out_dir / BACKBONE)
    return summary
