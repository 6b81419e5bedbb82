"""Seeded generator of small orthophoto fixtures: overlapping 4-band uint8 GeoTIFF sheets.

Run ``python tests/data/make_orthophotos.py OUT_DIR`` or call :func:`make_orthophotos` from a test.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.transform import from_origin
from rasterio.warp import Resampling, calculate_default_transform, reproject

CRS_L93 = "EPSG:2154"
RESOLUTION = 0.5
# near Paris: valid in both Lambert-93 and UTM 31N
ORIGIN = (652_000.0, 6_862_000.0)


def _texture(rng: np.random.Generator, height: int, width: int, bands: int) -> np.ndarray:
    """Smooth random field plus a little noise, values in 1..255 (0 is reserved for nodata)."""
    coarse = rng.uniform(20, 235, size=(bands, height // 16 + 2, width // 16 + 2))
    ys = np.linspace(0, coarse.shape[1] - 1.001, height)
    xs = np.linspace(0, coarse.shape[2] - 1.001, width)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[None, :, None], (xs - x0)[None, None, :]
    c = coarse
    smooth = (
        c[:, y0][:, :, x0] * (1 - fy) * (1 - fx)
        + c[:, y0 + 1][:, :, x0] * fy * (1 - fx)
        + c[:, y0][:, :, x0 + 1] * (1 - fy) * fx
        + c[:, y0 + 1][:, :, x0 + 1] * fy * fx
    )
    noisy = smooth + rng.normal(0, 6, size=smooth.shape)
    return np.clip(np.rint(noisy), 1, 255).astype(np.uint8)


def write_sheet(
    path: Path,
    data: np.ndarray,
    *,
    left: float,
    top: float,
    resolution: float = RESOLUTION,
    crs: str = CRS_L93,
    nodata: float | None = 0,
    datetime: str | None = None,
    blocksize: int = 128,
    compress: str = "deflate",
) -> Path:
    """Write a tiled, compressed GeoTIFF (band, row, col) with the given origin and nodata."""
    profile = {
        "driver": "GTiff",
        "width": data.shape[2],
        "height": data.shape[1],
        "count": data.shape[0],
        "dtype": data.dtype.name,
        "crs": crs,
        "transform": from_origin(left, top, resolution, resolution),
        "tiled": True,
        "blockxsize": blocksize,
        "blockysize": blocksize,
        "compress": compress,
    }
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if datetime is not None:
            dst.update_tags(TIFFTAG_DATETIME=datetime)
    return path


def make_orthophotos(
    out_dir: Path, *, seed: int = 0, size: int = 300, margin: int = 20
) -> dict[str, list[Path]]:
    """Write the fixture set into ``out_dir``.

    Returns:
        ``{"aligned": [a, b, c], "reprojected": [r]}``: three EPSG:2154 0.5 m sheets of
        ``size`` px, overlapping, each with a ``margin`` px nodata (0) border, the second
        shifted by an integer number of pixels, the third with a later TIFFTAG_DATETIME; and a
        copy of the first warped to EPSG:32631.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    x0, y0 = ORIGIN
    offsets = [(0, 0), (size // 2 + 7, size // 3 + 3), (size // 3, size - 60)]
    dates = ["2018:06:01 10:00:00", "2019:06:01 10:00:00", "2021:06:01 10:00:00"]
    aligned = []
    for k, ((dr, dc), date) in enumerate(zip(offsets, dates, strict=True)):
        data = _texture(rng, size, size, 4)
        data[:, :margin] = 0
        data[:, -margin:] = 0
        data[:, :, :margin] = 0
        data[:, :, -margin:] = 0
        aligned.append(
            write_sheet(
                out_dir / f"sheet_{k}.tif",
                data,
                left=x0 + dc * RESOLUTION,
                top=y0 - dr * RESOLUTION,
                datetime=date,
            )
        )
    reprojected = [warp_copy(aligned[0], out_dir / "sheet_0_utm31.tif", "EPSG:32631")]
    return {"aligned": aligned, "reprojected": reprojected}


def warp_copy(src_path: Path, dst_path: Path, crs: str, resolution: float | None = None) -> Path:
    """Warp a sheet to another CRS (bilinear), keeping nodata 0, tiled and compressed."""
    with rasterio.open(src_path) as src:
        dst_crs = CRS.from_user_input(crs)
        kwargs = {"resolution": resolution} if resolution else {}
        transform, width, height = calculate_default_transform(
            src.crs, dst_crs, src.width, src.height, *src.bounds, **kwargs
        )
        profile = src.profile | {
            "crs": dst_crs,
            "transform": transform,
            "width": width,
            "height": height,
        }
        with rasterio.open(dst_path, "w", **profile) as dst:
            for b in range(1, src.count + 1):
                reproject(
                    rasterio.band(src, b),
                    rasterio.band(dst, b),
                    resampling=Resampling.bilinear,
                    src_nodata=0,
                    dst_nodata=0,
                )
    return dst_path


if __name__ == "__main__":
    print(make_orthophotos(Path(sys.argv[1] if len(sys.argv) > 1 else "tests/data/orthophotos")))
