"""Dask tasks of a tiling run: grouping blocks into tasks and waves, and running a task."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import rasterio

from botaclip_core.tiling.blocks import _TASK_SIDE, _Job, _shard_ids, _super_block_side
from botaclip_core.tiling.compose import _compose_block
from botaclip_core.tiling.handles import _GDAL_ENV
from botaclip_core.tiling.records import _open_log
from botaclip_core.tiling.shards import _zarr_writers
from botaclip_core.tiling.sources import _Source
from botaclip_core.tiling.warp import _TaskWarps

if TYPE_CHECKING:
    import distributed

# tasks are ordered in vertical stripes about this many 8-block task columns wide, top to bottom:
# a source tile shared by two tasks is then reused from _TILES after a bounded delay, whatever
# the region width
_STRIPE_TASKS = 4
_BLOCKS_PER_WAVE = 16384  # graph size bound: one wave of tasks at a time


def _group_tasks(
    block_ids: np.ndarray,
    src_lists: list[np.ndarray],
    infos: list[_Source],
    n_bcols: int,
    shard_blocks: int,
) -> list[tuple[list[int], list[list[int]], list[_Source]]]:
    """Group blocks into spatially compact tasks that carry only their sources.

    A task is one shard (or 8×8 blocks when unsharded). Tasks come in stripe order (see
    _STRIPE_TASKS), row-major within a stripe; blocks are row-major within a task.
    """
    if block_ids.size == 0:
        return []
    side = _super_block_side(shard_blocks)
    super_ids = _shard_ids(block_ids, n_bcols, side)
    stripes = (block_ids % n_bcols) // (side * max(1, _STRIPE_TASKS * _TASK_SIDE // side))
    order = np.lexsort((block_ids, super_ids, stripes))
    tasks = []
    current: int | None = None
    blocks: list[int] = []
    lists: list[np.ndarray] = []

    def flush() -> None:
        used = sorted({int(i) for lst in lists for i in lst})
        local = {g: k for k, g in enumerate(used)}
        tasks.append(
            (
                blocks.copy(),
                [[local[int(i)] for i in lst] for lst in lists],
                [infos[g] for g in used],
            )
        )

    for k in order:
        sid = int(super_ids[k])
        if blocks and sid != current:
            flush()
            blocks, lists = [], []
        current = sid
        blocks.append(int(block_ids[k]))
        lists.append(src_lists[k])
    if blocks:
        flush()
    return tasks


def _waves(tasks: list[Any]) -> Iterator[list[Any]]:
    """Consecutive runs of tasks of about _BLOCKS_PER_WAVE blocks each."""
    wave: list[Any] = []
    n = 0
    for task in tasks:
        wave.append(task)
        n += len(task[0])
        if n >= _BLOCKS_PER_WAVE:
            yield wave
            wave, n = [], 0
    if wave:
        yield wave


def _process_task(
    job: _Job, block_ids: list[int], src_lists: list[list[int]], srcs: list[_Source]
) -> tuple[int, int]:
    """Compose, write and record each block of a task; returns (written, empty) counts."""
    image_writer, valid_writer = _zarr_writers(job.out)
    fd = _open_log(job.records)
    written = empty = 0
    lines: list[str] = []
    warps = _TaskWarps(job, block_ids[0])  # a task's blocks share one super-block
    try:
        with rasterio.Env(**_GDAL_ENV):
            for block_id, local in zip(block_ids, src_lists, strict=True):
                brow, bcol, image, valid = _compose_block(
                    job, block_id, [srcs[i] for i in local], warps
                )
                if image is None:
                    status = "e"
                    empty += 1
                else:
                    image_writer.add((0, brow, bcol), image)
                    if valid is None:
                        valid_writer.add_constant((brow, bcol), image.shape[1:], 1)
                    else:
                        valid_writer.add((brow, bcol), valid.view(np.uint8))
                    status = "w"
                    written += 1
                lines.append(f"{brow} {bcol} {status}\n")
                if job.shard_blocks == 1:
                    # the record follows the chunk writes: a kill in between redoes this block
                    os.write(fd, lines.pop().encode())
        if job.shard_blocks > 1:
            # the records follow the shard writes: a kill in between redoes this shard
            image_writer.flush()
            valid_writer.flush()
            os.write(fd, "".join(lines).encode())
    finally:
        image_writer.discard()
        valid_writer.discard()
        os.close(fd)
    return written, empty


class _Task:
    """One Dask task's work: blocks of one shard and their sources, in precedence order.

    A plain class, not a tuple or dataclass: Dask passes it through as one value instead of
    walking the thousands of block ids and sources it holds (that took a second per wave).
    """

    __slots__ = ("block_ids", "job", "src_lists", "srcs")

    def __init__(
        self, job: _Job, block_ids: list[int], src_lists: list[list[int]], srcs: list[_Source]
    ) -> None:
        self.job, self.block_ids, self.src_lists, self.srcs = job, block_ids, src_lists, srcs


def _run_task(task: _Task) -> tuple[int, int]:
    """Run one task where Dask puts it (a thread here, or a worker process of a client)."""
    return _process_task(task.job, task.block_ids, task.src_lists, task.srcs)


def _run_wave(
    job: _Job,
    wave: list[Any],
    workers: int | None,
    client: distributed.Client | None,
    on_done: Callable[[tuple[int, int]], None] = lambda result: None,
) -> list[tuple[int, int]]:
    """Run a wave of tasks on ``client``, or on local threads; (written, empty) per task.

    ``on_done`` sees each task's result as it finishes (progress bars).
    """
    tasks = [_Task(job, *t) for t in wave]
    if client is not None:
        from distributed import as_completed

        futures = client.map(_run_task, tasks, pure=False)
        for future in as_completed(futures):
            on_done(future.result())
        return list(client.gather(futures))
    import dask
    from dask.callbacks import Callback

    # named in reverse so that the threaded scheduler, which breaks ties between independent
    # tasks by key, runs them in _group_tasks order (random names would scatter them)
    delayed = [
        dask.delayed(_run_task, pure=False)(task, dask_key_name=f"tile-{len(tasks) - k:08d}")
        for k, task in enumerate(tasks)
    ]
    names = {d.key for d in delayed}

    def posttask(key: Any, result: Any, *_: Any) -> None:
        if key in names:  # dask's callbacks see every task of every threaded computation
            on_done(result)

    with Callback(posttask=posttask):
        return list(
            dask.compute(*delayed, scheduler="threads", num_workers=workers or os.cpu_count() or 1)
        )
