import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
from pyproj import Transformer
from shapely.geometry import Point

from botaclip_core.catalog import DatasetSpec
from botaclip_core.errors import CRSMismatchError, InputDataError
from botaclip_core.grid import RegionGrid
from botaclip_core.releves import SiteTable, sites_on_grid

GRID = RegionGrid.from_bounds("EPSG:2154", 0.5, (915000.0, 6457000.0, 915224.0, 6457224.0))
LONG = pd.DataFrame(
    {
        "plot_id": ["p1", "p1", "p2", "p3", "p3"],
        "taxon": ["Festuca rubra", "Carex nigra", "Festuca rubra", "Carex nigra", "Poa alpina"],
        "cover": [30.0, 5.0, 60.0, 10.0, 1.0],
        "x": [915010.25, 915010.25, 915100.0, 915200.75, 915200.75],
        "y": [6457200.25, 6457200.25, 6457100.0, 6457001.0, 6457001.0],
    }
)
SPEC = DatasetSpec(kind="releves", path="x", site_id="plot_id", species="taxon", value="cover")


def check(table: SiteTable):
    assert table.species == ["Carex nigra", "Festuca rubra", "Poa alpina"]
    assert list(table.sites["site_id"]) == ["p1", "p2", "p3"]
    np.testing.assert_array_equal(table.values, [[5, 30, 0], [0, 60, 0], [10, 0, 1]])
    # p1 at (915010.25, 6457200.25): col = 10.25 / 0.5 = 20, row = (224 - 200.25) / 0.5 = 47
    assert (table.sites.loc[0, "row"], table.sites.loc[0, "col"]) == (47, 20)


@pytest.mark.parametrize("suffix", [".gpkg", ".geojson", ".parquet"])
def test_vector_formats(tmp_path, suffix):
    gdf = gpd.GeoDataFrame(
        LONG.drop(columns=["x", "y"]), geometry=gpd.points_from_xy(LONG.x, LONG.y), crs="EPSG:2154"
    )
    path = tmp_path / f"releves{suffix}"
    gdf.to_parquet(path) if suffix == ".parquet" else gdf.to_file(path)
    check(sites_on_grid(SPEC, path, GRID, name="releves"))


def test_csv_in_lonlat_is_reprojected(tmp_path):
    to_ll = Transformer.from_crs("EPSG:2154", "EPSG:4326", always_xy=True)
    lon, lat = to_ll.transform(LONG.x.to_numpy(), LONG.y.to_numpy())
    frame = LONG.drop(columns=["x", "y"]).assign(lon=lon, lat=lat)
    path = tmp_path / "r.csv"
    frame.to_csv(path, index=False)
    spec = SPEC.model_copy(update={"crs": "EPSG:4326", "x": "lon", "y": "lat"})
    check(sites_on_grid(spec, path, GRID, name="releves"))


def test_presence_without_value_and_roundtrip(tmp_path):
    path = tmp_path / "r.csv"
    LONG.to_csv(path, index=False)
    spec = DatasetSpec(
        kind="presence_only", path="r.csv", crs="EPSG:2154", site_id="plot_id", species="taxon"
    )
    table = sites_on_grid(spec, path, GRID, name="b")
    assert set(np.unique(table.values)) == {0.0, 1.0}
    table.save(tmp_path, "b")
    back = SiteTable.load(tmp_path, "b")
    np.testing.assert_array_equal(back.values, table.values)
    assert back.species == table.species


def test_errors_name_file_field_and_fix(tmp_path):
    path = tmp_path / "r.csv"
    LONG.to_csv(path, index=False)
    spec = SPEC.model_copy(update={"crs": "EPSG:2154", "species": "species"})
    with pytest.raises(
        InputDataError, match=r"column 'species' \(datasets.releves.species\) not found.*taxon"
    ):
        sites_on_grid(spec, path, GRID, name="releves")
    far = LONG.assign(x=LONG.x + 1e5)
    far.to_csv(path, index=False)
    with pytest.raises(InputDataError, match="none of its 3 sites falls inside"):
        sites_on_grid(SPEC.model_copy(update={"crs": "EPSG:2154"}), path, GRID, name="releves")
    gdf = gpd.GeoDataFrame(LONG.drop(columns=["x", "y"]), geometry=[Point(0, 0)] * 5)
    gdf.to_file(tmp_path / "nocrs.geojson")
    # GeoJSON is WGS84 by definition: a file written without CRS is read as EPSG:4326 → outside
    with pytest.raises((InputDataError, CRSMismatchError), match="none of its 3 sites falls"):
        sites_on_grid(SPEC, tmp_path / "nocrs.geojson", GRID, name="releves")
    with pytest.raises(InputDataError, match="does not exist"):
        sites_on_grid(SPEC, tmp_path / "nope.gpkg", GRID, name="releves")
    neg = LONG.assign(cover=-1.0)
    neg.to_csv(path, index=False)
    with pytest.raises(InputDataError, match="must hold numbers"):
        sites_on_grid(SPEC.model_copy(update={"crs": "EPSG:2154"}), path, GRID, name="releves")
