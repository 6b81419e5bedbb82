"""Dask clients: a LocalCluster by default, or an existing scheduler named in the catalog.

GPU stages ask for ``resources={"GPU": 1}`` per task, so a scheduler address must have workers
started with ``dask worker ADDRESS --resources GPU=1`` (one per GPU; dask-cuda's
``dask cuda worker`` pins each to its GPU). Locally, a single GPU embeds in this process, and a
box of several GPUs gets one spawned worker per GPU (dask-cuda's ``LocalCUDACluster`` when it is
installed).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from botaclip_core.catalog import DaskSettings

if TYPE_CHECKING:
    from distributed import Client

logger = logging.getLogger(__name__)

# CUDA cannot be initialised again in a forked child: workers are started fresh
MULTIPROCESSING_METHOD = "spawn"


@contextlib.contextmanager
def compute_client(settings: DaskSettings, *, gpu: bool = False) -> Iterator[Client | None]:
    """A client for model inference, or None to run blocks in this process.

    With no scheduler address and a single local worker (a 2–3 core laptop, or one GPU), a
    LocalCluster only adds start-up time: torch already uses every core (the GPU) here.

    Args:
        settings: the catalog's Dask settings.
        gpu: the blocks run on CUDA: local workers are one per GPU, each offering ``GPU=1``.
    """
    workers = local_gpu_workers(settings) if gpu else local_workers(settings)
    if settings.address or workers > 1:
        with dask_client(settings, n_workers=workers, gpu=gpu) as client:
            yield client
    else:
        logger.info("dask: one local worker would only add start-up time; embedding in-process")
        yield None


@contextlib.contextmanager
def dask_client(
    settings: DaskSettings, *, n_workers: int | None = None, gpu: bool = False
) -> Iterator[Client]:
    """A Dask client for the duration of a stage.

    ``settings.address`` connects to a running scheduler (SLURM, Kubernetes, a GPU box); otherwise
    a LocalCluster of spawned processes is started and closed afterwards (with ``gpu``, one
    worker per GPU offering the ``GPU`` resource).
    """
    import dask
    from distributed import Client

    if settings.address:
        logger.info("dask: connecting to %s", settings.address)
        with Client(settings.address) as client:
            yield client
        return
    workers = n_workers or (local_gpu_workers(settings) if gpu else local_workers(settings))
    threads = settings.threads_per_worker or 1
    with (
        dask.config.set({"distributed.worker.multiprocessing-method": MULTIPROCESSING_METHOD}),
        _local_cluster(workers, threads, gpu=gpu) as cluster,
        Client(cluster) as client,
    ):
        yield client


@contextlib.contextmanager
def _local_cluster(workers: int, threads: int, *, gpu: bool) -> Iterator[Any]:
    from distributed import LocalCluster

    options: dict[str, Any] = {"dashboard_address": None, "silence_logs": logging.WARNING}
    if gpu:
        options["resources"] = {"GPU": 1}
        try:
            from dask_cuda import LocalCUDACluster  # one worker per GPU, CUDA_VISIBLE_DEVICES set
        except ImportError:
            logger.info(
                "dask: LocalCluster with %d GPU workers (install dask-cuda to pin each to its GPU)",
                workers,
            )
        else:
            logger.info("dask: LocalCUDACluster with %d GPU workers", workers)
            with LocalCUDACluster(n_workers=workers, threads_per_worker=threads, **options) as c:
                yield c
            return
    else:
        logger.info("dask: LocalCluster with %d workers × %d threads", workers, threads)
    with LocalCluster(
        n_workers=workers, threads_per_worker=threads, processes=True, **options
    ) as cluster:
        yield cluster


def local_workers(settings: DaskSettings) -> int:
    """Worker processes of the default LocalCluster: one per two cores, at least one."""
    return settings.n_workers or max(1, (os.cpu_count() or 1) // 2)


def local_gpu_workers(settings: DaskSettings) -> int:
    """Worker processes of a local GPU cluster: one per visible GPU (``dask.n_workers`` wins)."""
    if settings.n_workers:
        return settings.n_workers
    import torch

    return max(1, torch.cuda.device_count())
