"""The feeding pipeline: order, bounded read-ahead, full batches, errors where they belong."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from botaclip_core.feeding import Batcher, Writer, prefetch


def test_prefetch_keeps_order_and_reads_ahead_at_most_depth():
    started: list[int] = []
    lock = threading.Lock()

    def load(i: int) -> int:
        with lock:
            started.append(i)
        time.sleep(0.01 * (i % 3))  # out-of-order completion
        return i * i

    seen = []
    for i, value in prefetch(range(20), load, workers=3, depth=4):
        with lock:
            ahead = max(started) - i
        assert ahead <= 4  # never more than depth items beyond the one being consumed
        seen.append((i, value))
    assert seen == [(i, i * i) for i in range(20)]


def test_prefetch_raises_at_the_failing_item_and_stops_early():
    calls: list[int] = []

    def load(i: int) -> int:
        calls.append(i)
        if i == 3:
            raise ValueError("bad block 3")
        return i

    got = []
    with pytest.raises(ValueError, match="bad block 3"):
        for i, _ in prefetch(range(1000), load, workers=2, depth=2):
            got.append(i)
    assert got == [0, 1, 2]
    assert max(calls) < 10  # the rest of the items were never loaded


def _items(sizes: list[int]):
    start = 0
    for k, n in enumerate(sizes):
        yield k, torch.arange(start, start + n, dtype=torch.float32).view(n, 1)
        start += n


def test_batcher_packs_full_batches_across_items_and_accounts_for_every_row():
    sizes = [3, 0, 5, 1, 7, 0, 2]
    batcher = Batcher(_items(sizes), batch_size=4, row_shape=(1,), dtype=torch.float32, buffers=2)
    rows, parts = [], []
    for batch in batcher:
        rows.append(batch.data[:, 0].clone())
        parts.extend(batch.parts)
        assert sum(n for _, _, n in batch.parts) == len(batch.data)
        batcher.release(batch)
    lengths = [len(r) for r in rows]
    assert lengths[:-1] == [4] * (len(lengths) - 1) and 0 < lengths[-1] <= 4
    assert torch.equal(torch.cat(rows), torch.arange(sum(sizes), dtype=torch.float32))
    per_item = {k: 0 for k in range(len(sizes))}
    for k, first, n in parts:
        assert first == per_item[k]  # an item's rows arrive in order, none twice
        per_item[k] += n
    assert per_item == dict(enumerate(sizes))  # items of no rows are still announced


def test_batcher_waits_for_released_buffers_and_stops_when_the_consumer_leaves():
    batcher = Batcher(
        _items([4] * 50), batch_size=4, row_shape=(1,), dtype=torch.float32, buffers=2
    )
    it = iter(batcher)
    first = next(it)
    values = first.data.clone()
    time.sleep(0.1)  # the batcher fills the second buffer, then must wait for a release
    assert torch.equal(first.data, values)  # an unreleased buffer is never overwritten
    batcher.release(first)
    next(it)
    it.close()  # leaving early stops the thread
    assert not batcher._thread.is_alive()


def test_writer_writes_everything_and_reports_the_first_error():
    written: list[int] = []
    with Writer(written.append, workers=2, depth=2) as writer:
        for i in range(30):
            writer.put(i)
    assert sorted(written) == list(range(30))

    def fail(i: int) -> None:
        if i == 5:
            raise OSError("disk full at 5")

    with pytest.raises(OSError, match="disk full at 5"):
        with Writer(fail, workers=1, depth=2) as writer:
            for i in range(10):
                writer.put(i)


def test_pixel_batches_stream_equals_batch_by_batch_calls():
    import numpy as np

    from botaclip_core.training.pixels import PixelBatches, draw_epoch_augmentations

    rng = np.random.default_rng(0)
    chips = rng.integers(0, 256, size=(10, 4, 40, 40), dtype=np.uint8)
    pixels = PixelBatches(
        chips, margin=4, mean=[120.0] * 4, std=[60.0] * 4, device=torch.device("cpu")
    )
    augs = draw_epoch_augmentations(rng, 10, 4)
    batches = [np.array([3, 1, 7]), np.array([0, 9, 2]), np.array([5, 4, 8])]
    for plain in (None, augs):
        streamed = list(pixels.stream(batches, plain))
        assert len(streamed) == 3
        for rows, got in zip(batches, streamed, strict=True):
            assert got.shape == (3, 4, 32, 32)
            assert torch.equal(got, pixels(rows, plain))
