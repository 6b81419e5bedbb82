"""The data catalog: datasets, regions, model and stage settings, validated with pydantic."""

from __future__ import annotations

import glob
import re
import zoneinfo
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from botaclip_core.errors import CatalogError
from botaclip_core.sdm.models import DEFAULT_MODEL, MODEL_NAMES, ModelName, ModelParams


class StrictModel(BaseModel):
    """Base for every settings model: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class OrthophotoSpec(StrictModel):
    """Orthophoto sources of a region and how their bands map to wavelengths."""

    paths: list[str] = Field(min_length=1, description="Globs relative to the catalog file.")
    bands: list[str] = Field(min_length=1)
    wavelengths_um: list[float] = Field(min_length=1)
    nodata: float | None = Field(None, description="Overrides the nodata value of the files.")
    resampling: Literal["nearest", "bilinear", "cubic", "average"] = "bilinear"
    precedence: Literal["catalog_order", "newest_first"] = Field(
        "catalog_order",
        description="Where sources overlap: the first path listed wins, or the newest file "
        "(acquisition date in TIFFTAG_DATETIME, else file modification time) wins.",
    )
    mean: list[float] | None = Field(None, description="Per-band normalisation mean (DN).")
    std: list[float] | None = Field(None, description="Per-band normalisation std (DN).")

    @model_validator(mode="after")
    def _bands_match(self) -> OrthophotoSpec:
        n = len(self.bands)
        for name in ("wavelengths_um", "mean", "std"):
            values = getattr(self, name)
            if values is not None and len(values) != n:
                raise ValueError(
                    f"{name} has {len(values)} values but bands has {n} ({self.bands}); "
                    "give one value per band"
                )
        for w in self.wavelengths_um:
            if not 0.3 <= w <= 15.0:
                hint = f"; {w:g} looks like nanometres: write {w / 1000:g}" if w > 250 else ""
                raise ValueError(
                    f"wavelengths_um: wavelength {w} is not in µm (expected 0.3–15, e.g. 0.665 "
                    f"for red){hint}"
                )
        return self


_CRON_MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@hourly")
_CRON_FIELD = re.compile(r"^[0-9A-Za-z*/,?#-]+$")


class ScheduleSpec(StrictModel):
    """When a region's pipeline deployment runs (``botaclip deploy``): a cron line and its zone."""

    cron: str = Field(
        description="Five-field cron line (minute hour day month weekday), e.g. '0 3 1 * *' for "
        "03:00 on the first of every month, or a macro such as '@monthly'."
    )
    timezone: str = Field("UTC", description="IANA zone of the cron line, e.g. 'Europe/Paris'.")

    @field_validator("cron")
    @classmethod
    def _cron(cls, cron: str) -> str:
        fields = cron.split()
        if cron.strip() in _CRON_MACROS:
            return cron.strip()
        if len(fields) != 5 or not all(_CRON_FIELD.match(f) for f in fields):
            raise ValueError(
                f"cron {cron!r} is not a five-field cron line (minute hour day month weekday); "
                "e.g. '0 3 1 * *' runs at 03:00 on the first of every month"
            )
        return " ".join(fields)

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, timezone: str) -> str:
        try:
            zoneinfo.ZoneInfo(timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"timezone {timezone!r} is not an IANA time zone (e.g. 'Europe/Paris', 'UTC')"
            ) from None
        return timezone


def _known_crs(value: str | None) -> str | None:
    """A CRS string that PROJ understands (checked while the catalog is read, not mid-run)."""
    if value is None:
        return value
    from pyproj import CRS
    from pyproj.exceptions import CRSError

    try:
        CRS.from_user_input(value)
    except CRSError:
        raise ValueError(
            f"{value!r} is not a CRS PROJ knows; use an authority code such as 'EPSG:2154' "
            "(Lambert-93) or 'EPSG:4326' (lon/lat), or a WKT string"
        ) from None
    return value


