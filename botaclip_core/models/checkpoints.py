"""DOFA checkpoints: build a model with TorchGeo or official weights, save in either layout."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from botaclip_core.errors import CatalogError, WeightsError
from botaclip_core.models.dofa import DOFA, DOFA_SIZES

logger = logging.getLogger(__name__)

# keys of the official pre-training checkpoint (and of TorchGeo models built with a
# classification head or without global pooling) that feature extraction does not use
_IGNORED_KEY_PREFIXES = ("mask_token", "norm.", "projector.", "head.", "decoder")
# TorchGeo's published files have no fc_norm; TorchGeo then keeps LayerNorm's default init
_OPTIONAL_KEY_PREFIXES = ("fc_norm.",)


def _size_of(state: Mapping[str, Tensor]) -> str | None:
    """Name of the DOFA size whose width and depth match a checkpoint, if any."""
    cls_token = state.get("cls_token")
    if cls_token is None:
        return None
    block_ids = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    depth = max(block_ids) + 1 if block_ids else 0
    for name, spec in DOFA_SIZES.items():
        if spec.embed_dim == cls_token.shape[-1] and spec.depth == depth:
            return name
    return None


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """Read a checkpoint file and return its state dict, unwrapped and with tensor values."""
    if not path.is_file():
        raise WeightsError(
            f"DOFA weights file {path} does not exist. Set model.dofa.weights to a DOFA "
            "checkpoint (e.g. dofa_base_patch16_224-a0275954.pth from TorchGeo) or to null "
            "for random initialisation."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle, zip and runtime errors for bad files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {reason}). "
            "Files are read with torch.load(weights_only=True), so checkpoints that pickle "
            "arbitrary objects are refused; expected a DOFA small/base/large state dict from "
            "TorchGeo or the official release."
        ) from exc
    if isinstance(obj, Mapping):
        for wrapper in ("model", "state_dict"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping):
        raise WeightsError(
            f"{path} holds a {type(obj).__name__}, not a state dict; expected a DOFA "
            "small/base/large checkpoint from TorchGeo or the official release."
        )
    not_tensors = [str(k) for k, v in obj.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise WeightsError(
            f"{path}: entries {not_tensors[:10]} are not tensors, so this is not a model state "
            "dict; expected a DOFA small/base/large checkpoint from TorchGeo or the official "
            "release."
        )
    state = {str(k): v for k, v in obj.items()}
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def load_dofa_weights(model: DOFA, path: str | Path, *, strict_keys: bool = True) -> None:
    """Load a TorchGeo or official DOFA checkpoint into ``model`` in place.

    Keys that feature extraction does not use (``mask_token``, ``norm.*``, ``projector.*``,
    ``head.*``, ``decoder*``) are skipped. A checkpoint without ``fc_norm`` (TorchGeo's published
    files, the official release) leaves ``fc_norm`` at its default initialisation, as TorchGeo
    does.

    Args:
        model: The model to fill.
        path: Checkpoint file: a state dict, or a dict holding one under ``model`` or
            ``state_dict``.
        strict_keys: If True, keys that are neither DOFA parameters nor known extras are an
            error; if False they are logged and skipped. Missing parameters are always an error.

    Raises:
        WeightsError: If the file cannot be read, a tensor has the wrong shape, a parameter is
            missing, or (with ``strict_keys``) the file has unknown keys.

    """
    path = Path(path)
    state = _read_state_dict(path)
    expected = model.state_dict()
    found = _size_of(state)
    same = found is not None and DOFA_SIZES[found].embed_dim == model.embed_dim
    hint = (
        f"the checkpoint looks like DOFA {found!r}: use build_dofa(size={found!r}, ...)"
        if found and not same
        else "expected a DOFA small/base/large checkpoint from TorchGeo or the official release"
    )
    for key, value in state.items():
        if key in expected and value.shape != expected[key].shape:
            raise WeightsError(
                f"{path}: tensor {key!r} has shape {tuple(value.shape)} in the checkpoint but "
                f"the model (embed_dim={model.embed_dim}, depth={model.depth}) expects "
                f"{tuple(expected[key].shape)}; {hint}."
            )
    missing = [k for k in expected if k not in state and not k.startswith(_OPTIONAL_KEY_PREFIXES)]
    unexpected = [k for k in state if k not in expected and not k.startswith(_IGNORED_KEY_PREFIXES)]
    if missing or (unexpected and strict_keys):
        raise WeightsError(
            f"{path} does not match DOFA (embed_dim={model.embed_dim}, depth={model.depth}): "
            f"{len(missing)} missing keys {missing[:10]}, {len(unexpected)} unexpected keys "
            f"{unexpected[:10]}. {hint[0].upper()}{hint[1:]}."
        )
    if unexpected:
        logger.warning("%s: skipping %d unknown keys %s", path, len(unexpected), unexpected[:10])
    skipped = [k for k in state if k not in expected and k not in unexpected]
    if skipped:
        logger.info("%s: skipping %d keys unused for features %s", path, len(skipped), skipped[:10])
    if not any(k.startswith(_OPTIONAL_KEY_PREFIXES) for k in state):
        logger.info("%s has no fc_norm; keeping LayerNorm's default (as TorchGeo does)", path)
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    logger.info("loaded DOFA weights from %s", path)


def build_dofa(
    size: str = "base",
    weights: str | Path | None = None,
    *,
    strict_keys: bool = True,
    seed: int | None = None,
) -> DOFA:
    """Build a DOFA encoder, optionally with pretrained weights.

    Args:
        size: One of :data:`DOFA_SIZES` ("small", "base", "large"; "tiny" is for tests only
            and has no published weights).
        weights: Checkpoint file (TorchGeo or official format), or None for random weights.
        strict_keys: Passed to :func:`load_dofa_weights`.
        seed: If given, random initialisation uses this seed without touching the global RNG.

    Returns:
        The model (in training mode; DOFA has no dropout, so eval only matters to callers'
        own layers).

    Raises:
        CatalogError: If ``size`` is unknown.
        WeightsError: If the checkpoint cannot be loaded.

    """
    if size not in DOFA_SIZES:
        raise CatalogError(
            f"unknown DOFA size {size!r}; allowed: {sorted(DOFA_SIZES)} (model.dofa.size)"
        )
    spec = DOFA_SIZES[size]
    if seed is None:
        model = DOFA(embed_dim=spec.embed_dim, depth=spec.depth, num_heads=spec.num_heads)
    else:
        from botaclip_core.seeding import seeded

        with seeded(seed):
            model = DOFA(embed_dim=spec.embed_dim, depth=spec.depth, num_heads=spec.num_heads)
    if weights is None:
        logger.warning(
            "DOFA %r has RANDOM weights: its embeddings are meaningless. Set model.dofa.weights "
            "to a pretrained checkpoint for real use.",
            size,
        )
    else:
        load_dofa_weights(model, weights, strict_keys=strict_keys)
    return model


def save_dofa(
    model: DOFA, path: str | Path, *, format: Literal["torchgeo", "official"] = "torchgeo"
) -> Path:
    """Write a model's weights in a published DOFA checkpoint layout.

    ``"torchgeo"`` writes the DOFA state dict (including ``fc_norm``, which TorchGeo's
    ``load_state_dict(strict=False)`` accepts). ``"official"`` mimics the authors' pre-training
    checkpoint: no ``fc_norm``, plus placeholder ``mask_token``, ``norm.*`` and ``projector.*``.

    Args:
        model: The model to save; LoRA layers must be merged first.
        path: Output file.
        format: Checkpoint layout.

    Returns:
        The path written.

    Raises:
        WeightsError: If the model has unmerged LoRA layers.
        CatalogError: If ``format`` is unknown.

    """
    path = Path(path)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    lora_keys = [k for k in state if "lora_" in k]
    if lora_keys:
        raise WeightsError(
            f"cannot save {path}: the model has LoRA layers ({lora_keys[:3]}...); call "
            "botaclip_core.models.heads.merge_lora(model) first"
        )
    if format == "official":
        fc_norm = model.fc_norm
        if not (torch.all(fc_norm.weight == 1) and torch.all(fc_norm.bias == 0)):
            logger.warning(
                "%s: the official layout has no fc_norm; its trained values are lost", path
            )
        dim = model.embed_dim
        state = {k: v for k, v in state.items() if not k.startswith("fc_norm.")}
        state["mask_token"] = torch.zeros(1, 1, dim)
        state["norm.weight"] = torch.ones(dim)
        state["norm.bias"] = torch.zeros(dim)
        state["projector.weight"] = torch.zeros(dim, dim)
        state["projector.bias"] = torch.zeros(dim)
    elif format != "torchgeo":
        raise CatalogError(
            f"unknown DOFA checkpoint format {format!r}; use 'torchgeo' or 'official'"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path
