"""Run-time setup shared by every training path: settings validation and device."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from botaclip_core.errors import CatalogError

if TYPE_CHECKING:  # the catalog (pydantic) stays out of the embedding path's imports
    from botaclip_core.catalog import FinetuneSettings


def check_settings(settings: FinetuneSettings) -> FinetuneSettings:
    """Validate settings again: ``model_copy(update=...)`` bypasses pydantic's validators.

    Args:
        settings: Settings, possibly built with ``model_copy(update=...)``.

    Returns:
        The validated settings.

    Raises:
        CatalogError: If a value or a combination of values is invalid.

    """
    from pydantic import ValidationError

    from botaclip_core.catalog import FinetuneSettings, format_validation_error

    try:
        return FinetuneSettings.model_validate(settings.model_dump())
    except ValidationError as exc:
        raise CatalogError(format_validation_error(exc, source="finetune settings")) from None


def resolve_device(requested: str | None, *, field: str = "finetune.device") -> torch.device:
    """Pick the device for ``finetune.device`` or ``embed.device`` (``auto``: CUDA when available).

    Args:
        requested: ``"auto"``, None (same), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        field: the catalog field that asked, for the error message.

    Returns:
        The device.

    Raises:
        CatalogError: If CUDA is requested but not available, or the name is not a device.

    """
    name = requested or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise CatalogError(
            f"{field} is {name!r}, which is not a device; use auto, cpu, cuda or cuda:N"
        ) from exc
    if device.type not in ("cpu", "cuda"):
        raise CatalogError(f"{field} is {name!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CatalogError(
            f"{field} is {name!r} but this machine has no usable CUDA device "
            f"(torch.cuda.is_available() is False); set {field} to 'auto' or 'cpu'"
        )
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            raise CatalogError(
                f"{field} is {name!r} but this machine has {count} CUDA device(s) "
                f"(cuda:0 .. cuda:{count - 1}); pick one of them or 'cuda'"
            )
    return device
