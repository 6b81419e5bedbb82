"""The Prefect UI in a real browser: the tiny demo's run, its task runs and its artifacts.

Headless Chromium (Debian's ``chromium``) driven by Playwright; `make test-ui` installs both
and runs this module. Screenshots go to ``build/ui-screenshots/`` (BOTACLIP_UI_SCREENSHOTS).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from light_demo import tiny_demo
from prefect_server import REPO, prefect_server

pytestmark = pytest.mark.ui

ALL_STAGES = ["tile", "rasterize", "features", "finetune", "embed-dofa", "embed", "downstream"]
SHOTS = Path(os.environ.get("BOTACLIP_UI_SCREENSHOTS") or REPO / "build" / "ui-screenshots")


def _browser_or_skip() -> str:
    chromium = os.environ.get("BOTACLIP_CHROMIUM") or shutil.which("chromium")
    try:
        import playwright  # noqa: F401
    except ImportError:
        chromium = None
    if not chromium:
        msg = "needs Chromium and Playwright: run `make test-ui` (installs both)"
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    return chromium


def test_the_ui_shows_the_run_its_task_runs_and_the_metrics(tmp_path):
    from playwright.sync_api import expect, sync_playwright
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    chromium = _browser_or_skip()
    SHOTS.mkdir(parents=True, exist_ok=True)
    for old in SHOTS.glob("*.png"):
        old.unlink()
    with prefect_server(tmp_path / "server") as server:
        server.run("run", tiny_demo(tmp_path / "demo"), "--region", "demo")
        of_pipeline = FlowFilter(name=FlowFilterName(any_=["botaclip-pipeline"]))
        (run,) = server.api(lambda c: c.read_flow_runs(flow_filter=of_pipeline))
        artifacts = {a.key: a.id for a in server.api(lambda c: c.read_artifacts()) if a.key}
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.set_default_timeout(60_000)

            page.goto(f"{server.ui_url}/runs/flow-run/{run.id}")
            expect(page.get_by_text("botaclip-pipeline").first).to_be_visible()
            expect(page.get_by_text("demo", exact=True).first).to_be_visible()  # the run's name
            expect(page.get_by_text("Completed").first).to_be_visible()
            for tag in ("region:demo", "model:dofa-tiny"):
                expect(page.get_by_text(tag, exact=True).first).to_be_visible()
            page.wait_for_timeout(1500)  # the graph's canvas draws after the page
            page.screenshot(path=SHOTS / "1-flow-run.png", full_page=True)

            page.locator(".p-tab", has_text="Task Runs").click()
            for stage in ALL_STAGES:
                expect(page.get_by_text(stage, exact=True).first).to_be_visible()
            page.screenshot(path=SHOTS / "2-task-runs.png", full_page=True)

            page.locator(".p-tab", has_text="Artifacts").click()
            expect(page.get_by_text("botaclip-metrics-demo").first).to_be_visible()
            expect(page.get_by_text("botaclip-report-demo").first).to_be_visible()
            page.screenshot(path=SHOTS / "3-artifacts.png", full_page=True)

            page.goto(f"{server.ui_url}/artifacts/artifact/{artifacts['botaclip-metrics-demo']}")
            table = page.locator("table").first
            for value in ("botaclip", "botasp", "dofa", "auc", "spearman"):
                expect(table.get_by_text(value, exact=True).first).to_be_visible()
            page.screenshot(path=SHOTS / "4-metrics.png", full_page=True)

            page.goto(f"{server.ui_url}/artifacts/artifact/{artifacts['botaclip-report-demo']}")
            expect(page.get_by_role("heading", name="Stages")).to_be_visible()
            expect(page.get_by_text("embed-dofa", exact=True).first).to_be_visible()
            page.screenshot(path=SHOTS / "5-report.png", full_page=True)
            browser.close()
    assert sorted(p.name for p in SHOTS.glob("*.png")) == [
        "1-flow-run.png",
        "2-task-runs.png",
        "3-artifacts.png",
        "4-metrics.png",
        "5-report.png",
    ]