class CovariateSpec(StrictModel):
    """An environmental covariate raster of a region, sampled at the sites (a feature source)."""

    name: str = Field(description="Column name of the covariate in tables and reports.")
    path: str = Field(description="A raster GDAL reads, in any CRS (relative to the catalog).")
    categorical: bool = Field(
        False, description="Classes (geology, land cover): one-hot encoded, never averaged."
    )
    band: int = Field(1, ge=1, description="Band of the raster holding the covariate.")


class RegionSpec(StrictModel):
    """A region: its grid, its orthophotos, and the datasets used to train and evaluate."""

    crs: str
    resolution: float = Field(gt=0)
    bounds: tuple[float, float, float, float] | None = Field(
        None, description="left, bottom, right, top in the region CRS; default: the sources' union"
    )
    orthophotos: OrthophotoSpec
    releves: str | None = None
    targets: list[str] = Field(default_factory=list)
    covariates: list[CovariateSpec] = Field(
        default_factory=list,
        description="Environmental rasters (elevation, climate, geology): the `covariates` "
        "feature source and combinations such as `botaclip+covariates`.",
    )

    _crs_known = field_validator("crs")(_known_crs)

    @field_validator("covariates")
    @classmethod
    def _covariate_names(cls, covariates: list[CovariateSpec]) -> list[CovariateSpec]:
        names = [c.name for c in covariates]
        if len(set(names)) != len(names):
            raise ValueError(f"covariates: names must be unique, got {names}")
        return covariates

    schedule: ScheduleSpec | None = Field(
        None, description="When `botaclip deploy` runs the region's pipeline; null = on demand."
    )


class DatasetSpec(StrictModel):
    """A vector dataset of sites (relevés, surveys, occurrences, abundances)."""

    kind: Literal["releves", "presence_absence", "presence_only", "abundance"]
    path: str
    crs: str | None = Field(None, description="Required for CSV; read from the file otherwise.")
    x: str = "x"
    y: str = "y"
    site_id: str = "site_id"
    species: str = "species"
    value: str | None = None
    layer: str | None = None
    test: str | None = Field(
        None,
        description="A target's independent test set: another dataset (presence_absence for a "
        "presence_absence or presence_only target, abundance for an abundance one) scored by "
        "the models fitted on all of this dataset's sites.",
    )

    _crs_known = field_validator("crs")(_known_crs)


class DofaSpec(StrictModel):
    """The DOFA backbone."""

    size: Literal["tiny", "small", "base", "large"] = "base"
    weights: str | None = Field(None, description="DOFA checkpoint path; null = random init.")


class ModelSpec(StrictModel):
    """Model settings."""

    dofa: DofaSpec = DofaSpec()


class TileSettings(StrictModel):
    """Tiling: model tile size (= Zarr chunk), shards and parallelism."""

    tile_size: int = Field(224, ge=16, description="Model input size in pixels; Zarr chunk size.")
    shard_blocks: int = Field(
        8,
        ge=1,
        description="Chunks per Zarr shard side (one file per shard); 1 writes one file per "
        "chunk, for readers without sharding support (GDAL < 3.13).",
    )
    zstd_level: int = Field(
        1,
        ge=-7,
        le=22,
        description="zstd level of the image chunks: 1 stores real orthophotos 8–25 % smaller "
        "than uncompressed; negative levels tile faster and store about uncompressed sizes.",
    )
    workers: int | None = Field(None, ge=1, description="Dask workers; default: all cores.")


