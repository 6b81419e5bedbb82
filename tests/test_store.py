import builtins
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from botaclip_core import store as store_module
from botaclip_core.errors import InputDataError, StageError
from botaclip_core.store import SUCCESS, ArtifactStore, fingerprint_file, stage_key


def blake2b(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@pytest.fixture()
def opened(monkeypatch):
    """Paths opened for reading through ``open`` / ``io.open`` / ``Path.open`` in the test."""
    paths: list[Path] = []
    real_open = builtins.open

    def counting_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and not set(mode) & set("wax+"):
            paths.append(Path(file).resolve())
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)
    return paths


def test_stage_key_is_canonical_and_sensitive():
    a = stage_key("tile", "1", {"b": 2, "a": 1}, {"x": [1, 2]})
    assert a == stage_key("tile", "1", {"a": 1, "b": 2}, {"x": [1, 2]})
    assert a != stage_key("tile", "2", {"a": 1, "b": 2}, {"x": [1, 2]})
    assert a != stage_key("tile", "1", {"a": 1, "b": 3}, {"x": [1, 2]})
    assert a != stage_key("embed", "1", {"a": 1, "b": 2}, {"x": [1, 2]})
    assert len(a) == 16


def test_fingerprint_tracks_content_and_mtime(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("hello")
    fp1 = fingerprint_file(f)
    assert fp1["size"] == 5 and fp1["path"] == str(f.resolve())
    f.write_text("hellp")
    os.utime(f, ns=(fp1["mtime_ns"], fp1["mtime_ns"]))
    fp2 = fingerprint_file(f)
    assert fp2["blake2b"] != fp1["blake2b"]
    with pytest.raises(InputDataError, match="no such file"):
        fingerprint_file(tmp_path / "missing.tif")


def test_run_caches_and_writes_manifest_last(tmp_path):
    store = ArtifactStore(tmp_path)
    calls = []

    def build(out):
        calls.append(out)
        # while the build runs, the stage is not complete: the manifest comes after it
        assert not (out / SUCCESS).exists() and not store.is_complete("tile", out.name)
        (out / "data.txt").write_text("x")
        return {"file": str(out / "data.txt")}

    first = store.run("tile", "1", {"a": 1}, {}, build)
    assert first.status == "completed" and len(calls) == 1
    assert first.key == stage_key("tile", "1", {"a": 1}, {}) == calls[0].name
    manifest = json.loads((first.path / SUCCESS).read_text())
    assert manifest["settings"] == {"a": 1} and manifest["outputs"] == first.outputs
    assert (first.path / SUCCESS).stat().st_mtime_ns >= (first.path / "data.txt").stat().st_mtime_ns
    second = store.run("tile", "1", {"a": 1}, {}, build)
    assert second.status == "cached" and second.key == first.key and len(calls) == 1
    assert second.outputs == first.outputs
    third = store.run("tile", "1", {"a": 2}, {}, build)
    assert third.status == "completed" and third.key != first.key and len(calls) == 2


def test_manifest_is_atomic_when_the_rename_fails(tmp_path, monkeypatch):
    store = ArtifactStore(tmp_path)

    def build(out):
        (out / "data.txt").write_text("x")
        return {"file": str(out / "data.txt")}

    def failing_replace(src, dst):
        raise OSError(f"disk full while renaming {src} to {dst}")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        store.run("tile", "1", {"a": 1}, {}, build)
    monkeypatch.undo()
    key = stage_key("tile", "1", {"a": 1}, {})
    out = store.stage_dir("tile", key)
    assert (out / "data.txt").read_text() == "x"  # the build ran
    assert not (out / SUCCESS).exists()  # but no manifest, not even a partial one
    assert not store.is_complete("tile", key)
    with pytest.raises(StageError, match="not complete"):
        store.manifest("tile", key)
    # the next run builds again and completes
    again = store.run("tile", "1", {"a": 1}, {}, build)
    assert again.status == "completed" and store.is_complete("tile", key)


def test_failed_build_is_never_marked_complete(tmp_path):
    store = ArtifactStore(tmp_path)

    def broken(out):
        (out / "partial").write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        store.run("embed", "1", {}, {}, broken)
    key = stage_key("embed", "1", {}, {})
    assert not store.is_complete("embed", key)
    assert (store.stage_dir("embed", key) / "partial").exists()  # kept for resuming inside
    with pytest.raises(StageError, match="not complete"):
        store.manifest("embed", key)


def test_known_fingerprints_are_reused_until_the_file_changes(tmp_path, opened):
    f = tmp_path / "a.tif"
    f.write_bytes(b"pixels")
    first = fingerprint_file(f)
    assert first["blake2b"] == blake2b(b"pixels")
    assert opened == [f.resolve()]
    # run 1 records the fingerprint; run 2 (a new store on the same workdir) reads it back
    ArtifactStore(tmp_path / "work").save_fingerprints({first["path"]: {**first, "blake2b": "r"}})
    known = ArtifactStore(tmp_path / "work").load_fingerprints()
    opened.clear()
    assert fingerprint_file(f, known)["blake2b"] == "r"  # same size and mtime: not re-read
    assert f.resolve() not in opened
    f.write_bytes(b"other pixels")
    opened.clear()
    changed = fingerprint_file(f, known)
    assert changed["blake2b"] == blake2b(b"other pixels") and changed["size"] == 12
    assert opened == [f.resolve()]


def test_same_size_new_mtime_is_hashed_again(tmp_path, opened):
    f = tmp_path / "a.tif"
    f.write_bytes(b"pixels")
    first = fingerprint_file(f)
    known = {first["path"]: first}
    later = first["mtime_ns"] + 2_000_000_000
    f.write_bytes(b"pixelz")  # same size, other content
    os.utime(f, ns=(later, later))
    opened.clear()
    second = fingerprint_file(f, known)
    assert opened == [f.resolve()]
    assert second["size"] == first["size"] and second["mtime_ns"] == later
    assert second["blake2b"] == blake2b(b"pixelz") != first["blake2b"]
    # touched but unchanged: read again, same content hash
    f.write_bytes(b"pixels")
    os.utime(f, ns=(later + 10**9, later + 10**9))
    opened.clear()
    third = fingerprint_file(f, {second["path"]: second})
    assert opened == [f.resolve()] and third["blake2b"] == first["blake2b"]


def test_large_files_are_hashed_on_head_middle_and_tail(tmp_path, monkeypatch):
    # the real limit is 256 MiB with 8 MiB samples; the same layout at 1 KiB with 64 B samples
    monkeypatch.setattr(store_module, "FULL_HASH_LIMIT", 1024)
    monkeypatch.setattr(store_module, "SAMPLE_BYTES", 64)
    data = np.random.default_rng(0).integers(0, 256, size=4096, dtype=np.uint8).tobytes()
    f = tmp_path / "big.tif"
    f.write_bytes(data)
    sampled = fingerprint_file(f)["blake2b"]
    assert sampled == blake2b(data[:64] + data[2048:2112] + data[-64:])

    def with_byte_changed(at: int) -> str:
        changed = bytearray(data)
        changed[at] ^= 0xFF
        f.write_bytes(bytes(changed))
        return fingerprint_file(f)["blake2b"]

    for inside in (0, 63, 2048, 2111, 4032, 4095):  # first and last byte of each sample
        assert with_byte_changed(inside) != sampled, inside
    for outside in (64, 1000, 2047, 2112, 4031):
        assert with_byte_changed(outside) == sampled, outside
    # up to the limit, every byte counts
    small = tmp_path / "limit.tif"
    small.write_bytes(data[:1024])
    assert fingerprint_file(small)["blake2b"] == blake2b(data[:1024])
