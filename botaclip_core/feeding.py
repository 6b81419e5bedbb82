"""Keeping a device fed: inputs loaded ahead by a thread pool, outputs written behind by threads.

Reading a Zarr block, decoding it (zstd releases the GIL) and cutting its windows overlap with
the forward pass of the blocks before it; writing a finished block overlaps with those after it.
Both queues are bounded, so memory follows their depth, never the number of items.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

logger = logging.getLogger(__name__)

Item = TypeVar("Item")
Loaded = TypeVar("Loaded")

_STOP = object()


def prefetch(
    items: Iterable[Item],
    load: Callable[[Item], Loaded],
    *,
    workers: int = 2,
    depth: int = 4,
) -> Generator[tuple[Item, Loaded], None, None]:
    """``(item, load(item))`` in the items' order, with up to ``depth`` loads ahead of the caller.

    Loads run on ``workers`` threads; an exception in one is raised here, at its item. Leaving
    the loop early (``break``, an exception in the caller) cancels the loads not yet started.

    Args:
        items: what to load, in order.
        load: reads one item (a block of pixels, a batch of chips).
        workers: loader threads.
        depth: items loaded or loading at once (the memory bound), at least ``workers``.
    """
    depth = max(depth, workers, 1)
    source = iter(items)
    pending: deque[tuple[Item, Future[Loaded]]] = deque()
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="prefetch") as pool:
        try:
            for item in source:
                pending.append((item, pool.submit(load, item)))
                if len(pending) >= depth:
                    break
            while pending:
                item, future = pending.popleft()
                result = future.result()
                nxt = next(source, _STOP)
                if nxt is not _STOP:
                    pending.append((nxt, pool.submit(load, nxt)))  # type: ignore[arg-type]
                yield item, result
        finally:
            for _, future in pending:
                future.cancel()


class Writer(Generic[Item]):
    """Threads that run ``write(item)`` for every item put, behind a bounded queue.

    ``put`` blocks while ``depth`` items wait (the memory bound) and raises the first error a
    write raised; leaving the ``with`` block waits for every write and raises that error too.

    Args:
        write: writes one item (a block of embeddings and its completion record).
        workers: writer threads (writes of different items must be independent).
        depth: items waiting at most.
    """

    def __init__(self, write: Callable[[Item], None], *, workers: int = 1, depth: int = 8) -> None:
        self._write = write
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max(1, depth))
        self._error: BaseException | None = None
        self._threads = [
            threading.Thread(target=self._run, name=f"writer-{i}", daemon=True)
            for i in range(max(1, workers))
        ]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                if self._error is None:
                    self._write(item)  # type: ignore[arg-type]
            except BaseException as exc:  # noqa: BLE001 (re-raised in the caller's thread)
                if self._error is None:
                    self._error = exc
            finally:
                self._queue.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, item: Item) -> None:
        """Queue one item for writing (blocks while the queue is full)."""
        self._raise()
        self._queue.put(item)

    def close(self) -> None:
        """Wait for every queued write, stop the threads; raise the first write error."""
        for _ in self._threads:
            self._queue.put(_STOP)
        for t in self._threads:
            t.join()
        self._raise()

    def __enter__(self) -> Writer[Item]:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self.close()
        except BaseException:
            if exc_type is None:  # else the caller's own error is the one to see
                raise


@dataclass
class Batch(Generic[Item]):
    """Rows packed for one forward, and the items they came from.

    Attributes:
        data: ``(rows, ...)`` view of a staging buffer (pinned on CUDA); empty at the end of
            items whose rows all went in earlier batches.
        parts: ``(item, first row in the item, rows)`` in batch order; an item of no rows has a
            part of 0 rows.
    """

    data: torch.Tensor
    parts: list[tuple[Item, int, int]]
    buffer: int = field(default=-1, repr=False)


class Batcher(Generic[Item]):
    """Packs the rows of loaded items into full batches on a thread, in reusable buffers.

    Batches are full whatever the items' sizes (a block of 16 windows, of 3 at a region's
    edge), so the forward always runs at the batch size it is fastest at; only the last batch
    is partial. ``buffers`` staging buffers are recycled: the consumer hands each batch back
    with :meth:`release` once the device has copied it, which bounds memory with the queue.

    Args:
        loaded: ``(item, rows)`` with rows a ``(n, ...)`` tensor (n may be 0), e.g. from
            :func:`prefetch`.
        batch_size: rows per batch.
        row_shape: shape of one row.
        dtype: dtype of the rows.
        pin: staging buffers in pinned memory (CUDA: non-blocking copies to the device).
        buffers: staging buffers (at least 2: one filled while one is on its way).
    """

    def __init__(
        self,
        loaded: Iterable[tuple[Item, torch.Tensor]],
        *,
        batch_size: int,
        row_shape: tuple[int, ...],
        dtype: torch.dtype,
        pin: bool = False,
        buffers: int = 3,
    ) -> None:
        self.batch_size = batch_size
        n = max(2, buffers)
        self._buffers = [
            torch.empty((batch_size, *row_shape), dtype=dtype, pin_memory=pin) for _ in range(n)
        ]
        self._free: queue.Queue[int] = queue.Queue()
        for i in range(n):
            self._free.put(i)
        self._out: queue.Queue[Any] = queue.Queue(maxsize=n)
        self._stop = threading.Event()
        self._loaded = loaded
        self._thread = threading.Thread(target=self._fill, name="batcher", daemon=True)
        self._thread.start()

    def _take(self) -> int | None:
        while not self._stop.is_set():
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def _emit(self, obj: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._out.put(obj, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self) -> None:
        try:
            index = self._take()
            rows, parts = 0, []
            for item, data in self._loaded:
                if index is None or self._stop.is_set():
                    return
                done = 0
                if len(data) == 0:
                    parts.append((item, 0, 0))
                while done < len(data):
                    take = min(len(data) - done, self.batch_size - rows)
                    self._buffers[index][rows : rows + take].copy_(data[done : done + take])
                    parts.append((item, done, take))
                    rows, done = rows + take, done + take
                    if rows == self.batch_size:
                        if not self._emit(Batch(self._buffers[index][:rows], parts, index)):
                            return
                        index, rows, parts = self._take(), 0, []
                        if index is None:
                            return
            if index is not None and parts:
                self._emit(Batch(self._buffers[index][:rows], parts, index))
            elif index is not None:
                self._free.put(index)
            self._emit(_STOP)
        except BaseException as exc:  # noqa: BLE001 (raised in the consumer's thread)
            self._emit(exc)

    def release(self, batch: Batch[Item]) -> None:
        """Hand a batch's buffer back once the device no longer reads it."""
        if batch.buffer >= 0:
            self._free.put(batch.buffer)
            batch.buffer = -1

    def __iter__(self) -> Iterator[Batch[Item]]:
        try:
            while True:
                obj = self._out.get()
                if obj is _STOP:
                    return
                if isinstance(obj, BaseException):
                    raise obj
                yield obj
        finally:
            self.close()

    def close(self) -> None:
        """Stop filling (an early exit of the consumer) and wait for the thread."""
        self._stop.set()
        self._thread.join()
        close = getattr(self._loaded, "close", None)
        if close is not None:
            try:
                close()
            except Exception:  # noqa: BLE001
                logger.debug("closing the loader failed", exc_info=True)