class FinetuneSettings(StrictModel):
    """Contrastive fine-tuning (defaults follow the seed description).

    ``mode`` picks what trains: ``adapter`` (identity-initialised adapter on cached frozen DOFA
    features), ``partial`` (the last ``trainable_blocks`` DOFA blocks, or LoRA on ``attn.qkv``
    of every block when ``lora_rank`` is set) or ``full`` (all of DOFA); the last two train on
    pixels.
    """

    mode: Literal["adapter", "partial", "full"] = Field(
        "adapter",
        description="adapter: frozen DOFA + adapter on cached features; partial: last "
        "trainable_blocks blocks (or LoRA) on pixels; full: all of DOFA on pixels.",
    )
    loss: Literal["infonce", "sigmoid"] = "infonce"
    regularizer: Literal["l2sp", "similarity", "none"] = "l2sp"
    reg_weight: float = Field(0.01, ge=0)
    releve_encoder: Literal["linear", "mlp"] = "linear"
    releve_input: Literal["presence", "cover"] = "presence"
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(64, ge=2)
    epochs: int = Field(40, ge=1)
    patience: int = Field(8, ge=1)
    val_fraction: float = Field(0.2, gt=0, lt=1)
    augment_views: int = Field(4, ge=1, description="Augmented chip views cached per plot.")
    seed: int = 0
    trainable_blocks: int = Field(
        2, ge=0, description="mode partial: final DOFA blocks trained (plus fc_norm)."
    )
    lora_rank: int | None = Field(
        None,
        ge=1,
        description="mode partial: train LoRA of this rank on attn.qkv of every block instead "
        "of unfreezing blocks; null = no LoRA.",
    )
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scale numerator (alpha / rank).")
    max_shift: int = Field(
        16, ge=0, description="Largest random chip-centre shift (pixels) of the augmentations."
    )
    botasp: bool = Field(
        True, description="Also train the supervised BotaSP baseline adapter on cached features."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="Training device; auto = CUDA when available, else CPU.",
        json_schema_extra={"runtime": True},  # where it trains, not what: not in stage keys
    )

    @model_validator(mode="after")
    def _mode_options(self) -> FinetuneSettings:
        # only value-based checks: a dumped catalog spells out every default and must reload
        if self.lora_rank is not None and self.mode != "partial":
            raise ValueError(
                f"lora_rank={self.lora_rank} needs mode 'partial' (got mode {self.mode!r}); "
                "set mode: partial to train LoRA, or set lora_rank: null"
            )
        return self


class EmbedSettings(StrictModel):
    """Wall-to-wall embedding inference and how the maps are stored."""

    batch_size: int | None = Field(
        None, ge=1, description="Tiles per forward; default 8 on the CPU, 256 (DOFA-Base) on CUDA."
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="auto (CUDA when present), cpu, cuda or cuda:N; how, not what: not in keys.",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="auto: bf16 autocast on CUDA, fp32 on the CPU. Part of the maps' keys; set it "
        "(with device: cuda) when planning on a CPU machine for a GPU Dask cluster.",
    )
    block_tiles: int = Field(4, ge=1, description="Cells per Dask block side (and Zarr chunk).")
    dtype: Literal["float32", "float16", "int8"] = Field(
        "float32",
        description="Storage of the maps: float32; float16 (half the size); int8 with a float32 "
        "scale per cell (GeoTessera's scheme, about a quarter of the size).",
    )
    stride: int | None = Field(
        None,
        ge=1,
        description="Pixels per map cell; each cell holds the embedding of the tile-sized window "
        "centred on it. Default: the tile size (one cell per tile).",
    )


#: Feature sources downstream: the maps, the spectral baseline, the region's covariates.
BASE_SOURCES = ("dofa", "botaclip", "botasp", "spectral", "covariates")
#: Compared by default; ``covariates`` and ``botaclip+covariates`` join where a region has some.
FEATURE_SOURCES = ("dofa", "botaclip", "botasp", "spectral")
#: Kinds of test set each target kind can be scored on.
TEST_KINDS = {
    "presence_absence": ("presence_absence",),
    "presence_only": ("presence_absence", "presence_only"),
    "abundance": ("abundance",),
}


def source_parts(source: str) -> list[str]:
    """The base sources of a feature source: ``botaclip+covariates`` → botaclip, covariates."""
    return source.split("+")


def _feature_source(source: str) -> str:
    parts = source_parts(source)
    bad = [p for p in parts if p not in BASE_SOURCES]
    if bad or len(set(parts)) != len(parts):
        raise ValueError(
            f"feature source {source!r}: use one of {list(BASE_SOURCES)} or several joined by "
            "'+' (each once), e.g. 'botaclip+covariates'"
        )
    return source


