"""Penalties that keep fine-tuned embeddings close to the pretrained DOFA ones."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from botaclip_core.errors import CatalogError, WeightsError


class L2SP(nn.Module):
    """L2-SP (Li et al. 2018): squared distance of trainable parameters to their start point.

    The parameters that require grad when the regulariser is created are tracked; at use only
    those that still require grad are penalised. For an identity-initialised adapter this is
    ``||W - I||² + ||b||²``.
    """

    def __init__(
        self, module: nn.Module, reference_state: Mapping[str, Tensor] | None = None
    ) -> None:
        """Snapshot the start point.

        Args:
            module: The module being fine-tuned (not registered as a submodule, so its
                parameters do not appear twice in an optimiser).
            reference_state: Start values by parameter name; default: the current values.

        Raises:
            WeightsError: If ``reference_state`` lacks a trainable parameter or has a wrong
                shape.

        """
        super().__init__()
        self._params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self._buffer_names: list[str] = []
        for name, param in self._params:
            if reference_state is None:
                ref = param.detach().clone()
            elif name not in reference_state:
                raise WeightsError(
                    f"L2SP reference state has no entry for trainable parameter {name!r}; "
                    f"it has {sorted(reference_state)[:10]}"
                )
            else:
                ref = reference_state[name].detach().clone().to(param.device, param.dtype)
                if ref.shape != param.shape:
                    raise WeightsError(
                        f"L2SP reference for {name!r} has shape {tuple(ref.shape)}, the "
                        f"parameter has {tuple(param.shape)}"
                    )
            buffer_name = "ref_" + name.replace(".", "__")
            self.register_buffer(buffer_name, ref)
            self._buffer_names.append(buffer_name)

    def forward(self, adapted: Tensor | None = None, frozen: Tensor | None = None) -> Tensor:
        """Sum of squared differences to the start point.

        Args:
            adapted: Ignored (accepted so that all regularisers share one call signature).
            frozen: Ignored.

        Returns:
            Scalar penalty (0 when no parameter is trainable).

        """
        total: Tensor | None = None
        for (_, param), buffer_name in zip(self._params, self._buffer_names, strict=True):
            if not param.requires_grad:
                continue
            ref: Tensor = getattr(self, buffer_name)
            term = (param - ref.to(param.device)).pow(2).sum()
            total = term if total is None else total + term
        if total is None:
            device = self._params[0][1].device if self._params else None
            return torch.zeros((), device=device)
        return total


class SimilarityPreservation(nn.Module):
    """Keep the batch's cosine-similarity structure close to that of the frozen DOFA embeddings."""

    def forward(self, adapted: Tensor | None = None, frozen: Tensor | None = None) -> Tensor:
        """Mean squared difference between the two (B, B) cosine-similarity matrices.

        Args:
            adapted: Fine-tuned embeddings of shape (B, D).
            frozen: Frozen DOFA embeddings of the same images, shape (B, D'); not
                differentiated.

        Returns:
            Scalar penalty.

        Raises:
            CatalogError: If either input is missing.

        """
        if adapted is None or frozen is None:
            raise CatalogError(
                "the 'similarity' regulariser needs both the adapted and the frozen embeddings"
            )
        a = F.normalize(adapted, dim=-1)
        f = F.normalize(frozen.detach(), dim=-1)
        return (a @ a.T - f @ f.T).pow(2).mean()


class NoRegularizer(nn.Module):
    """A regulariser that is always zero."""

    def forward(self, adapted: Tensor | None = None, frozen: Tensor | None = None) -> Tensor:
        """Return zero.

        Args:
            adapted: Ignored.
            frozen: Ignored.

        Returns:
            Scalar zero.

        """
        device = adapted.device if adapted is not None else None
        return torch.zeros((), device=device)


REGULARIZERS = ("l2sp", "similarity", "none")


def build_regularizer(
    name: str,
    *,
    module: nn.Module | None = None,
    reference_state: Mapping[str, Tensor] | None = None,
) -> nn.Module:
    """Create a regulariser by name.

    Every regulariser is called as ``reg(adapted, frozen)`` (L2SP ignores both).

    Args:
        name: ``"l2sp"``, ``"similarity"`` or ``"none"`` (``finetune.regularizer``).
        module: The fine-tuned module; required by ``"l2sp"``.
        reference_state: Start point for ``"l2sp"``; default: ``module``'s current values.

    Returns:
        The regulariser.

    Raises:
        CatalogError: If the name is unknown or ``"l2sp"`` has no module.

    """
    if name == "l2sp":
        if module is None:
            raise CatalogError("regularizer 'l2sp' needs module= (the module being fine-tuned)")
        return L2SP(module, reference_state)
    if name == "similarity":
        return SimilarityPreservation()
    if name == "none":
        return NoRegularizer()
    raise CatalogError(
        f"unknown regularizer {name!r} (finetune.regularizer); allowed: {list(REGULARIZERS)}"
    )
