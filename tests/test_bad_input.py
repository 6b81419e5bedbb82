"""Every kind of bad input, tried as a new user would: one clear error, no traceback, nothing done.

Each case starts from the tiny demo's catalog and data, breaks one thing, and runs
``botaclip run`` (in this process, with ``--no-prefect`` and under Prefect). The error must name
the file or field and say what to do, the exit code must be 2, no traceback may be printed, and
the stage that read the bad input (and every stage after it) must not be marked complete.
"""

from __future__ import annotations

import builtins
import logging
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import torch
import yaml
from kill_harness import REPO
from shapely.geometry import Point, Polygon
from typer.testing import CliRunner

from botaclip_core.demo import write_demo_region
from botaclip_core.models.dofa import DOFA, DOFA_SIZES
from botaclip_core.stages import registry
from flows.cli import app

ORTHO = "demo-data/ortho"
RELEVES = "demo-data/releves.gpkg"
BUTTERFLIES = "demo-data/butterflies.csv"


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """The tiny demo's catalog and data, never run: every case copies it."""
    root = tmp_path_factory.mktemp("bad-input-template")
    write_demo_region(root, size="tiny")
    return root


def _catalog(root: Path) -> dict:
    return yaml.safe_load((root / "data_catalog.yaml").read_text())


