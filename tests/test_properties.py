"""Property-based tests: catalog parsing, coordinate handling and grid snapping."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pyproj import Transformer

from botaclip_core.catalog import DatasetSpec, dump_catalog, parse_catalog
from botaclip_core.errors import CatalogError, InputDataError
from botaclip_core.grid import RegionGrid
from botaclip_core.releves import sites_on_grid

# grid snapping ------------------------------------------------------------------------------

resolutions = st.sampled_from([0.2, 0.25, 0.5, 1.0, 1.5, 2.0, 10.0, 30.0])
origins = st.floats(-1e6, 1e6, allow_nan=False)
sizes = st.floats(0.01, 5e3, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(resolutions, origins, origins, sizes, sizes)
def test_snapped_grid_is_the_smallest_lattice_grid_covering_the_bounds(res, left, bottom, w, h):
    bounds = (left, bottom, left + w, bottom + h)
    grid = RegionGrid.from_bounds("EPSG:2154", res, bounds)
    g_left, g_bottom, g_right, g_top = grid.bounds
    tol = 1e-6 * res
    # on the lattice: edges are whole multiples of the resolution
    for edge in (grid.left, grid.top):
        assert abs(edge / res - round(edge / res)) < 1e-6
    # covers the bounds (up to the snapping tolerance) ...
    assert g_left <= left + tol and g_bottom <= bottom + tol
    assert g_right >= left + w - tol and g_top >= bottom + h - tol
    # ... and no pixel less would: dropping a column or a row leaves part of it out
    assert g_left + res > left - tol and g_right - res < left + w + tol or grid.width == 1
    assert g_top - res < bottom + h + tol and g_bottom + res > bottom - tol or grid.height == 1


@settings(max_examples=200, deadline=None)
@given(resolutions, st.integers(-100_000, 100_000), st.integers(-100_000, 100_000),
       st.integers(1, 2000), st.integers(1, 2000))  # fmt: skip
def test_bounds_on_the_lattice_are_kept_exactly(res, i, j, width, height):
    left, top = i * res, j * res
    grid = RegionGrid.from_bounds(
        "EPSG:2154", res, (left, top - height * res, left + width * res, top)
    )
    assert (grid.width, grid.height) == (width, height)
    assert math.isclose(grid.left, left, abs_tol=1e-6) and math.isclose(grid.top, top, abs_tol=1e-6)
    assert RegionGrid.from_dict(grid.to_dict()) == grid


@settings(max_examples=200, deadline=None)
@given(resolutions, st.integers(1, 500), st.integers(1, 500), st.data())
def test_pixel_centres_and_indices_round_trip(res, width, height, data):
    grid = RegionGrid("EPSG:2154", res, 900_000.0, 6_500_000.0, width, height)
    rows = np.array(data.draw(st.lists(st.integers(0, height - 1), min_size=1, max_size=20)))
    cols = np.array(
        data.draw(st.lists(st.integers(0, width - 1), min_size=len(rows), max_size=len(rows)))
    )
    xs, ys = grid.xy(rows, cols)
    r, c = grid.rowcol(xs, ys)
    np.testing.assert_array_equal(r, rows)
    np.testing.assert_array_equal(c, cols)
    assert grid.contains(r, c).all()
    # a point anywhere inside a pixel maps to that pixel
    fx, fy = data.draw(st.floats(0.01, 0.99)), data.draw(st.floats(0.01, 0.99))
    r2, c2 = grid.rowcol(grid.left + (cols + fx) * res, grid.top - (rows + fy) * res)
    np.testing.assert_array_equal(r2, rows)
    np.testing.assert_array_equal(c2, cols)
    assert not grid.contains(np.array([-1, height]), np.array([0, width])).any()


@settings(max_examples=100, deadline=None)
@given(resolutions, st.integers(1, 600), st.integers(1, 600), st.integers(1, 32))
def test_coarsened_grid_covers_the_fine_one(res, width, height, factor):
    grid = RegionGrid("EPSG:2154", res, 0.0, 1000.0, width, height)
    coarse = grid.coarsen(factor)
    assert coarse.left == grid.left and coarse.top == grid.top
    assert coarse.width * factor >= width > (coarse.width - 1) * factor
    assert coarse.height * factor >= height > (coarse.height - 1) * factor


# coordinate handling ------------------------------------------------------------------------

GRID = RegionGrid("EPSG:2154", 0.5, 915_040.0, 6_458_032.0, 448, 448)
TO_LONLAT = Transformer.from_crs("EPSG:2154", "EPSG:4326", always_xy=True)


def _spec(**changes) -> DatasetSpec:
    base = dict(
        kind="presence_only", path="records.csv", crs="EPSG:4326", x="lon", y="lat", site_id="id"
    )
    return DatasetSpec(**{**base, **changes})


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(st.integers(0, 447), st.integers(0, 447)), min_size=1, max_size=30, unique=True
    ),
    st.integers(0, 5),
)
def test_lonlat_records_land_on_their_pixels_and_outside_ones_are_dropped(tmp_path, cells, n_out):
    rows, cols = np.array([c[0] for c in cells]), np.array([c[1] for c in cells])
    xs, ys = GRID.xy(rows, cols)  # pixel centres: far from any pixel edge
    xs = np.concatenate([xs, GRID.left - 1000.0 - 10.0 * np.arange(n_out)])
    ys = np.concatenate([ys, np.full(n_out, GRID.top - 10.0)])
    lon, lat = TO_LONLAT.transform(xs, ys)
    ids = [f"S{i:03d}" for i in range(len(xs))]
    path = tmp_path / "records.csv"
    pd.DataFrame({"id": ids, "species": "Erebia euryale", "lon": lon, "lat": lat}).to_csv(
        path, index=False
    )
    table = sites_on_grid(_spec(), path, GRID, name="records")
    assert table.sites["site_id"].tolist() == ids[: len(cells)]
    np.testing.assert_array_equal(table.sites["row"].to_numpy(), rows)
    np.testing.assert_array_equal(table.sites["col"].to_numpy(), cols)
    np.testing.assert_allclose(table.sites["x"].to_numpy(), xs[: len(cells)], atol=1e-6)

    # the same columns named the other way round: no record inside, and the fix says so
    with pytest.raises(
        InputDataError,
        match=r"coordinates look swapped.*set datasets\.records\.x to 'lon' and datasets\.records\.y to 'lat'",
    ):
        sites_on_grid(_spec(x="lat", y="lon"), path, GRID, name="records")


# catalog parsing ----------------------------------------------------------------------------

names = st.text("abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=12)
wavelengths = st.floats(0.3, 15.0, allow_nan=False)


@st.composite
def catalogs(draw) -> dict:
    n_bands = draw(st.integers(1, 6))
    region = {
        "crs": draw(st.sampled_from(["EPSG:2154", "EPSG:32631", "EPSG:3857"])),
        "resolution": draw(st.floats(0.05, 100, allow_nan=False)),
        "orthophotos": {
            "paths": draw(
                st.lists(
                    st.sampled_from(["a/*.tif", "b/**/*.tif", "c.vrt"]), min_size=1, max_size=3
                )
            ),
            "bands": [f"b{i}" for i in range(n_bands)],
            "wavelengths_um": draw(st.lists(wavelengths, min_size=n_bands, max_size=n_bands)),
        },
    }
    return {
        "workdir": draw(st.sampled_from(["work", "out/store", "/tmp/w"])),
        "regions": {draw(names): region},
        "finetune": {"epochs": draw(st.integers(1, 100)), "lr": draw(st.floats(1e-6, 1.0))},
    }


@settings(max_examples=150, deadline=None)
@given(catalogs())
def test_valid_catalogs_parse_and_their_dump_parses_to_the_same(data):
    catalog = parse_catalog(data, base_dir=Path("/data"))
    again = parse_catalog(yaml.safe_load(dump_catalog(catalog)), base_dir=Path("/data"))
    assert again == catalog
    assert catalog.workdir_path.is_absolute()


@settings(max_examples=150, deadline=None)
@given(catalogs(), st.sampled_from(["", "finetune", "regions.*", "regions.*.orthophotos"]), names)
def test_an_unknown_key_anywhere_is_named_with_the_allowed_ones(data, where, key):
    target = data
    for part in [p for p in where.split(".") if p]:
        target = target[next(iter(target))] if part == "*" else target[part]
    assume(key not in target)
    target[key] = 1
    with pytest.raises(CatalogError, match=rf"unknown key '{key}'; allowed keys here: \w+"):
        parse_catalog(data, base_dir=Path("/data"))


@settings(max_examples=150, deadline=None)
@given(catalogs(), st.one_of(st.floats(15.01, 5000), st.floats(0, 0.299)), st.data())
def test_wavelengths_outside_0_3_to_15_um_are_refused(data, bad, draw):
    ortho = next(iter(data["regions"].values()))["orthophotos"]
    ortho["wavelengths_um"][draw.draw(st.integers(0, len(ortho["bands"]) - 1))] = bad
    with pytest.raises(CatalogError, match=r"wavelengths_um: wavelength .* is not in µm"):
        parse_catalog(data, base_dir=Path("/data"))


@settings(max_examples=100, deadline=None)
@given(catalogs(), st.integers(1, 3))
def test_band_and_wavelength_counts_must_agree(data, extra):
    ortho = next(iter(data["regions"].values()))["orthophotos"]
    ortho["wavelengths_um"] = ortho["wavelengths_um"] + [0.5] * extra
    with pytest.raises(CatalogError, match=r"wavelengths_um has \d+ values but bands has"):
        parse_catalog(data, base_dir=Path("/data"))
