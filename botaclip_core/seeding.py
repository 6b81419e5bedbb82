"""Seeded torch initialisation that concurrently running stages cannot interleave."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

# torch's CPU generator is process-global: two stages seeding it at once (independent branches
# run as concurrent Prefect tasks) would draw each other's numbers
_LOCK = threading.RLock()


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator inside the block, restore the caller's state after.

    Holds a process-wide lock for the block, so keep it to model construction.
    """
    with _LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