def _write_catalog(root: Path, data: dict) -> None:
    (root / "data_catalog.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def _edit(root: Path, edit: Callable[[dict], None]) -> None:
    data = _catalog(root)
    edit(data)
    _write_catalog(root, data)


def _rewrite_sheet(root: Path, name: str, **changes) -> Path:
    path = root / ORTHO / name
    with rasterio.open(path) as ds:
        profile, data = ds.profile, ds.read()
    dtype = changes.pop("dtype", None)
    if dtype:
        data = data.astype(dtype) * 257
        profile.update(dtype=dtype)
    profile.update(changes)
    path.unlink()
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
    return path


def _releves(root: Path) -> gpd.GeoDataFrame:
    return gpd.read_file(root / RELEVES, layer="releves")


def _save_releves(root: Path, frame: gpd.GeoDataFrame) -> None:
    (root / RELEVES).unlink()
    frame.to_file(root / RELEVES, layer="releves", driver="GPKG")


def _butterflies(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / BUTTERFLIES)


# the cases -----------------------------------------------------------------------------------


def truncated_raster(root: Path) -> None:
    path = root / ORTHO / "ortho_r1_c1.tif"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def raster_without_crs(root: Path) -> None:
    _rewrite_sheet(root, "ortho_r0_c1.tif", crs=None)


def band_count_mismatch(root: Path) -> None:
    def edit(c):
        ortho = c["regions"]["demo"]["orthophotos"]
        ortho["bands"], ortho["wavelengths_um"] = ["red", "green", "blue"], [0.665, 0.56, 0.49]

    _edit(root, edit)


def wavelengths_in_nm(root: Path) -> None:
    _edit(
        root,
        lambda c: c["regions"]["demo"]["orthophotos"].update(wavelengths_um=[665, 560, 490, 842]),
    )


def orthophotos_outside_region(root: Path) -> None:
    _edit(root, lambda c: c["regions"]["demo"].update(bounds=[0.0, 6000000.0, 224.0, 6000224.0]))


def mixed_dtypes(root: Path) -> None:
    _rewrite_sheet(root, "ortho_r1_c0.tif", dtype="uint16")


def releves_outside_orthophotos(root: Path) -> None:
    frame = _releves(root)
    frame["geometry"] = frame.geometry.translate(50_000, 50_000)
    _save_releves(root, frame)


def csv_without_coordinate_columns(root: Path) -> None:
    _butterflies(root).rename(columns={"lon": "longitude"}).to_csv(root / BUTTERFLIES, index=False)


def lonlat_swapped(root: Path) -> None:
    frame = _butterflies(root)
    frame[["lon", "lat"]] = frame[["lat", "lon"]].to_numpy()
    frame.to_csv(root / BUTTERFLIES, index=False)


def empty_geometries(root: Path) -> None:
    frame = _releves(root)
    frame.loc[frame.index[:7], "geometry"] = Point()
    _save_releves(root, frame)


def invalid_geometries(root: Path) -> None:
    frame = _releves(root)
    x, y = frame.geometry.iloc[0].x, frame.geometry.iloc[0].y
    bowtie = Polygon([(x, y), (x + 4, y + 4), (x + 4, y), (x, y + 4)])  # self-intersecting
    frame["geometry"] = frame.geometry.astype(object)
    frame.loc[frame.index[:3], "geometry"] = bowtie
    _save_releves(root, gpd.GeoDataFrame(frame, geometry="geometry", crs=frame.crs))


def empty_table(root: Path) -> None:
    _butterflies(root).iloc[:0].to_csv(root / BUTTERFLIES, index=False)


def conflicting_duplicate_plots(root: Path) -> None:
    frame = _releves(root)
    second = frame["plot_id"].unique()[1]
    frame.loc[frame["plot_id"] == second, "plot_id"] = frame["plot_id"].iloc[0]
    _save_releves(root, frame)


def blank_species(root: Path) -> None:
    frame = _butterflies(root)
    frame["species"] = ""
    frame.to_csv(root / BUTTERFLIES, index=False)


def unknown_crs_code(root: Path) -> None:
    _edit(root, lambda c: c["datasets"]["butterflies"].update(crs="EPSG:99999"))


def unparsable_yaml(root: Path) -> None:
    path = root / "data_catalog.yaml"
    path.write_text(path.read_text().replace("regions:\n", "regions:\n  demo: [oops\n", 1))


def unknown_key(root: Path) -> None:
    _edit(root, lambda c: c["finetune"].update(epoch=3))


def wrong_type(root: Path) -> None:
    _edit(root, lambda c: c["finetune"].update(epochs="many"))


def unknown_dataset(root: Path) -> None:
    _edit(root, lambda c: c["regions"]["demo"].update(targets=["plants", "butterfly"]))


def glob_matching_nothing(root: Path) -> None:
    _edit(
        root, lambda c: c["regions"]["demo"]["orthophotos"].update(paths=["demo-data/orto/*.tif"])
    )


def _weights(root: Path) -> Path:
    return root / "weights.pt"


def wrong_size_checkpoint(root: Path) -> list[str]:
    tiny = DOFA_SIZES["tiny"]
    model = DOFA(embed_dim=tiny.embed_dim * 2, depth=tiny.depth, num_heads=tiny.num_heads)
    torch.save(model.state_dict(), _weights(root))
    return ["--weights", str(_weights(root))]


def not_a_checkpoint(root: Path) -> list[str]:
    _weights(root).write_text("these are not weights\n")
    return ["--weights", str(_weights(root))]


class _Payload:
    """Unpickling this would create ``marker``: a pickled object given as weights."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


def pickled_object(root: Path) -> list[str]:
    torch.save({"model": _Payload(root / "PWNED")}, _weights(root))
    return ["--weights", str(_weights(root))]


def workdir_is_a_file(root: Path) -> None:
    (root / "work").write_text("a file, not a folder\n")
    _edit(root, lambda c: c.update(workdir="work"))


def workdir_not_writable(root: Path) -> None:
    if os.geteuid() == 0:  # root writes anywhere chmod allows: use a file system that refuses
        workdir = "/sys/botaclip-workdir"
    else:
        (root / "readonly").mkdir()
        (root / "readonly").chmod(0o555)
        workdir = "readonly/work"
    _edit(root, lambda c: c.update(workdir=workdir))


@dataclass(frozen=True)
class Case:
    make: Callable[[Path], list[str] | None]
    message: str  # a regex the error must match (file or field, bad value, fix)
    fails_in: str | None  # the stage that reads the bad input; None: found while planning


CASES = {
    "truncated raster": Case(
        truncated_raster, r"ortho_r1_c1\.tif.*(truncated|cannot be read|cannot open).*", None
    ),
    "raster without CRS": Case(
        raster_without_crs, r"ortho_r0_c1\.tif: the raster has no CRS.*assign one", None
    ),
    "band count mismatch": Case(
        band_count_mismatch, r"ortho_r0_c0\.tif: has 4 bands but the catalog lists 3", None
    ),
    "wavelengths in nm": Case(wavelengths_in_nm, r"wavelengths_um.*665.*not in µm.*0\.665", None),
    "orthophotos outside the region": Case(
        orthophotos_outside_region, r"none of the 4 orthophotos.*intersects.*region", None
    ),
    "mixed dtypes": Case(
        mixed_dtypes,
        r"different data types \(uint16: ortho_r1_c0\.tif; uint8: .*Convert them to one type",
        None,
    ),
    "relevés outside every orthophoto": Case(
        releves_outside_orthophotos,
        r"releves\.gpkg: none of its 60 sites falls inside the region",
        "rasterize",
    ),
    "CSV without coordinate columns": Case(
        csv_without_coordinate_columns,
        r"butterflies\.csv: column 'lon' \(datasets\.butterflies\.x\) not found.*'longitude'.*Set datasets\.butterflies\.x",
        "rasterize",
    ),
    "lon/lat swapped": Case(
        lonlat_swapped,
        r"butterflies\.csv: none of its \d+ sites.*swap.*datasets\.butterflies\.x.*y",
        "rasterize",
    ),
    "empty geometries": Case(
        empty_geometries,
        r"releves\.gpkg: 7 rows have empty or missing geometries.*R0001.*Fix or drop",
        "rasterize",
    ),
    "invalid geometries": Case(
        invalid_geometries,
        r"releves\.gpkg: 3 rows have invalid geometries.*R0001.*make_valid|Fix",
        "rasterize",
    ),
    "empty table": Case(
        empty_table, r"butterflies\.csv: the table has no rows.*datasets\.butterflies", "rasterize"
    ),
    "conflicting duplicate plot ids": Case(
        conflicting_duplicate_plots,
        r"releves\.gpkg: site id 'R0001' \(datasets\.releves\.site_id = 'plot_id'\) is recorded at 2 different places.*Give each site its own id",
        "rasterize",
    ),
    "species column of blanks": Case(
        blank_species,
        r"butterflies\.csv: column 'species' \(datasets\.butterflies\.species\) is blank",
        "rasterize",
    ),
    "unknown CRS code": Case(
        unknown_crs_code,
        r"datasets\.butterflies\.crs: Value error, 'EPSG:99999' is not a CRS PROJ knows; use .*EPSG:2154",
        None,
    ),
    "YAML that does not parse": Case(
        unparsable_yaml, r"data_catalog\.yaml: not valid YAML.*line \d+", None
    ),
    "unknown key": Case(
        unknown_key, r"finetune\.epoch: unknown key 'epoch'; allowed keys here: .*epochs", None
    ),
    "wrong type": Case(wrong_type, r"finetune\.epochs: .*integer.*'many'", None),
    "unknown dataset": Case(
        unknown_dataset, r"regions\.demo names dataset 'butterfly'.*defined: .*butterflies", None
    ),
    "glob matching nothing": Case(
        glob_matching_nothing, r"orthophotos\.paths: 'demo-data/orto/\*\.tif' matches no file", None
    ),
    "wrong-size DOFA checkpoint": Case(
        wrong_size_checkpoint, r"weights\.pt: tensor '.*' has shape .* expects", "features"
    ),
    "not a checkpoint": Case(
        not_a_checkpoint, r"weights\.pt is not a readable PyTorch checkpoint", "features"
    ),
    "pickled object as weights": Case(
        pickled_object,
        r"weights\.pt is not a readable PyTorch checkpoint.*weights_only=True",
        "features",
    ),
    "workdir is a file": Case(
        workdir_is_a_file, r"workdir .*work is a file, not a folder.*Set 'workdir'", None
    ),
    "workdir not writable": Case(
        workdir_not_writable, r"workdir .* is not writable.*Set 'workdir'", None
    ),
}
# under Prefect in `make test` (all of them in `make test-slow`): one per place errors come from
PREFECT_FAST = {
    "unknown key",
    "raster without CRS",
    "lon/lat swapped",
    "pickled object as weights",
    "workdir is a file",
}


def _after(stage: str) -> set[str]:
    """``stage`` and every stage that needs it, directly or not."""
    found = {stage}
    for name, needing in registry.edges():
        if name in found:
            found.add(needing)
    return found


def _complete(root: Path) -> set[str]:
    return {p.parent.parent.name for p in root.glob("*/*/_SUCCESS.json")}


def _invoke(args: list[str], capfd) -> tuple[int, str, BaseException | None]:
    root_logger = logging.getLogger()
    handlers = list(root_logger.handlers)
    try:
        result = CliRunner().invoke(app, args)
    finally:
        root_logger.handlers[:] = handlers  # `--no-prefect` configures logging on the runner
    captured = capfd.readouterr()
    return result.exit_code, result.output + captured.out + captured.err, result.exception


def _params():
    for name in CASES:
        yield pytest.param(name, "--no-prefect", id=f"{name}-no-prefect")
        marks = () if name in PREFECT_FAST else (pytest.mark.slow,)
        yield pytest.param(name, "--prefect", id=f"{name}-prefect", marks=marks)


@pytest.mark.parametrize(("name", "mode"), list(_params()))
def test_bad_input_gives_one_clear_error(name, mode, template, tmp_path, capfd, request):
    if mode == "--prefect":
        request.getfixturevalue("prefect_harness")
    case = CASES[name]
    root = tmp_path / "case"
    shutil.copytree(template, root)
    extra = case.make(root) or []
    code, output, exc = _invoke(
        ["run", str(root / "data_catalog.yaml"), "--region", "demo", mode, *extra], capfd
    )
    flat = " ".join(output.split())
    assert code == 2, f"exit {code} ({exc!r}):\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    errors = re.findall(r"^error: ", output, flags=re.M)
    assert len(errors) == 1, output[-3000:]
    assert re.search(case.message, flat), f"{case.message!r} not in:\n{flat[-2000:]}"
    done = _complete(root)
    if case.fails_in is None:
        assert not done, done
    else:
        assert not done & _after(case.fails_in), done
    assert not (root / "PWNED").exists(), "unpickling the weights ran code"


# warnings: what a run can go on with -------------------------------------------------------


def _run_ok(args: list[str], capfd) -> str:
    code, output, exc = _invoke(args, capfd)
    assert code == 0, f"exit {code} ({exc!r}):\n{output[-3000:]}"
    return " ".join(output.split())


def _zero_around(root: Path, points: list[tuple[float, float]]) -> None:
    """Set the pixels around ``points`` to nodata (0) in every sheet."""
    for path in sorted((root / ORTHO).glob("*.tif")):
        with rasterio.open(path, "r+") as ds:
            data = ds.read()
            for x, y in points:
                r, c = ds.index(x, y)
                if 0 <= r < ds.height and 0 <= c < ds.width:
                    data[:, max(r - 2, 0) : r + 3, max(c - 2, 0) : c + 3] = 0
            ds.write(data)


def test_plots_on_nodata_are_dropped_with_a_warning(template, tmp_path, capfd, caplog):
    root = tmp_path / "case"
    shutil.copytree(template, root)
    plots = _releves(root).drop_duplicates("plot_id")
    _zero_around(root, [(p.x, p.y) for p in plots.geometry.iloc[:3]])
    flat = _run_ok(
        [
            "run",
            str(root / "data_catalog.yaml"),
            "--region",
            "demo",
            "--no-prefect",
            "--stages",
            "features",
        ],
        capfd,
    )
    assert "57/57 plots" in flat
    dropped = "3 of 60 relevé plots of datasets.releves fall on orthophoto nodata and are dropped"
    assert dropped in caplog.text
    assert np.load(next(root.glob("features/*/plots.npy"))).tolist() == list(range(3, 60))


def test_some_records_outside_the_region_or_without_species_warn(template, tmp_path, capfd, caplog):
    root = tmp_path / "case"
    shutil.copytree(template, root)
    frame = _butterflies(root)
    frame.loc[frame.index[:4], "lon"] += 1.0  # 80 km east
    frame.loc[frame.index[4:6], "species"] = None
    frame.to_csv(root / BUTTERFLIES, index=False)
    flat = _run_ok(
        [
            "run",
            str(root / "data_catalog.yaml"),
            "--region",
            "demo",
            "--no-prefect",
            "--stages",
            "rasterize",
        ],
        capfd,
    )
    assert "completed" in flat
    text = caplog.text
    n_sites = frame["record_id"].nunique() - 2
    assert f"butterflies.csv: 4 of {n_sites} sites lie outside the region and are dropped" in text
    assert f"butterflies.csv: 2 of {len(frame)} rows have no species in column 'species'" in text


# a full disk: reported, then resumed once there is space --------------------------------------


def _limited(limit: int) -> Callable[[], None]:
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_full_disk_is_reported_and_the_run_resumes_after(template, tmp_path):
    root = tmp_path / "case"
    shutil.copytree(template, root)
    cmd = [
        sys.executable,
        "-m",
        "flows.cli",
        "run",
        str(root / "data_catalog.yaml"),
        "--region",
        "demo",
        "--no-prefect",
        "--stages",
        "features,tile",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1", "COLUMNS": "200"}
    # files up to 100 kB: the relevé branch fits, the image store's shard (about 600 kB) does not
    full = subprocess.run(
        cmd,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        preexec_fn=_limited(100_000),
        timeout=300,
    )
    output = full.stdout + full.stderr
    flat = " ".join(output.split())
    assert full.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert re.search(
        r"error: tile: the disk is full \(or a size or quota limit was reached\) while writing .*/tile/\w+ \(File too large\)\. Free space on the disk holding .*then rerun the same command",
        flat,
    ), flat[-2000:]
    assert not list(root.glob("tile/*/_SUCCESS.json"))
    before = {p.parent.parent.name for p in root.glob("*/*/_SUCCESS.json")}

    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    report = yaml.safe_load((root / "reports" / "demo.json").read_text())
    status = {name: s["status"] for name, s in report["stages"].items()}
    assert status["tile"] == "completed"
    assert {name for name, s in status.items() if s == "cached"} == before
