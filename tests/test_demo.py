"""Tests of the built-in demo region (botaclip_core.demo)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
from geopandas.testing import assert_geodataframe_equal
from pyproj import Transformer
from rasterio.transform import rowcol
from rasterio.windows import from_bounds

from botaclip_core.catalog import load_catalog
from botaclip_core.demo import DEMO_SIZES, HABITATS, write_demo_region
from botaclip_core.errors import CatalogError

TINY = DEMO_SIZES["tiny"]
TINY_PX = TINY.tiles * 224


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo_a")
    write_demo_region(root, size="tiny", seed=0)
    return root


@pytest.fixture(scope="module")
def tiny_twin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo_b") / "nested"
    write_demo_region(root, size="tiny", seed=0)
    return root


def data_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "demo-data").rglob("*") if p.is_file())


def read_mosaic(root: Path) -> tuple[np.ndarray, rasterio.Affine]:
    """The sheets put back on the region grid (they agree where they overlap)."""
    catalog = load_catalog(root / "data_catalog.yaml")
    left, bottom, right, top = catalog.region("demo").bounds
    transform = rasterio.Affine(0.5, 0, left, 0, -0.5, top)
    mosaic = np.zeros((4, TINY_PX, TINY_PX), dtype=np.uint8)
    for path in catalog.orthophoto_files("demo"):
        with rasterio.open(path) as src:
            r, c = rowcol(transform, src.transform.c + 0.25, src.transform.f - 0.25)
            mosaic[:, r : r + src.height, c : c + src.width] = src.read()
    return mosaic, transform


def read_habitat(root: Path) -> np.ndarray:
    with rasterio.open(root / "demo-data" / "truth" / "habitat.tif") as src:
        return src.read(1)


# files and formats --------------------------------------------------------------------


def test_files_exist(tiny: Path) -> None:
    data = tiny / "demo-data"
    for name in [
        "releves.gpkg",
        "plant_surveys.parquet",
        "butterflies.csv",
        "soil_fauna.csv",
        "README.md",
        "_SUCCESS.json",
        "truth/habitat.tif",
        "truth/environment.tif",
    ]:
        assert (data / name).is_file(), name
    sheets = sorted(p.name for p in (data / "ortho").glob("*.tif"))
    assert len(sheets) == TINY.sheets**2
    manifest = json.loads((data / "_SUCCESS.json").read_text())
    assert manifest["size"] == "tiny" and manifest["seed"] == 0
    assert not list(data.rglob(".*"))  # no temporary files left behind


def test_sheets_are_4band_uint8_lambert93_with_nodata_collar(tiny: Path) -> None:
    sheets = sorted((tiny / "demo-data" / "ortho").glob("*.tif"))
    for path in sheets:
        with rasterio.open(path) as src:
            assert src.count == 4
            assert src.dtypes == ("uint8",) * 4
            assert src.crs.to_epsg() == 2154
            assert src.res == (0.5, 0.5)
            assert src.nodata == 0
            assert src.compression is not None and src.compression.name.lower() == "deflate"
            assert src.block_shapes[0] == (256, 256)
            assert src.descriptions == ("red", "green", "blue", "nir")
            # pixel-aligned to the 0.5 m lattice
            assert src.transform.c % 0.5 == 0 and src.transform.f % 0.5 == 0
    with rasterio.open(tiny / "demo-data" / "ortho" / "ortho_r0_c0.tif") as src:
        data = src.read()
    assert (data[:, 0, :] == 0).all() and (data[:, :, 0] == 0).all()  # outer edges: collar
    assert (data[:, 40:, 40:] > 0).all()  # inside: real data are never 0


def test_mosaic_covers_region_with_few_invalid_pixels(tiny: Path) -> None:
    mosaic, _ = read_mosaic(tiny)
    invalid = (mosaic == 0).all(axis=0)
    assert invalid[0].all() and invalid[-1].all() and invalid[:, 0].all() and invalid[:, -1].all()
    assert not invalid[30:-30, 30:-30].any()
    assert 0.05 < invalid.mean() < 0.3
    assert ((mosaic == 0).any(axis=0) == invalid).all()  # nodata in all bands at once


def test_overlapping_sheets_agree(tiny: Path) -> None:
    ortho = tiny / "demo-data" / "ortho"
    pairs = [("ortho_r0_c0.tif", "ortho_r0_c1.tif"), ("ortho_r0_c0.tif", "ortho_r1_c0.tif")]
    pairs.append(("ortho_r0_c1.tif", "ortho_r1_c0.tif"))  # diagonal neighbours
    for a, b in pairs:
        with rasterio.open(ortho / a) as sa, rasterio.open(ortho / b) as sb:
            left = max(sa.bounds.left, sb.bounds.left)
            right = min(sa.bounds.right, sb.bounds.right)
            bottom = max(sa.bounds.bottom, sb.bounds.bottom)
            top = min(sa.bounds.top, sb.bounds.top)
            assert right > left and top > bottom, (a, b)
            wa = from_bounds(left, bottom, right, top, sa.transform).round_offsets().round_lengths()
            wb = from_bounds(left, bottom, right, top, sb.transform).round_offsets().round_lengths()
            da, db = sa.read(window=wa), sb.read(window=wb)
        assert da.shape == db.shape and min(da.shape[1:]) >= 10
        np.testing.assert_array_equal(da, db)


def test_catalog_validates_with_tiny_settings(tiny: Path) -> None:
    text = (tiny / "data_catalog.yaml").read_text()
    assert text.startswith("#")  # explanatory comments survive
    catalog = load_catalog(tiny / "data_catalog.yaml")
    region = catalog.region("demo")
    assert region.crs == "EPSG:2154" and region.resolution == 0.5
    assert region.orthophotos.bands == ["red", "green", "blue", "nir"]
    assert region.releves == "releves" and region.targets == ["plants", "butterflies", "soil"]
    left, bottom, right, top = region.bounds
    assert right - left == top - bottom == TINY_PX * 0.5
    assert left % 112 == 0 and top % 112 == 0
    assert len(catalog.orthophoto_files("demo")) == TINY.sheets**2
    for name, ds in catalog.datasets.items():
        assert catalog.resolve(ds.path).is_file(), name
    assert catalog.model.dofa.size == "tiny" and catalog.model.dofa.weights is None
    assert catalog.finetune.epochs == 5 and catalog.finetune.batch_size == 16
    assert catalog.downstream.folds == 3 and catalog.downstream.min_presences == 3


def test_releves(tiny: Path) -> None:
    releves = gpd.read_file(tiny / "demo-data" / "releves.gpkg", layer="releves")
    assert {"plot_id", "species", "cover", "geometry"} <= set(releves.columns)
    assert releves.crs.to_epsg() == 2154
    assert releves["plot_id"].nunique() == TINY.n_releves >= 50
    assert releves["species"].nunique() >= 20
    assert releves["plot_id"].str.fullmatch(r"R\d{4}").all()
    assert releves["cover"].between(0, 100).all()
    assert not releves.duplicated(["plot_id", "species"]).any()
    assert (releves.geom_type == "Point").all()
    # every plot lies on valid orthophoto pixels
    mosaic, transform = read_mosaic(tiny)
    plots = releves.drop_duplicates("plot_id")
    rows, cols = map(np.asarray, rowcol(transform, plots.geometry.x, plots.geometry.y))
    assert ((rows >= 0) & (rows < TINY_PX) & (cols >= 0) & (cols < TINY_PX)).all()
    assert (mosaic[:, rows, cols] > 0).all()


def test_plant_surveys_are_away_from_releves(tiny: Path) -> None:
    plants = gpd.read_parquet(tiny / "demo-data" / "plant_surveys.parquet")
    assert {"site_id", "species", "present", "geometry"} <= set(plants.columns)
    assert plants.crs.to_epsg() == 2154
    assert plants["site_id"].nunique() == TINY.n_plant_sites
    n_species = plants["species"].nunique()
    assert 15 <= n_species <= 25
    assert len(plants) == TINY.n_plant_sites * n_species  # every site × species
    assert set(plants["present"].unique()) == {0, 1}
    assert (plants.groupby("species")["present"].sum() >= 3).all()
    releves = gpd.read_file(tiny / "demo-data" / "releves.gpkg").drop_duplicates("plot_id")
    sites = plants.drop_duplicates("site_id")
    dx = sites.geometry.x.to_numpy()[:, None] - releves.geometry.x.to_numpy()[None, :]
    dy = sites.geometry.y.to_numpy()[:, None] - releves.geometry.y.to_numpy()[None, :]
    assert np.hypot(dx, dy).min() >= 50.0


def test_butterflies_fall_inside_region(tiny: Path) -> None:
    records = pd.read_csv(tiny / "demo-data" / "butterflies.csv")
    assert list(records.columns) == ["record_id", "species", "lon", "lat"]
    assert len(records) == TINY.n_butterfly_records
    assert records["record_id"].is_unique
    assert records["species"].nunique() == 15
    to_l93 = Transformer.from_crs("EPSG:4326", "EPSG:2154", always_xy=True)
    x, y = to_l93.transform(records["lon"].to_numpy(), records["lat"].to_numpy())
    left, bottom, right, top = load_catalog(tiny / "data_catalog.yaml").region("demo").bounds
    assert ((x > left) & (x < right) & (y > bottom) & (y < top)).all()


def test_soil_has_five_trophic_groups(tiny: Path) -> None:
    soil = pd.read_csv(tiny / "demo-data" / "soil_fauna.csv")
    assert list(soil.columns) == ["sample_id", "x", "y", "trophic_group", "abundance"]
    assert set(soil["trophic_group"]) == {
        "bacterivores",
        "fungivores",
        "predators",
        "omnivores",
        "herbivores",
    }
    assert soil["sample_id"].nunique() == TINY.n_soil_sites
    assert len(soil) == TINY.n_soil_sites * 5
    assert pd.api.types.is_integer_dtype(soil["abundance"]) and (soil["abundance"] >= 0).all()


# determinism and idempotence ----------------------------------------------------------


def test_same_seed_gives_identical_data(tiny: Path, tiny_twin: Path) -> None:
    names_a = [p.relative_to(tiny) for p in data_files(tiny)]
    names_b = [p.relative_to(tiny_twin) for p in data_files(tiny_twin)]
    assert names_a == names_b
    n_tif = sum(name.suffix == ".tif" for name in names_a)
    # the sheets, truth/habitat.tif and environment.tif, covariates/elevation.tif and geology.tif
    assert n_tif == TINY.sheets**2 + 4
    for name in names_a:
        a, b = tiny / name, tiny_twin / name
        if name.suffix == ".tif":
            with rasterio.open(a) as sa, rasterio.open(b) as sb:
                np.testing.assert_array_equal(sa.read(), sb.read())
                assert sa.profile == sb.profile
        if name.suffix != ".gpkg":  # GeoPackages are compared as tables below
            assert a.read_bytes() == b.read_bytes(), name
    assert_geodataframe_equal(
        gpd.read_file(tiny / "demo-data/releves.gpkg"),
        gpd.read_file(tiny_twin / "demo-data/releves.gpkg"),
    )
    assert (tiny / "data_catalog.yaml").read_text() == (tiny_twin / "data_catalog.yaml").read_text()


def test_other_seed_differs_and_replaces_data(tmp_path: Path, tiny: Path) -> None:
    write_demo_region(tmp_path, size="tiny", seed=0)
    write_demo_region(tmp_path, size="tiny", seed=1)
    assert json.loads((tmp_path / "demo-data/_SUCCESS.json").read_text())["seed"] == 1
    with rasterio.open(tiny / "demo-data/ortho/ortho_r0_c0.tif") as a:
        with rasterio.open(tmp_path / "demo-data/ortho/ortho_r0_c0.tif") as b:
            assert (a.read() != b.read()).mean() > 0.5
    ra = pd.read_csv(tiny / "demo-data/butterflies.csv")
    rb = pd.read_csv(tmp_path / "demo-data/butterflies.csv")
    assert not ra.equals(rb)


def test_second_call_touches_nothing(tmp_path: Path) -> None:
    catalog = write_demo_region(tmp_path, size="tiny", seed=3)
    assert catalog == tmp_path / "data_catalog.yaml"
    files = data_files(tmp_path) + [catalog]
    before = {p: p.stat().st_mtime_ns for p in files}
    time.sleep(0.01)
    assert write_demo_region(tmp_path, size="tiny", seed=3) == catalog
    assert {p: p.stat().st_mtime_ns for p in files} == before
    assert data_files(tmp_path) + [catalog] == files


def test_catalog_overrides_are_deep_merged(tmp_path: Path) -> None:
    write_demo_region(
        tmp_path, size="tiny", catalog_overrides={"finetune": {"epochs": 2}, "workdir": "elsewhere"}
    )
    catalog = load_catalog(tmp_path / "data_catalog.yaml")
    assert catalog.finetune.epochs == 2 and catalog.finetune.batch_size == 16
    assert catalog.workdir == "elsewhere"
    with pytest.raises(CatalogError, match="finetune"):
        write_demo_region(tmp_path, size="tiny", catalog_overrides={"finetune": {"epoch": 2}})


def test_bad_size_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="tiny"):
        write_demo_region(tmp_path, size="huge")
    assert not (tmp_path / "demo-data").exists()


# structure: images and species follow the habitats --------------------------------------


def test_habitats_have_distinct_spectra(tiny: Path) -> None:
    mosaic, _ = read_mosaic(tiny)
    habitat = read_habitat(tiny)
    valid = mosaic[3] > 0
    red, nir = {}, {}
    for h, name in enumerate(HABITATS):
        sel = valid & (habitat == h)
        if sel.sum() > 500:
            red[name] = float(mosaic[0][sel].mean())
            nir[name] = float(mosaic[3][sel].mean())
    assert set(nir) == set(HABITATS)  # seed 0: every habitat covers more than 500 pixels
    ratio = {k: nir[k] / red[k] for k in nir}
    for name in ratio.keys() - {"scree"}:
        assert ratio[name] > 1.3 * ratio["scree"], name  # vegetation: high NIR / red
    assert nir["grassland"] - nir["coniferous forest"] > 20
    assert nir["grassland"] - nir["wetland"] > 20
    assert nir["deciduous forest"] - nir["coniferous forest"] > 20


def test_releve_species_follow_habitat(tiny: Path) -> None:
    releves = gpd.read_file(tiny / "demo-data" / "releves.gpkg")
    mosaic_habitat = read_habitat(tiny)
    plots = releves.drop_duplicates("plot_id").set_index("plot_id")
    _, transform = read_mosaic(tiny)
    rows, cols = map(np.asarray, rowcol(transform, plots.geometry.x, plots.geometry.y))
    plot_habitat = pd.Series(mosaic_habitat[rows, cols], index=plots.index)
    habitat = releves["plot_id"].map(plot_habitat)
    n_plots = plot_habitat.value_counts()

    def frequency(species: str, h: int) -> float:
        return (releves.loc[habitat == h, "species"] == species).sum() / n_plots[h]

    conifer, grass = HABITATS.index("coniferous forest"), HABITATS.index("grassland")
    assert frequency("Picea abies", conifer) > 3 * frequency("Picea abies", grass)
    assert frequency("Festuca rubra", grass) > 3 * frequency("Festuca rubra", conifer)
    # the habitat column agrees with the map at the plot itself for most plots
    labels = plots["habitat"].map(HABITATS.index)
    assert (labels == plot_habitat).mean() > 0.8


# the full-size region -------------------------------------------------------------------


@pytest.mark.slow
def test_default_size_is_fast_and_valid(tmp_path: Path) -> None:
    start = time.perf_counter()
    catalog_path = write_demo_region(tmp_path, size="default")
    elapsed = time.perf_counter() - start
    assert elapsed < 30  # 15 s budget on 2 cores; slack for loaded CI machines
    catalog = load_catalog(catalog_path)
    assert len(catalog.orthophoto_files("demo")) == 9
    assert catalog.model.dofa.size == "base" and catalog.finetune.epochs == 40
    releves = gpd.read_file(tmp_path / "demo-data" / "releves.gpkg")
    assert releves["plot_id"].nunique() == 240


def test_covariates_and_the_butterflies_test_set(tiny: Path) -> None:
    data = tiny / "demo-data"
    catalog = load_catalog(tiny / "data_catalog.yaml")
    region = catalog.regions["demo"]
    assert [(c.name, c.categorical) for c in region.covariates] == [
        ("elevation", False),
        ("geology", True),
    ]
    assert catalog.datasets["butterflies"].test == "butterfly_transects"
    # the DEM is the 4 m truth elevation averaged over 2 × 2 cells, on the same corner
    with rasterio.open(data / "truth/environment.tif") as truth:
        elevation, truth_transform = truth.read(1), truth.transform
    with rasterio.open(data / "covariates/elevation.tif") as dem:
        assert dem.crs.to_string() == region.crs
        assert (dem.transform.c, dem.transform.f) == (truth_transform.c, truth_transform.f)
        assert dem.res == (2 * truth.res[0], 2 * truth.res[1])
        n = elevation.shape[0] // 2
        want = elevation.reshape(n, 2, n, 2).mean(axis=(1, 3))
        np.testing.assert_allclose(dem.read(1), want, rtol=1e-6)
    with rasterio.open(data / "covariates/geology.tif") as geology:
        assert geology.crs.to_epsg() == 4326 and geology.nodata == 0
        assert set(np.unique(geology.read(1))) <= {0, 1, 2, 3, 4}
    transects = pd.read_csv(data / "butterfly_transects.csv")
    assert transects["site_id"].nunique() == TINY.n_transect_sites
    assert len(transects) == TINY.n_transect_sites * 15
    assert set(transects["present"]) == {0, 1}
    left, bottom, right, top = region.bounds
    assert transects["x"].between(left, right).all() and transects["y"].between(bottom, top).all()
