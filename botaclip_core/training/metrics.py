"""Validation metrics of the contrastive (BotaCLIP) training paths."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def retrieval_recall(img: Tensor, rel: Tensor, k: int = 5) -> float:
    """Share of images whose own relevé is among the k most similar relevés.

    Args:
        img: ``(n, D)`` image embeddings.
        rel: ``(n, D)`` relevé embeddings, row i matching image i.
        k: How many relevés count as retrieved.

    Returns:
        The recall at k, in [0, 1].

    """
    sims = nn.functional.normalize(img, dim=-1) @ nn.functional.normalize(rel, dim=-1).T
    topk = sims.topk(min(k, sims.shape[1]), dim=1).indices
    arange = torch.arange(len(img), device=topk.device).unsqueeze(1)
    return float((topk == arange).any(dim=1).float().mean())


def contrastive_metrics(loss: nn.Module, img: Tensor, rel: Tensor) -> dict[str, float]:
    """Validation loss and recall at 5 of matching image and relevé embeddings.

    Args:
        loss: The contrastive loss module of the model.
        img: ``(n, D)`` image embeddings of the validation plots.
        rel: ``(n, D)`` relevé embeddings of the same plots.

    Returns:
        ``val_loss`` and ``val_recall_at_5``.

    """
    return {"val_loss": float(loss(img, rel)), "val_recall_at_5": retrieval_recall(img, rel)}
