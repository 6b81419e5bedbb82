"""Models: the DOFA encoder and the trainable heads around it."""

from botaclip_core.models.checkpoints import build_dofa, load_dofa_weights, save_dofa
from botaclip_core.models.dofa import DOFA, DOFA_SIZES, DOFASize
from botaclip_core.models.heads import (
    Adapter,
    LoRALinear,
    ReleveEncoder,
    apply_lora,
    merge_lora,
    set_trainable_blocks,
)

__all__ = [
    "DOFA",
    "DOFA_SIZES",
    "Adapter",
    "DOFASize",
    "LoRALinear",
    "ReleveEncoder",
    "apply_lora",
    "build_dofa",
    "load_dofa_weights",
    "merge_lora",
    "save_dofa",
    "set_trainable_blocks",
]
