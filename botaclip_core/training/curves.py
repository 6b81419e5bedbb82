"""Training history outputs: the per-epoch JSON and the loss curve."""

from __future__ import annotations

import json
from pathlib import Path

from botaclip_core.store import atomic_write_text, replace_durably, temporary_path

HISTORY = "history.json"
CURVE = "training_curve.png"


def plot_history(history: list[dict[str, float]], path: Path) -> None:
    """Training and validation loss per epoch as a PNG.

    Args:
        history: One dict per epoch with ``epoch``, ``train_loss`` and ``val_loss``.
        path: PNG to write.

    """
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
    fig.savefig(path, format="png")
    plt.close(fig)


def write_history(history: list[dict[str, float]], out_dir: Path, *, stem: str = "") -> None:
    """Write ``{stem}history.json`` and its plot ``{stem}training_curve.png`` into ``out_dir``.

    Args:
        history: One dict per epoch with ``epoch``, ``train_loss`` and ``val_loss``.
        out_dir: Output folder.
        stem: Prefix of both file names.

    """
    atomic_write_text(out_dir / f"{stem}{HISTORY}", json.dumps(history, indent=1))
    curve = out_dir / f"{stem}{CURVE}"
    tmp = temporary_path(curve)
    plot_history(history, tmp)
    replace_durably(tmp, curve)
