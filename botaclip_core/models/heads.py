"""Trainable parts around DOFA: the feature adapter, relevé encoders, LoRA and block freezing."""

from __future__ import annotations

import logging
import math
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from botaclip_core.errors import CatalogError
from botaclip_core.models.dofa import DOFA

logger = logging.getLogger(__name__)


class Adapter(nn.Linear):
    """Square linear map on frozen DOFA features, initialised to the identity.

    At initialisation the adapted embedding equals the DOFA embedding, so training starts from
    the pretrained geometry (and the L2-SP penalty is the distance to the identity).
    """

    def __init__(self, dim: int) -> None:
        """Create the adapter.

        Args:
            dim: Feature width (the DOFA ``embed_dim``).

        """
        super().__init__(dim, dim, bias=True)

    def reset_parameters(self) -> None:
        """Set the weight to the identity and the bias to zero."""
        with torch.no_grad():
            self.weight.copy_(torch.eye(self.out_features, self.in_features))
            self.bias.zero_()


class ReleveEncoder(nn.Module):
    """Maps a relevé (species presence or cover vector) into the embedding space."""

    def __init__(
        self,
        n_species: int,
        dim: int,
        kind: Literal["linear", "mlp"] = "linear",
        hidden: int = 256,
    ) -> None:
        """Create the encoder.

        Args:
            n_species: Length of the relevé vector.
            dim: Output width (the image embedding width).
            kind: ``"linear"`` (one linear layer) or ``"mlp"`` (linear, GELU, linear).
            hidden: Hidden width of the MLP.

        Raises:
            CatalogError: If ``kind`` is unknown or a width is not positive.

        """
        super().__init__()
        if kind not in ("linear", "mlp"):
            raise CatalogError(
                f"unknown relevé encoder {kind!r} (finetune.releve_encoder); use 'linear' or 'mlp'"
            )
        if min(n_species, dim, hidden) < 1:
            raise CatalogError(
                f"relevé encoder widths must be positive, got n_species={n_species}, dim={dim}, "
                f"hidden={hidden}"
            )
        self.kind = kind
        self.net: nn.Module
        if kind == "linear":
            self.net = nn.Linear(n_species, dim)
        else:
            self.net = nn.Sequential(
                nn.Linear(n_species, hidden), nn.GELU(), nn.Linear(hidden, dim)
            )

    def forward(self, releves: Tensor) -> Tensor:
        """Encode relevés.

        Args:
            releves: Tensor of shape (B, n_species).

        Returns:
            Embeddings of shape (B, dim).

        """
        out: Tensor = self.net(releves)
        return out


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update ``(alpha / rank) * B @ A``.

    ``B`` starts at zero, so the wrapped layer initially computes exactly what ``base`` does.
    """

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0) -> None:
        """Wrap ``base`` and freeze its parameters.

        Args:
            base: The layer to adapt.
            rank: Rank of the update.
            alpha: Scale of the update; the effective scale is ``alpha / rank``.

        Raises:
            CatalogError: If ``rank`` is not positive.

        """
        super().__init__()
        if rank < 1:
            raise CatalogError(f"LoRA rank must be at least 1, got {rank}")
        self.base = base
        self.base.requires_grad_(False)
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        """Apply the base layer plus the low-rank update.

        Args:
            x: Input of shape (..., in_features).

        Returns:
            Output of shape (..., out_features).

        """
        update = F.linear(F.linear(x, self.lora_A), self.lora_B)
        return self.base(x) + update * self.scaling

    def merged(self) -> nn.Linear:
        """Return a plain linear layer computing the same function (for export)."""
        base = self.base
        out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
        with torch.no_grad():
            out.weight.copy_(base.weight + self.scaling * self.lora_B @ self.lora_A)
            if base.bias is not None:
                out.bias.copy_(base.bias)
        return out.to(device=base.weight.device, dtype=base.weight.dtype)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted submodule path ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    *,
    target: str = "attn.qkv",
    freeze_others: bool = True,
) -> list[str]:
    """Wrap every linear layer whose name ends with ``target`` in a :class:`LoRALinear`.

    Args:
        model: Model to modify in place (e.g. a DOFA, where the default targets
            ``blocks.*.attn.qkv``).
        rank: LoRA rank.
        alpha: LoRA scale numerator.
        target: Dotted name suffix of the layers to wrap.
        freeze_others: If True, every other parameter of ``model`` is frozen too, so only the
            LoRA matrices train.

    Returns:
        Names of the wrapped layers.

    Raises:
        CatalogError: If no linear layer matches ``target``.

    """
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (name == target or name.endswith("." + target))
    ]
    if not names:
        raise CatalogError(
            f"apply_lora: no nn.Linear named '*{target}' in {type(model).__name__}; "
            "for DOFA use target='attn.qkv' (or 'attn.proj', 'mlp.fc1', 'mlp.fc2')"
        )
    if freeze_others:
        model.requires_grad_(False)
    for name in names:
        base = cast(nn.Linear, model.get_submodule(name))
        _replace(model, name, LoRALinear(base, rank=rank, alpha=alpha))
    logger.info("LoRA (rank %d, alpha %g) on %d layers: %s", rank, alpha, len(names), names[:3])
    return names


def merge_lora(model: nn.Module) -> int:
    """Replace every :class:`LoRALinear` in ``model`` by the equivalent plain linear layer.

    Args:
        model: Model to modify in place.

    Returns:
        Number of layers merged.

    """
    names = [name for name, module in model.named_modules() if isinstance(module, LoRALinear)]
    for name in names:
        lora = cast(LoRALinear, model.get_submodule(name))
        _replace(model, name, lora.merged())
    return len(names)


def set_trainable_blocks(model: DOFA, n_last: int) -> None:
    """Freeze the whole model except its last ``n_last`` blocks and ``fc_norm``.

    Apply LoRA after this call if both are combined: this resets every ``requires_grad``.

    Args:
        model: The DOFA to modify in place.
        n_last: Number of final transformer blocks left trainable (0 trains only ``fc_norm``).

    Raises:
        CatalogError: If ``n_last`` is negative or larger than the model depth.

    """
    depth = len(model.blocks)
    if not 0 <= n_last <= depth:
        raise CatalogError(f"n_last={n_last} trainable blocks: must be between 0 and {depth}")
    model.requires_grad_(False)
    for block in list(model.blocks)[depth - n_last :]:
        block.requires_grad_(True)
    model.fc_norm.requires_grad_(True)
