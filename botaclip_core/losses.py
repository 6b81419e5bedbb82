"""Contrastive losses between image and relevé embeddings, each with a learnable temperature."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from botaclip_core.errors import CatalogError, InputDataError

MAX_LOGIT_SCALE = 100.0
"""Upper bound of the logit scale (CLIP's clamp), applied at use."""


def _check_pair(image_emb: Tensor, releve_emb: Tensor) -> None:
    """Check that two embedding batches pair up row by row."""
    if image_emb.ndim != 2 or image_emb.shape != releve_emb.shape:
        raise InputDataError(
            f"contrastive loss needs paired batches of shape (batch, dim); got image embeddings "
            f"{tuple(image_emb.shape)} and relevé embeddings {tuple(releve_emb.shape)}"
        )


class InfoNCELoss(nn.Module):
    """Symmetric InfoNCE (CLIP) loss: cross-entropy over image→relevé and relevé→image logits."""

    def __init__(self, init_temperature: float = 0.07) -> None:
        """Create the loss.

        Args:
            init_temperature: Initial softmax temperature T; the learnable parameter is
                ``logit_scale = log(1 / T)``, used as ``min(exp(logit_scale), 100)``.

        Raises:
            CatalogError: If the temperature is not positive.

        """
        super().__init__()
        if init_temperature <= 0:
            raise CatalogError(f"init_temperature must be > 0, got {init_temperature}")
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))

    @property
    def scale(self) -> Tensor:
        """The multiplier applied to cosine similarities (1 / temperature), clamped."""
        return self.logit_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()

    def logits(self, image_emb: Tensor, releve_emb: Tensor) -> Tensor:
        """Scaled cosine similarities; row i, column j compares image i with relevé j.

        Args:
            image_emb: Image embeddings of shape (B, D).
            releve_emb: Relevé embeddings of shape (B, D); row i pairs with image i.

        Returns:
            Logits of shape (B, B).

        """
        _check_pair(image_emb, releve_emb)
        image = F.normalize(image_emb, dim=-1)
        releve = F.normalize(releve_emb, dim=-1)
        return self.scale * image @ releve.T

    def forward(self, image_emb: Tensor, releve_emb: Tensor) -> Tensor:
        """Mean of the two cross-entropies with the matching pairs as targets.

        Args:
            image_emb: Image embeddings of shape (B, D).
            releve_emb: Relevé embeddings of shape (B, D); row i pairs with image i.

        Returns:
            Scalar loss.

        """
        logits = self.logits(image_emb, releve_emb)
        targets = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


class SigmoidLoss(nn.Module):
    """SigLIP loss (Zhai et al. 2023): independent binary terms for every image–relevé pair."""

    def __init__(self, init_temperature: float = 10.0, init_bias: float = -10.0) -> None:
        """Create the loss.

        Args:
            init_temperature: Initial logit multiplier t; SigLIP calls it the temperature and
                learns ``t' = log t`` (init log 10). Used as ``min(exp(logit_scale), 100)``.
            init_bias: Initial logit bias b (SigLIP: -10), which offsets the many negatives.

        Raises:
            CatalogError: If the temperature is not positive.

        """
        super().__init__()
        if init_temperature <= 0:
            raise CatalogError(f"init_temperature must be > 0, got {init_temperature}")
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_temperature)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_bias)))

    @property
    def scale(self) -> Tensor:
        """The multiplier applied to cosine similarities, clamped."""
        return self.logit_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()

    def logits(self, image_emb: Tensor, releve_emb: Tensor) -> Tensor:
        """Scaled and shifted cosine similarities of every image–relevé pair.

        Args:
            image_emb: Image embeddings of shape (B, D).
            releve_emb: Relevé embeddings of shape (B, D); row i pairs with image i.

        Returns:
            Logits of shape (B, B).

        """
        _check_pair(image_emb, releve_emb)
        image = F.normalize(image_emb, dim=-1)
        releve = F.normalize(releve_emb, dim=-1)
        return self.scale * image @ releve.T + self.logit_bias

    def forward(self, image_emb: Tensor, releve_emb: Tensor) -> Tensor:
        """``-sum(log sigmoid(label * logit)) / B`` with label +1 on matching pairs, -1 elsewhere.

        Args:
            image_emb: Image embeddings of shape (B, D).
            releve_emb: Relevé embeddings of shape (B, D); row i pairs with image i.

        Returns:
            Scalar loss.

        """
        logits = self.logits(image_emb, releve_emb)
        n = logits.shape[0]
        labels = 2 * torch.eye(n, device=logits.device, dtype=logits.dtype) - 1
        return -F.logsigmoid(labels * logits).sum() / n


LOSSES: dict[str, type[nn.Module]] = {"infonce": InfoNCELoss, "sigmoid": SigmoidLoss}


def build_loss(name: str, **kwargs: float) -> nn.Module:
    """Create a contrastive loss by name.

    Args:
        name: ``"infonce"`` or ``"sigmoid"`` (``finetune.loss``).
        **kwargs: Passed to the loss constructor (``init_temperature``, ``init_bias``).

    Returns:
        The loss module; its learnable parameters belong in the optimiser.

    Raises:
        CatalogError: If the name is unknown.

    """
    if name not in LOSSES:
        raise CatalogError(f"unknown loss {name!r} (finetune.loss); allowed: {sorted(LOSSES)}")
    return LOSSES[name](**kwargs)
