from pathlib import Path

import pytest

from botaclip_core.catalog import dump_catalog, load_catalog, parse_catalog
from botaclip_core.errors import CatalogError

REGION = {
    "crs": "EPSG:2154",
    "resolution": 0.5,
    "orthophotos": {
        "paths": ["ortho/*.tif"],
        "bands": ["red", "green", "blue"],
        "wavelengths_um": [0.665, 0.56, 0.49],
    },
}


def test_minimal_catalog_defaults_and_paths(tmp_path):
    cat = parse_catalog({"regions": {"r": REGION}}, base_dir=tmp_path)
    assert cat.workdir_path == (tmp_path / "work").resolve()
    assert (
        cat.finetune.loss == "infonce" and cat.finetune.lr == 1e-4 and cat.finetune.batch_size == 64
    )
    assert cat.model.dofa.size == "base" and cat.model.dofa.weights is None
    assert "workdir: work" in dump_catalog(cat)


def test_unknown_key_names_key_and_allowed_ones(tmp_path):
    bad = {"regions": {"r": {**REGION, "orthophoto": {}}}}
    with pytest.raises(CatalogError, match="unknown key 'orthophoto'") as err:
        parse_catalog(bad, base_dir=tmp_path, source="cat.yaml")
    msg = str(err.value)
    assert "regions.r.orthophoto: unknown key 'orthophoto'" in msg
    assert "orthophotos" in msg and "resolution" in msg and msg.startswith("cat.yaml")


def test_band_lists_must_match(tmp_path):
    region = {**REGION, "orthophotos": {**REGION["orthophotos"], "wavelengths_um": [0.665, 0.56]}}
    with pytest.raises(CatalogError, match="wavelengths_um has 2 values but bands has 3"):
        parse_catalog({"regions": {"r": region}}, base_dir=tmp_path)


def test_dataset_references_and_csv_crs(tmp_path):
    with pytest.raises(CatalogError, match="names dataset 'plots'"):
        parse_catalog({"regions": {"r": {**REGION, "releves": "plots"}}}, base_dir=tmp_path)
    with pytest.raises(CatalogError, match="needs 'crs'"):
        parse_catalog(
            {
                "regions": {"r": REGION},
                "datasets": {"b": {"kind": "presence_only", "path": "b.csv"}},
            },
            base_dir=tmp_path,
        )
    with pytest.raises(CatalogError, match="must have kind 'releves'"):
        parse_catalog(
            {
                "regions": {"r": {**REGION, "releves": "b"}},
                "datasets": {"b": {"kind": "presence_only", "path": "b.gpkg"}},
            },
            base_dir=tmp_path,
        )


def test_load_catalog_errors(tmp_path):
    with pytest.raises(CatalogError, match="no such file"):
        load_catalog(tmp_path / "missing.yaml")
    p = tmp_path / "c.yaml"
    p.write_text("regions: [unclosed")
    with pytest.raises(CatalogError, match="not valid YAML"):
        load_catalog(p)


def test_orthophoto_glob_must_match(tmp_path):
    cat = parse_catalog({"regions": {"r": REGION}}, base_dir=tmp_path)
    with pytest.raises(CatalogError, match="matches no file"):
        cat.orthophoto_files("r")
    (tmp_path / "ortho").mkdir()
    (tmp_path / "ortho" / "b.tif").write_bytes(b"")
    (tmp_path / "ortho" / "a.tif").write_bytes(b"")
    assert [p.name for p in cat.orthophoto_files("r")] == ["a.tif", "b.tif"]
    with pytest.raises(CatalogError, match="defined regions"):
        cat.region("nope")


def test_repository_catalog_is_valid():
    cat = load_catalog(Path(__file__).resolve().parents[1] / "data_catalog.yaml")
    assert cat.regions