class DownstreamSettings(StrictModel):
    """Species models on embeddings."""

    folds: int = Field(5, ge=2)
    block_size_m: float | None = Field(
        None,
        gt=0,
        description="Spatial CV block side (m); default: the median autocorrelation range of "
        "variograms of the sites' leading predictor components, at least one embedding cell.",
    )
    n_background: int = Field(1000, ge=10)
    min_presences: int = Field(5, ge=2)
    models: list[ModelName] = Field(
        default_factory=lambda: list(MODEL_NAMES),
        min_length=1,
        description="Species models compared side by side: glm (L2 logistic; ridge on "
        "log(1 + abundance)), rf (down-sampled random forest), brt (boosted trees), maxent "
        "(elapid), ensemble (rank-rescaled mean of model_params.ensemble_members).",
    )
    model_params: ModelParams = Field(
        default_factory=ModelParams,
        description="The models' hyper-parameters (the demo's catalog grows fewer trees).",
    )
    jobs: int | None = Field(
        None,
        ge=1,
        description="Species fitted at once (worker processes); default: the cores, at most 4.",
        json_schema_extra={"runtime": True},
    )
    bootstrap: int = Field(
        1000, ge=0, description="Bootstrap resamples of the 95% intervals; 0: no intervals."
    )
    random_cv_models: list[ModelName] = Field(
        default_factory=lambda: [DEFAULT_MODEL],
        description="Models also scored by random (not spatial) cross-validation, beside the "
        "spatial scores: how much site-level CV flatters them.",
    )
    maps: list[str] | None = Field(
        None,
        description="Species (or targets) mapped per task; default: the five most prevalent.",
    )
    map_features: str | None = Field(
        None,
        description="Feature source of the prediction maps (a combination too, e.g. "
        "'botaclip+covariates'); default botaclip, else dofa.",
    )
    map_model: ModelName | None = Field(
        None,
        description="Model of the prediction maps; default: the default model (ensemble) if "
        "`models` lists it, else the first model listed.",
    )
    pca_components: int | None = Field(32, ge=1)
    feature_sources: list[str] | None = Field(
        None,
        description="Features compared downstream: frozen DOFA, BotaCLIP, the supervised BotaSP "
        "baseline, a spectral baseline (band means, SDs and NDVI per cell), the region's "
        "covariate rasters, or combinations joined by '+'. Default: dofa, botaclip, botasp and "
        "spectral, plus covariates and botaclip+covariates where the region has covariates.",
    )
    seed: int = 0

    _sources_valid = field_validator("feature_sources")(
        lambda v: None if v is None else [_feature_source(s) for s in v]
    )
    _map_source_valid = field_validator("map_features")(
        lambda v: None if v is None else _feature_source(v)
    )

    @property
    def mapping_model(self) -> ModelName:
        """The model the prediction maps come from."""
        if self.map_model is not None:
            return self.map_model
        return DEFAULT_MODEL if DEFAULT_MODEL in self.models else self.models[0]

    def sources_for(self, has_covariates: bool) -> list[str]:
        """The feature sources compared in a region (with covariates or not)."""
        if self.feature_sources is not None:
            return list(self.feature_sources)
        extra = ["covariates", "botaclip+covariates"] if has_covariates else []
        return [*FEATURE_SOURCES, *extra]


class DaskSettings(StrictModel):
    """Where Dask work runs."""

    address: str | None = Field(None, description="Existing scheduler; null = a LocalCluster.")
    n_workers: int | None = Field(None, ge=1)
    threads_per_worker: int | None = Field(None, ge=1)


