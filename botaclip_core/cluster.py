"""Dask clients: a LocalCluster by default, or an existing scheduler named in the catalog."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from distributed import Client, LocalCluster

from botaclip_core.catalog import DaskSettings

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def compute_client(settings: DaskSettings) -> Iterator[Client | None]:
    """A client for model inference, or None to run blocks in this process.

    With no scheduler address and a single local worker (a 2–3 core laptop), a LocalCluster only
    adds start-up time: torch already uses every core in this process.
    """
    if settings.address or local_workers(settings) > 1:
        with dask_client(settings) as client:
            yield client
    else:
        logger.info("dask: one local worker would only add start-up time; embedding in-process")
        yield None


@contextlib.contextmanager
def dask_client(settings: DaskSettings, *, n_workers: int | None = None) -> Iterator[Client]:
    """A Dask client for the duration of a stage.

    ``settings.address`` connects to a running scheduler (SLURM, Kubernetes, a GPU box); otherwise
    a LocalCluster of processes is started and closed afterwards.
    """
    if settings.address:
        logger.info("dask: connecting to %s", settings.address)
        with Client(settings.address) as client:
            yield client
        return
    workers = n_workers or local_workers(settings)
    threads = settings.threads_per_worker or 1
    logger.info("dask: LocalCluster with %d workers × %d threads", workers, threads)
    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=threads,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.WARNING,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def local_workers(settings: DaskSettings) -> int:
    """Worker processes of the default LocalCluster: one per two cores, at least one."""
    return settings.n_workers or max(1, (os.cpu_count() or 1) // 2)
