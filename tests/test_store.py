import json
import os

import pytest

from botaclip_core.errors import InputDataError, StageError
from botaclip_core.store import SUCCESS, ArtifactStore, fingerprint_file, stage_key


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
        (out / "data.txt").write_text("x")
        return {"file": str(out / "data.txt")}

    first = store.run("tile", "1", {"a": 1}, {}, build)
    assert first.status == "completed" and len(calls) == 1
    manifest = json.loads((first.path / SUCCESS).read_text())
    assert manifest["settings"] == {"a": 1} and manifest["outputs"] == first.outputs
    second = store.run("tile", "1", {"a": 1}, {}, build)
    assert second.status == "cached" and second.key == first.key and len(calls) == 1
    third = store.run("tile", "1", {"a": 2}, {}, build)
    assert third.status == "completed" and third.key != first.key


def test_failed_build_is_never_marked_complete(tmp_path):
    store = ArtifactStore(tmp_path)

    def broken(out):
        (out / "partial").write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        store.run("embed", "1", {}, {}, broken)
    key = stage_key("embed", "1", {}, {})
    assert not store.is_complete("embed", key)
    assert (store.stage_dir("embed", key) / "partial").exists()  # kept for resuming inside
    with pytest.raises(StageError, match="not complete"):
        store.manifest("embed", key)


def test_known_fingerprints_are_reused_until_the_file_changes(tmp_path):
    f = tmp_path / "a.tif"
    f.write_bytes(b"pixels")
    store = ArtifactStore(tmp_path / "work")
    first = fingerprint_file(f)
    store.save_fingerprints({first["path"]: {**first, "blake2b": "recorded"}})
    known = store.load_fingerprints()
    assert fingerprint_file(f, known)["blake2b"] == "recorded"  # same size and mtime: not re-read
    f.write_bytes(b"other pixels")
    assert fingerprint_file(f, known)["blake2b"] not in ("recorded", first["blake2b"])