class Catalog(StrictModel):
    """The whole catalog file."""

    version: Literal[1] = 1
    workdir: str = "work"
    regions: dict[str, RegionSpec] = Field(min_length=1)
    datasets: dict[str, DatasetSpec] = Field(default_factory=dict)
    model: ModelSpec = ModelSpec()
    tiling: TileSettings = TileSettings()
    finetune: FinetuneSettings = FinetuneSettings()
    embed: EmbedSettings = EmbedSettings()
    downstream: DownstreamSettings = DownstreamSettings()
    dask: DaskSettings = DaskSettings()
    base_dir: Path = Field(Path("."), exclude=True, description="Set by load_catalog.")

    @field_validator("regions")
    @classmethod
    def _names(cls, regions: dict[str, RegionSpec]) -> dict[str, RegionSpec]:
        for name in regions:
            if not name or not all(ch.isalnum() or ch in "-_" for ch in name):
                raise ValueError(f"region name {name!r}: use letters, digits, '-' and '_' only")
        return regions

    @model_validator(mode="after")
    def _references(self) -> Catalog:
        for rname, region in self.regions.items():
            refs = self.site_datasets(rname)
            for ref in refs:
                if ref not in self.datasets:
                    raise ValueError(
                        f"regions.{rname} names dataset {ref!r}, which is not under 'datasets' "
                        f"(defined: {sorted(self.datasets) or 'none'})"
                    )
            for target in region.targets:
                self._check_test_set(rname, target)
            if region.releves and self.datasets[region.releves].kind != "releves":
                raise ValueError(
                    f"regions.{rname}.releves: dataset {region.releves!r} has kind "
                    f"{self.datasets[region.releves].kind!r}; it must have kind 'releves'"
                )
        stride, tile = self.embed.stride, self.tiling.tile_size
        if stride is not None and (tile - stride) % 2:
            raise ValueError(
                f"embed.stride {stride} and tiling.tile_size {tile} differ by an odd number of "
                f"pixels, so windows cannot be centred on cells; use e.g. stride {tile // 2}"
            )
        for dname, ds in self.datasets.items():
            if ds.path.lower().endswith(".csv") and ds.crs is None:
                raise ValueError(
                    f"datasets.{dname}: CSV file {ds.path!r} needs 'crs' (e.g. crs: \"EPSG:4326\" "
                    "for lon/lat) and the coordinate columns 'x' and 'y'"
                )
            if ds.kind == "abundance" and ds.value is None:
                raise ValueError(
                    f"datasets.{dname}: kind 'abundance' needs 'value' (the count column)"
                )
        return self

    def _check_test_set(self, region: str, target: str) -> None:
        test = self.datasets[target].test
        if test is None:
            return
        where = f"datasets.{target}.test"
        if test not in self.datasets:
            raise ValueError(
                f"{where} names dataset {test!r}, which is not under 'datasets' "
                f"(defined: {sorted(self.datasets)})"
            )
        kind, allowed = self.datasets[target].kind, TEST_KINDS.get(self.datasets[target].kind, ())
        if self.datasets[test].kind not in allowed:
            raise ValueError(
                f"{where}: dataset {test!r} has kind {self.datasets[test].kind!r}, which cannot "
                f"test a {kind!r} target; use a dataset of kind {' or '.join(allowed)}"
            )
        if test in self.regions[region].targets or test == target:
            raise ValueError(
                f"{where}: {test!r} is also a target of region {region!r}; an independent test "
                "set must not be trained on (remove it from the targets)"
            )

    # resolution of relative paths -------------------------------------------------------
    def resolve(self, path: str) -> Path:
        """A catalog path made absolute against the catalog file's folder."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.base_dir / p).resolve()

    @property
    def workdir_path(self) -> Path:
        """Absolute artifact-store root."""
        return self.resolve(self.workdir)

    def region(self, name: str) -> RegionSpec:
        """The named region, or an error listing the defined ones."""
        try:
            return self.regions[name]
        except KeyError:
            raise CatalogError(
                f"region {name!r} is not in the catalog; defined regions: {sorted(self.regions)}. "
                "Pass one of them with --region."
            ) from None

    def site_datasets(self, region: str) -> list[str]:
        """The region's site datasets: its relevés (if any), its targets, their test sets."""
        spec = self.region(region)
        tests = [
            t
            for name in spec.targets
            if name in self.datasets and (t := self.datasets[name].test) is not None
        ]
        names = ([spec.releves] if spec.releves else []) + list(spec.targets) + tests
        return list(dict.fromkeys(names))

    def test_set(self, target: str) -> str | None:
        """The independent test dataset of a target, if the catalog gives one."""
        return self.datasets[target].test

    def orthophoto_files(self, region: str) -> list[Path]:
        """Expand the orthophoto globs of a region, in catalog order, without duplicates.

        Raises:
            CatalogError: if a glob matches no file.
        """
        files: list[Path] = []
        for pattern in self.region(region).orthophotos.paths:
            matches = sorted(glob.glob(str(self.resolve(pattern)), recursive=True))
            if not matches:
                raise CatalogError(
                    f"regions.{region}.orthophotos.paths: {pattern!r} matches no file "
                    f"(looked in {self.base_dir}). Fix the glob or the catalog location."
                )
            files.extend(Path(m) for m in matches if Path(m) not in files)
        return files


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names allowed at the parent of ``loc`` (for unknown-key messages)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return []
            current = field.annotation
            # Optional[Model] → Model
            models = [a for a in getattr(current, "__args__", ()) if _is_model(a)]
            if models and getattr(current, "__origin__", None) is not dict:
                current = models[0]
        elif getattr(current, "__origin__", None) is dict:
            current = current.__args__[-1]
        else:
            return []
    return (
        [n for n, f in current.model_fields.items() if not f.exclude] if _is_model(current) else []
    )


