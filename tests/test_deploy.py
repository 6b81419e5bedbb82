"""`botaclip deploy`: scheduled pipeline and on-demand deployments, served and run for real."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pytest
import xarray as xr
from light_demo import tiny_demo
from prefect_server import REPO, prefect_server, stop
from pydantic import ValidationError

from botaclip_core.catalog import load_catalog
from botaclip_core.pipeline import plan_region, run_region
from botaclip_core.regenerate import adopt_finetune, finetune_folder
from botaclip_core.store import SUCCESS, ArtifactStore, atomic_write_json
from flows.refit import RefitParams
from flows.regenerate import RegenerateParams

PIPELINE = "botaclip-pipeline/botaclip-demo"
REGENERATE = "botaclip-regenerate-embeddings/botaclip-demo-regenerate-embeddings"
REFIT = "botaclip-refit-downstream/botaclip-demo-refit-downstream"


def statuses(report: dict) -> dict[str, str]:
    return {name: s["status"] for name, s in report["stages"].items()}


def _deployment(server, name):
    from prefect.exceptions import ObjectNotFound

    async def read(client):
        try:
            return await client.read_deployment_by_name(name)
        except ObjectNotFound:
            return None

    return server.api(read)


def _wait(what, check, proc, log: Path, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while not (found := check()):
        if proc.poll() is not None:
            pytest.fail(f"`botaclip deploy` exited {proc.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout} s:\n{log.read_text()}")
        time.sleep(0.5)
    return found


def _run(server, name: str, params: dict) -> object:
    from prefect.deployments import run_deployment

    return server.api(
        lambda c: run_deployment(
            name=name, parameters={"params": params}, timeout=300, poll_interval=1
        )
    )


@pytest.mark.slow  # 85 s: make test-slow
def test_deploy_serves_the_scheduled_pipeline_and_the_on_demand_flows(tmp_path):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    catalog = tiny_demo(tmp_path / "demo")
    base = {"catalog": str(catalog), "region": "demo"}
    reports = tmp_path / "reports"
    with prefect_server(tmp_path / "server") as server:
        log = tmp_path / "deploy.log"
        env = {**server.env, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
        with open(log, "w") as sink:
            proc = subprocess.Popen(
                [sys.executable, "-m", "flows.cli", "deploy", str(catalog)],
                env=env,
                cwd=REPO,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            deployments = {
                name: _wait(name, lambda n=name: _deployment(server, n), proc, log)
                for name in (PIPELINE, REGENERATE, REFIT)
            }
            of_pipeline = DeploymentFilter(id=DeploymentFilterId(any_=[deployments[PIPELINE].id]))
            scheduled = _wait(
                "scheduled run",
                lambda: server.api(lambda c: c.read_flow_runs(deployment_filter=of_pipeline)),
                proc,
                log,
            )
            # the pipeline from its deployment: the whole tiny demo, computed
            first = _run(server, PIPELINE, {**base, "report": str(reports / "first.json")})
            # a new adapter (another learning rate), trained beside the catalog's
            tuned = run_region(
                load_catalog(catalog, {"finetune": {"lr": 3e-4}}), "demo", stages=["finetune"]
            )
            new_key = tuned["stages"]["finetune"]["key"]
            regen = _run(
                server,
                REGENERATE,
                {**base, "finetune_key": new_key, "report": str(reports / "regen.json")},
            )
            by_file = _run(
                server,
                REGENERATE,
                {
                    **base,
                    "checkpoint": str(Path(tuned["stages"]["finetune"]["output"]) / "model.pt"),
                    "report": str(reports / "file.json"),
                },
            )
            refit = _run(
                server,
                REFIT,
                {**base, "downstream": {"folds": 2}, "report": str(reports / "refit.json")},
            )
            from prefect.exceptions import PrefectHTTPStatusError

            with pytest.raises(PrefectHTTPStatusError, match="'downstrem' was unexpected"):
                _run(server, REFIT, {**base, "downstrem": {"folds": 2}})
            bad = _run(
                server, REFIT, {**base, "downstream": {"folds": 1}}
            )  # the flow checks values
        finally:
            stop(proc)
        # prefect.yaml: the same flows as work-pool deployments
        prefect = [sys.executable, "-m", "prefect", "--no-prompt"]
        for args in (["work-pool", "create", "botaclip", "--type", "process"], ["deploy", "--all"]):
            done = subprocess.run(
                [*prefect, *args], env=server.env, cwd=REPO, capture_output=True, text=True
            )
            assert done.returncode == 0, done.stdout + done.stderr
        pooled = {name: _deployment(server, name) for name in (PIPELINE, REGENERATE, REFIT)}
    output = log.read_text()
    assert {d.work_pool_name for d in pooled.values()} == {"botaclip"}
    assert [s.schedule.cron for s in pooled[PIPELINE].schedules] == ["0 3 1 * *"]
    assert {d.entrypoint for d in pooled.values()} == {
        "flows/pipeline.py:pipeline_flow",
        "flows/regenerate.py:regenerate_flow",
        "flows/refit.py:refit_flow",
    }

    pipeline = deployments[PIPELINE]
    assert [(s.schedule.cron, s.schedule.timezone) for s in pipeline.schedules] == [
        ("0 3 1 * *", "Europe/Paris")
    ]
    assert pipeline.parameters == {"params": base}
    assert {"region:demo", "botaclip"} <= set(pipeline.tags)
    assert not deployments[REGENERATE].schedules and not deployments[REFIT].schedules
    upcoming = [r for r in scheduled if r.state.is_scheduled()]
    assert upcoming, [r.state for r in scheduled]
    for r in upcoming:
        local = r.expected_start_time.astimezone(ZoneInfo("Europe/Paris"))
        assert (local.day, local.hour, local.minute) == (1, 3, 0), local
    assert "0 3 1 * * (Europe/Paris)" in "".join(output.split("\n"))

    for run in (first, regen, by_file, refit):
        assert run.state.is_completed(), (run.name, run.state, output[-3000:])
    assert first.name == "demo"
    assert regen.name == f"demo-regenerate-embeddings [{new_key}]"
    assert refit.name == "demo-refit-downstream [folds=2]"
    assert bad.state.is_failed() and "folds" in (bad.state.message or ""), bad.state

    first_r, regen_r, file_r, refit_r = (
        json.loads((reports / f"{n}.json").read_text()) for n in ("first", "regen", "file", "refit")
    )
    assert set(statuses(first_r).values()) == {"completed"}
    # a new adapter: no DOFA features computed (the chips' nor the map's); only embed runs
    assert statuses(regen_r) == {
        "tile": "cached",
        "finetune": "cached",
        "embed-dofa": "cached",
        "embed": "completed",
    }
    assert regen_r["stages"]["finetune"]["key"] == new_key
    assert regen_r["stages"]["embed-dofa"]["key"] == first_r["stages"]["embed-dofa"]["key"]
    expected = plan_region(load_catalog(catalog, {"finetune": {"lr": 3e-4}}), "demo", ["embed"])
    assert (
        regen_r["stages"]["embed"]["key"] == expected.stages["embed"].key
    )  # as if the catalog said so
    assert regen_r["embeddings"]["dofa"] == first_r["embeddings"]["dofa"]
    old, new = (
        xr.open_zarr(r["embeddings"]["botaclip"])["embedding"].values for r in (first_r, regen_r)
    )
    assert old.shape == new.shape and not np.allclose(old, new, equal_nan=True)
    # the same model named by its checkpoint file: the same maps, cached
    assert file_r["stages"]["embed"] == {
        **regen_r["stages"]["embed"],
        "status": "cached",
        "seconds": 0.0,
    }
    # refit: only downstream reruns, with the overridden settings
    assert statuses(refit_r) == {
        **dict.fromkeys(first_r["stages"], "cached"),
        "downstream": "completed",
    }
    manifest = json.loads((Path(refit_r["stages"]["downstream"]["output"]) / SUCCESS).read_text())
    assert manifest["settings"]["downstream"]["folds"] == 2


def test_on_demand_parameters_are_validated(tmp_path):
    catalog = tmp_path / "c.yaml"
    catalog.write_text("version: 1\n")
    base = {"catalog": str(catalog), "region": "r"}
    assert RegenerateParams(**base).catalog == str(catalog.resolve())
    with pytest.raises(ValidationError, match="extra"):
        RegenerateParams(**base, checkpont="x")
    with pytest.raises(ValidationError, match=r"catalog .*missing.yaml' does not exist"):
        RegenerateParams(catalog=str(tmp_path / "missing.yaml"), region="r")
    with pytest.raises(ValidationError, match="checkpoint .* does not exist"):
        RegenerateParams(**base, checkpoint=str(tmp_path / "model.pt"))
    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.raises(ValidationError, match="not both"):
        RegenerateParams(**base, checkpoint=str(tmp_path / "model.pt"), finetune_key="abc")
    assert RefitParams(**base, downstream={"folds": 3, "seed": 1}).downstream == {
        "folds": 3,
        "seed": 1,
    }
    with pytest.raises(ValidationError, match=r"fold: Extra inputs.*allowed keys: folds"):
        RefitParams(**base, downstream={"fold": 3})
    with pytest.raises(ValidationError, match="folds: Input should be greater than or equal to 2"):
        RefitParams(**base, downstream={"folds": 1})


def test_a_finetune_output_from_another_workdir_is_copied_in_with_its_paths(tmp_path):
    elsewhere = ArtifactStore(tmp_path / "other")
    folder = elsewhere.stage_dir("finetune", "k1")
    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(b"weights")
    outputs = {"mode": "adapter", "model": str(folder / "model.pt"), "best_val_loss": 1.5}
    atomic_write_json(
        folder / SUCCESS,
        {
            "stage": "finetune",
            "key": "k1",
            "stage_version": "2",
            "settings": {},
            "inputs": {},
            "outputs": outputs,
        },
    )
    here = ArtifactStore(tmp_path / "here")
    found = finetune_folder(here, checkpoint=folder / "model.pt")
    assert found == folder
    manifest = adopt_finetune(here, found)
    home = here.stage_dir("finetune", "k1")
    assert here.is_complete("finetune", "k1")
    assert manifest["outputs"] == {**outputs, "model": str(home / "model.pt")}
    assert (home / "model.pt").read_bytes() == b"weights" and manifest["adopted_from"] == str(
        folder
    )
    assert finetune_folder(here, finetune_key="k1") == home
    from botaclip_core.errors import CatalogError

    with pytest.raises(CatalogError, match=r"completed keys in .*: \['k1'\]"):
        finetune_folder(here, finetune_key="nope")
    with pytest.raises(CatalogError, match="not a file or folder of a completed finetune output"):
        finetune_folder(here, checkpoint=tmp_path)
