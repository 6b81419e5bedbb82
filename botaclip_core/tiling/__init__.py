"""Orthophotos → image Zarr on a region grid, block by block, sparse, parallel and resumable."""

from botaclip_core.tiling.image_store import covered_blocks, open_image
from botaclip_core.tiling.records import RECORDS_SUFFIX, records_dir
from botaclip_core.tiling.sources import aligned_offset, check_orthophotos, region_grid_for_sources
from botaclip_core.tiling.tile import (
    DEFAULT_SHARD_BLOCKS,
    DEFAULT_ZSTD_LEVEL,
    PRECEDENCE_POLICIES,
    RESAMPLING_METHODS,
    TilingResult,
    tile_orthophotos,
)

__all__ = [
    "DEFAULT_SHARD_BLOCKS",
    "DEFAULT_ZSTD_LEVEL",
    "PRECEDENCE_POLICIES",
    "RECORDS_SUFFIX",
    "RESAMPLING_METHODS",
    "TilingResult",
    "aligned_offset",
    "check_orthophotos",
    "covered_blocks",
    "open_image",
    "records_dir",
    "region_grid_for_sources",
    "tile_orthophotos",
]