def _is_model(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, BaseModel)


def format_validation_error(exc: ValidationError, *, source: str) -> str:
    """One message per problem: the dotted field, the bad value, what is allowed."""
    lines = [f"{source}: invalid catalog"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(Catalog, loc)
            lines.append(
                f"  - {where}: unknown key {str(loc[-1])!r}; allowed keys here: {', '.join(allowed)}"
            )
        elif err["type"] == "missing":
            lines.append(f"  - {where}: required field is missing")
        else:
            value = err.get("input")
            shown = repr(value) if not isinstance(value, dict) else "{...}"
            lines.append(f"  - {where}: {err['msg']} (got {shown[:120]})")
    return "\n".join(lines)


def parse_catalog(data: dict[str, Any], *, base_dir: Path, source: str = "catalog") -> Catalog:
    """Validate a catalog mapping; relative paths resolve against ``base_dir``.

    Raises:
        CatalogError: with one line per invalid field.
    """
    if not isinstance(data, dict):
        raise CatalogError(
            f"{source}: expected a YAML mapping at the top level, got {type(data).__name__}"
        )
    try:
        catalog = Catalog.model_validate(data)
    except ValidationError as exc:
        raise CatalogError(format_validation_error(exc, source=source)) from None
    return catalog.model_copy(update={"base_dir": Path(base_dir).resolve()})


def merge_overrides(data: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """``data`` with ``overrides`` merged in, nested mappings merged key by key."""
    merged = dict(data)
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_overrides(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_catalog(path: str | Path, overrides: dict[str, Any] | None = None) -> Catalog:
    """Read and validate a catalog YAML file, with optional overrides (e.g. from the CLI).

    Raises:
        CatalogError: if the file is missing, not YAML, or invalid.
    """
    path = Path(path)
    if not path.is_file():
        raise CatalogError(f"catalog {path}: no such file. Pass the path of a data_catalog.yaml.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise CatalogError(
            f"{path}: not valid YAML ({exc}). Fix the syntax there: indent with spaces, close "
            "brackets and quotes, quote values that hold ': ' or ' #'."
        ) from None
    if overrides:
        data = merge_overrides(data if isinstance(data, dict) else {}, overrides)
    return parse_catalog(data, base_dir=path.parent, source=str(path))


def dump_catalog(catalog: Catalog) -> str:
    """YAML text of a catalog (defaults included), for writing next to outputs."""
    return yaml.safe_dump(catalog.model_dump(mode="json", exclude={"base_dir"}), sort_keys=False)
