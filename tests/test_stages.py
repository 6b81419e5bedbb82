"""Stages as modules: the registry, keys that cover what builds read, a toy stage, the DAG page."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import toy_stage
import xarray as xr
from light_demo import tiny_demo

from botaclip_core.catalog import load_catalog
from botaclip_core.demo import write_demo_region
from botaclip_core.pipeline import plan_region, run_region
from botaclip_core.stages import registry

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def catalog(tmp_path):
    return write_demo_region(tmp_path, size="tiny")


def keys(catalog, overrides=None, stages=None):
    plan = plan_region(load_catalog(catalog, overrides), "demo", stages)
    return {name: p.key for name, p in plan.stages.items()}


def test_registry_refuses_duplicates_and_unknown_needs():
    with pytest.raises(ValueError, match="'tile' is already registered"):
        registry.register(registry.get("tile"))
    orphan = toy_stage.STAGE.__class__(**{**toy_stage.STAGE.__dict__, "needs": ("tiles",)})
    with pytest.raises(ValueError, match=r"needs \['tiles'\], which are not registered"):
        registry.register(orphan)
    with pytest.raises(ValueError, match="is needed by"):
        registry.unregister("tile")


def test_runtime_settings_change_no_key(catalog):
    base = keys(catalog)
    runtime = {
        "dask": {"address": "tcp://nowhere:8786", "n_workers": 3},
        "embed": {"batch_size": 64},
        "tiling": {"workers": 1},
        "finetune": {"device": "cpu"},
    }
    assert keys(catalog, runtime) == base


def test_storage_settings_change_the_tile_key_only(catalog):
    base = keys(catalog)
    changed = keys(catalog, {"tiling": {"zstd_level": 5, "shard_blocks": 2}})
    assert [s for s in base if base[s] != changed[s]] == ["tile"]
    tile_size = keys(catalog, {"tiling": {"tile_size": 112}})
    assert tile_size["tile"] != base["tile"] and tile_size["embed-dofa"] != base["embed-dofa"]


def test_keys_follow_what_each_build_reads(catalog):
    base = keys(catalog)

    def changed(overrides):
        new = keys(catalog, overrides)
        return sorted(s for s in base if base[s] != new[s])

    # training settings: the chip features (the costly DOFA passes) are reused
    assert changed({"finetune": {"lr": 1e-3}}) == ["downstream", "embed", "finetune"]
    assert changed({"finetune": {"max_shift": 4}}) == [
        "downstream",
        "embed",
        "features",
        "finetune",
    ]
    assert changed({"downstream": {"model_params": {"C": 1.0}}}) == ["downstream"]
    assert changed({"downstream": {"jobs": 1}}) == []  # threads: how, not what
    assert changed({"embed": {"block_tiles": 2}}) == ["downstream", "embed", "embed-dofa"]
    everything_dofa = ["downstream", "embed", "embed-dofa", "features", "finetune"]
    assert changed({"model": {"dofa": {"size": "small"}}}) == everything_dofa


def test_tasks_build_from_the_plan_not_the_catalog_file(catalog):
    from tasks.stages import plan_task, stage_task

    plan = plan_task.fn(str(catalog), "demo", ["rasterize"], None)
    catalog.unlink()  # what a task builds comes from the plan alone
    record = stage_task.fn("rasterize", plan)
    manifest = json.loads((Path(record["path"]) / "_SUCCESS.json").read_text())
    assert manifest["settings"] == plan["stages"]["rasterize"]["settings"]
    assert manifest["outputs"]["releves"]["n_sites"] == record["outputs"]["releves"]["n_sites"] > 0


def test_toy_stage_runs_in_process_and_under_prefect(tmp_path, catalog, prefect_harness):
    from flows.pipeline import PipelineParams, pipeline_flow

    with registry.registered(toy_stage.STAGE):
        assert registry.names()[-1] == "band-means"
        report = run_region(load_catalog(catalog), "demo", stages=["band-means"])
        assert list(report["stages"]) == ["tile", "band-means"]
        image = xr.open_zarr(Path(report["stages"]["tile"]["output"]) / "image.zarr")
        valid = image["valid"].values > 0
        expected = {
            b: float(image["image"].sel(band=b).values[valid].mean())
            for b in ["red", "green", "blue", "nir"]
        }
        assert report["band_means"] == pytest.approx(expected)
        assert 0 < min(expected.values()) < max(expected.values()) < 255

        other = write_demo_region(tmp_path / "flow", size="tiny")
        flow_report = pipeline_flow(
            PipelineParams(catalog=str(other), region="demo", stages=["band-means"])
        )
        assert flow_report["stages"]["band-means"]["status"] == "completed"
        assert flow_report["band_means"] == report["band_means"]
    assert "band-means" not in registry.names()


def test_architecture_page_shows_the_registry_dag():
    text = (ROOT / "docs" / "architecture.md").read_text()
    graph = re.search(r"```mermaid\ngraph LR\n(.*?)```", text, re.S)
    assert graph, "docs/architecture.md has no mermaid graph"
    edges = re.findall(r"^\s*([\w-]+) --> ([\w-]+)\s*$", graph.group(1), re.M)
    assert sorted(edges) == sorted(registry.edges())
    for stage in registry.stages():
        assert f"`stages/{stage.name.replace('-', '_')}.py`" in text, stage.name
    assert "(docs/architecture.md)" in (ROOT / "README.md").read_text()


def test_flow_graph_is_the_dag_and_branches_overlap(tmp_path, prefect_harness):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.pipeline import PipelineParams, pipeline_flow

    catalog = tiny_demo(tmp_path / "dag")
    report = pipeline_flow(PipelineParams(catalog=str(catalog), region="demo"))
    assert {s["status"] for s in report["stages"].values()} == {"completed"}

    async def task_runs():
        async with get_client() as client:
            flows = await client.read_flow_runs()
            run = max(flows, key=lambda f: f.start_time or f.created)
            return await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
            )

    runs = {r.name: r for r in asyncio.run(task_runs()) if not r.name.startswith("plan")}
    assert set(runs) == set(registry.names())
    by_id = {r.id: name for name, r in runs.items()}
    for name, r in runs.items():
        upstream = {by_id[i.id] for i in r.task_inputs.get("wait_for", [])}
        assert upstream == set(registry.get(name).needs), name
    tile = runs["tile"]
    branch_end = runs["finetune"].end_time
    # tile did not wait for the relevé branch: it started before the branch ended (how the
    # two interleave beyond that is up to the scheduler on a busy machine)
    assert tile.start_time < branch_end
    # concurrency changed nothing: the same metrics as the in-process, one-at-a-time run
    sequential = run_region(load_catalog(tiny_demo(tmp_path / "seq")), "demo")
    assert report["downstream"] == sequential["downstream"]
    for name in ("dofa", "botaclip", "botasp"):
        a = xr.open_zarr(report["embeddings"][name])["embedding"].values
        b = xr.open_zarr(sequential["embeddings"][name])["embedding"].values
        np.testing.assert_array_equal(a, b)


def test_tile_and_rasterize_keep_their_keys_from_before_the_stage_modules(catalog):
    """Their keys covered the right things, so existing workdirs keep those outputs.

    Those workdirs' catalogs had no test sets (a test set is one more dataset to rasterize).
    """
    from botaclip_core.store import fingerprint_file, stage_key

    cat = load_catalog(catalog, {"datasets": {"butterflies": {"test": None}}})
    plan = plan_region(cat, "demo")
    region = cat.region("demo")
    grid = plan.stages["tile"].settings["grid"]
    # the formulas of the code before issue 8 (botaclip_core/pipeline.py, Pipeline.plan)
    old_tile = stage_key(
        "tile",
        "2",
        {
            "grid": grid,
            "orthophotos": region.orthophotos.model_dump(
                mode="json", exclude={"paths", "mean", "std"}
            ),
            "tile_size": cat.tiling.tile_size,
            "shard_blocks": cat.tiling.shard_blocks,
            "zstd_level": cat.tiling.zstd_level,
        },
        {"orthophotos": [fingerprint_file(p) for p in cat.orthophoto_files("demo")]},
    )
    names = [region.releves, *region.targets]
    old_rasterize = stage_key(
        "rasterize",
        "1",
        {"grid": grid, "datasets": names},
        {
            n: {
                "spec": cat.datasets[n].model_dump(mode="json", exclude={"test"}),
                "file": fingerprint_file(cat.resolve(cat.datasets[n].path)),
            }
            for n in names
        },
    )
    assert plan.stages["tile"].key == old_tile
    assert plan.stages["rasterize"].key == old_rasterize
