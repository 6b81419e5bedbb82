"""Run-time setup shared by every training path: settings validation and device."""

from __future__ import annotations

import torch
from pydantic import ValidationError

from botaclip_core.catalog import FinetuneSettings, format_validation_error
from botaclip_core.errors import CatalogError


def check_settings(settings: FinetuneSettings) -> FinetuneSettings:
    """Validate settings again: ``model_copy(update=...)`` bypasses pydantic's validators.

    Args:
        settings: Settings, possibly built with ``model_copy(update=...)``.

    Returns:
        The validated settings.

    Raises:
        CatalogError: If a value or a combination of values is invalid.

    """
    try:
        return FinetuneSettings.model_validate(settings.model_dump())
    except ValidationError as exc:
        raise CatalogError(format_validation_error(exc, source="finetune settings")) from None


def resolve_device(requested: str | None) -> torch.device:
    """Pick the training device for ``finetune.device`` (``auto``: CUDA when available).

    Args:
        requested: ``"auto"``, None (same), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...

    Returns:
        The device.

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
