"""The BotaCLIP pipeline as plain Python: stage plans (keys), stage builds, and a runner.

Each stage has a plan (its key: name, version, output-changing settings, input fingerprints and
upstream keys) computed cheaply before anything runs, and a build that writes into the stage's
store folder. Prefect tasks wrap :func:`run_stage`; :func:`run_region` runs the same stages
in-process for library users.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from botaclip_core import downstream as ds_models
from botaclip_core.catalog import Catalog, dump_catalog
from botaclip_core.errors import CatalogError, StageError
from botaclip_core.grid import RegionGrid
from botaclip_core.store import (
    ArtifactStore,
    StageResult,
    atomic_write_json,
    fingerprint_file,
    stage_key,
)

logger = logging.getLogger(__name__)

STAGES = ("tile", "rasterize", "finetune", "embed", "downstream")
DEPENDS = {
    "tile": (),
    "rasterize": (),
    "finetune": ("rasterize",),  # chips are read from the orthophotos: no tiling needed
    "embed": ("tile", "finetune"),
    "downstream": ("embed", "rasterize"),
}
# bump when a stage's output format or algorithm changes, so old outputs are not reused
VERSIONS = {
    "tile": "2",  # 2: sharded image Zarr
    "rasterize": "1",
    "features": "1",
    "finetune": "1",
    "embed-dofa": "1",
    "embed": "1",
    "downstream": "1",
}


@dataclass(frozen=True)
class StagePlan:
    """What identifies one stage output: its key and everything that went into it."""

    stage: str
    key: str
    settings: dict[str, Any]
    inputs: dict[str, Any]


@dataclass
class RegionPlan:
    """Plans of the stages to run for one region, in order."""

    catalog_path: str
    region: str
    grid: RegionGrid
    stages: dict[str, StagePlan] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)

    def key(self, stage: str) -> str:
        """Key of a stage (planned to run or not)."""
        return self.keys[stage]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what Prefect tasks receive)."""
        return {
            "catalog_path": self.catalog_path,
            "region": self.region,
            "grid": self.grid.to_dict(),
            "stages": {
                s: {"key": p.key, "settings": p.settings, "inputs": p.inputs}
                for s, p in self.stages.items()
            },
            "keys": dict(self.keys),
            "overrides": self.overrides,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RegionPlan:
        """Inverse of :meth:`to_dict`."""
        stages = {
            s: StagePlan(s, p["key"], p["settings"], p["inputs"]) for s, p in data["stages"].items()
        }
        return cls(
            data["catalog_path"],
            data["region"],
            RegionGrid.from_dict(data["grid"]),
            stages,
            dict(data["keys"]),
            dict(data.get("overrides") or {}),
        )


def resolve_stages(
    requested: Sequence[str] | None, *, has_releves: bool, has_targets: bool
) -> list[str]:
    """The requested stages plus what they need, in pipeline order.

    Raises:
        CatalogError: for an unknown stage or one the region's data cannot support.
    """
    wanted = list(requested) if requested else list(STAGES)
    for name in wanted:
        if name not in STAGES:
            raise CatalogError(f"--stages: unknown stage {name!r}; stages are {', '.join(STAGES)}")
    if not requested:
        wanted = [
            s
            for s in STAGES
            if (s != "finetune" or has_releves) and (s != "downstream" or has_targets)
        ]
    for name in wanted:
        if name == "finetune" and not has_releves:
            raise CatalogError(
                "stage 'finetune' needs the region's 'releves' dataset in the catalog"
            )
        if name == "downstream" and not has_targets:
            raise CatalogError("stage 'downstream' needs the region's 'targets' in the catalog")
    closed: set[str] = set()

    def visit(stage: str) -> None:
        for dep in DEPENDS[stage]:
            if dep == "finetune" and not has_releves:
                continue
            visit(dep)
        closed.add(stage)

    for name in wanted:
        visit(name)
    return [s for s in STAGES if s in closed]


class Pipeline:
    """The stages of one region of a catalog.

    Args:
        catalog: the validated catalog.
        region: the region's name.
        catalog_path: where the catalog came from (recorded in reports).
    """

    def __init__(
        self,
        catalog: Catalog,
        region: str,
        *,
        catalog_path: str | Path = "",
        overrides: dict[str, Any] | None = None,
    ) -> None:
        self.catalog = catalog
        self.overrides = dict(overrides or {})
        self.region_name = region
        self.region = catalog.region(region)
        self.catalog_path = str(catalog_path)
        self.store = ArtifactStore(catalog.workdir_path)
        self._fingerprints: dict[str, dict[str, Any]] | None = None
        self._grid: RegionGrid | None = None

    # ---------------------------------------------------------------- planning
    def fingerprint(self, path: Path) -> dict[str, Any]:
        """Fingerprint of an input file, hashed only when new or changed since an earlier run."""
        if self._fingerprints is None:
            self._fingerprints = self.store.load_fingerprints()
        fp = fingerprint_file(path, self._fingerprints)
        self._fingerprints[fp["path"]] = fp
        return fp

    @property
    def grid(self) -> RegionGrid:
        """Region grid: the catalog's bounds, or the union of the orthophotos' footprints."""
        if self._grid is None:
            from botaclip_core.tiling import region_grid_for_sources

            self._grid = region_grid_for_sources(
                self.catalog.orthophoto_files(self.region_name),
                crs=self.region.crs,
                resolution=self.region.resolution,
                bounds=self.region.bounds,
            )
        return self._grid

    def _dataset_inputs(self, names: Sequence[str]) -> dict[str, Any]:
        out = {}
        for name in names:
            spec = self.catalog.datasets[name]
            out[name] = {
                "spec": spec.model_dump(mode="json"),
                "file": self.fingerprint(self.catalog.resolve(spec.path)),
            }
        return out

    def _model_settings(self) -> dict[str, Any]:
        dofa = self.catalog.model.dofa
        weights = self.fingerprint(self.catalog.resolve(dofa.weights)) if dofa.weights else None
        ortho = self.region.orthophotos
        return {
            "size": dofa.size,
            "weights": weights,
            "wavelengths_um": ortho.wavelengths_um,
            "mean": ortho.mean,
            "std": ortho.std,
            "tile_size": self.catalog.tiling.tile_size,
        }

    def plan(self, stages: Sequence[str] | None = None) -> RegionPlan:
        """Keys of the requested stages and of everything they need.

        Keys of every stage the region supports are computed (cheap: file fingerprints and
        settings), since a stage's key includes its upstream keys.
        """
        has_releves, has_targets = bool(self.region.releves), bool(self.region.targets)
        names = resolve_stages(stages, has_releves=has_releves, has_targets=has_targets)
        ortho = self.region.orthophotos
        planned: dict[str, StagePlan] = {}

        def add(stage: str, settings: dict[str, Any], inputs: dict[str, Any]) -> None:
            key = stage_key(stage, VERSIONS[stage], settings, inputs)
            planned[stage] = StagePlan(stage, key, settings, inputs)

        add(
            "tile",
            {
                "grid": self.grid.to_dict(),
                "orthophotos": ortho.model_dump(mode="json", exclude={"paths", "mean", "std"}),
                "tile_size": self.catalog.tiling.tile_size,
                "shard_blocks": self.catalog.tiling.shard_blocks,
                "zstd_level": self.catalog.tiling.zstd_level,
            },
            {
                "orthophotos": [
                    self.fingerprint(p) for p in self.catalog.orthophoto_files(self.region_name)
                ]
            },
        )
        datasets = [self.region.releves] if self.region.releves else []
        datasets += list(self.region.targets)
        add(
            "rasterize",
            {"grid": self.grid.to_dict(), "datasets": datasets},
            self._dataset_inputs(datasets),
        )
        if has_releves:
            add(
                "finetune",
                {
                    "finetune": self.catalog.finetune.model_dump(mode="json", exclude={"device"}),
                    "model": self._model_settings(),
                    "releves": self.region.releves,
                },
                {"tile": planned["tile"].key, "rasterize": planned["rasterize"].key},
            )
        add(
            "embed",
            {"model": self._model_settings(), "block_tiles": self.catalog.embed.block_tiles},
            {
                "tile": planned["tile"].key,
                "finetune": planned["finetune"].key if has_releves else None,
            },
        )
        if has_targets:
            add(
                "downstream",
                {
                    "downstream": self.catalog.downstream.model_dump(mode="json"),
                    "targets": list(self.region.targets),
                },
                {"embed": planned["embed"].key, "rasterize": planned["rasterize"].key},
            )
        if self._fingerprints is not None:
            self.store.save_fingerprints(self._fingerprints)
        plan = RegionPlan(self.catalog_path, self.region_name, self.grid, overrides=self.overrides)
        plan.stages = {s: planned[s] for s in names}
        plan.keys = {s: p.key for s, p in planned.items()}
        return plan

    # ---------------------------------------------------------------- running
    def run_stage(self, plan: RegionPlan, stage: str) -> StageResult:
        """Run one planned stage (its upstream stages must be complete)."""
        sp = plan.stages[stage]
        build: Callable[[Path, RegionPlan], dict[str, Any]] = getattr(self, f"_build_{stage}")

        def wrapped(out_dir: Path) -> dict[str, Any]:
            return build(out_dir, plan)

        return self.store.run(stage, VERSIONS[stage], sp.settings, sp.inputs, wrapped, key=sp.key)

    def upstream(self, plan: RegionPlan, stage: str) -> dict[str, Any]:
        """Outputs of a completed upstream stage."""
        return self.store.manifest(stage, plan.key(stage))["outputs"]

    def _build_tile(self, out_dir: Path, plan: RegionPlan) -> dict[str, Any]:
        from botaclip_core.tiling import tile_orthophotos

        ortho = self.region.orthophotos
        # GDAL releases the GIL: local threads beat processes; a remote scheduler spreads the I/O
        with contextlib.ExitStack() as stack:
            client = None
            if self.catalog.dask.address:
                from botaclip_core.cluster import dask_client

                client = stack.enter_context(dask_client(self.catalog.dask))
            result = tile_orthophotos(
                self.catalog.orthophoto_files(self.region_name),
                out_dir / "image.zarr",
                grid=plan.grid,
                bands=ortho.bands,
                wavelengths_um=ortho.wavelengths_um,
                tile_size=self.catalog.tiling.tile_size,
                resampling=ortho.resampling,
                nodata=ortho.nodata,
                precedence=ortho.precedence,
                shard_blocks=self.catalog.tiling.shard_blocks,
                zstd_level=self.catalog.tiling.zstd_level,
                workers=self.catalog.tiling.workers,
                dask_client=client,
            )
        return {
            "zarr": str(result.path),
            "grid": result.grid.to_dict(),
            "blocks": result.n_blocks,
            "blocks_written": result.n_written,
            "dtype": result.dtype,
        }

    def _build_rasterize(self, out_dir: Path, plan: RegionPlan) -> dict[str, Any]:
        from botaclip_core.releves import sites_on_grid

        outputs: dict[str, Any] = {}
        names = ([self.region.releves] if self.region.releves else []) + list(self.region.targets)
        for name in names:
            spec = self.catalog.datasets[name]
            table = sites_on_grid(spec, self.catalog.resolve(spec.path), plan.grid, name=name)
            outputs[name] = {
                "kind": spec.kind,
                "n_sites": len(table.sites),
                "n_species": len(table.species),
                **table.save(out_dir, name),
            }
        return outputs

    def _backbone_spec(self, dtype: str) -> Any:
        from botaclip_core.embed import BackboneSpec
        from botaclip_core.features import band_statistics

        ortho = self.region.orthophotos
        mean, std = band_statistics(len(ortho.bands), dtype, ortho.mean, ortho.std)
        weights = self.catalog.model.dofa.weights
        return BackboneSpec(
            size=self.catalog.model.dofa.size,
            weights=str(self.catalog.resolve(weights)) if weights else None,
            seed=self.catalog.finetune.seed,
            wavelengths_um=tuple(ortho.wavelengths_um),
            mean=tuple(float(v) for v in mean),
            std=tuple(float(v) for v in std),
            batch_size=self.catalog.embed.batch_size,
            torch_threads=self._torch_threads(),
        )

    def _torch_threads(self) -> int | None:
        """Torch threads per local Dask worker: the cores shared among the workers."""
        import os

        if self.catalog.dask.address:
            return None
        from botaclip_core.cluster import local_workers

        return max(1, (os.cpu_count() or 1) // local_workers(self.catalog.dask))

    def _build_finetune(self, out_dir: Path, plan: RegionPlan) -> dict[str, Any]:
        from botaclip_core.finetune import TrainingData, train_adapter, train_backbone
        from botaclip_core.releves import SiteTable

        raster = self.upstream(plan, "rasterize")
        releves_name = self.region.releves
        if releves_name is None:
            raise StageError(f"region {self.region_name!r} has no 'releves' dataset to train on")
        table = SiteTable.load(Path(raster[releves_name]["sites"]).parent, releves_name)
        settings = self.catalog.finetune
        spec = self._backbone_spec(self._imagery_dtype())
        # frozen-DOFA chip features: adapter training and BotaSP use them; any training change reuses them
        feat_settings = {
            "model": self._model_settings(),
            "views": settings.augment_views,
            "max_shift": settings.max_shift,
            "seed": settings.seed,
        }
        feat_inputs = {
            "tile": plan.key("tile"),
            "rasterize": plan.key("rasterize"),
            "releves": releves_name,
        }
        features = self.store.run(
            "features",
            VERSIONS["features"],
            feat_settings,
            feat_inputs,
            lambda d: self._build_chip_features(d, table, spec),
        )
        data = np.load(features.outputs["features"])
        keep = np.load(features.outputs["plots"])
        coords = table.sites[["x", "y"]].to_numpy()[keep]
        train = TrainingData(
            features=data, releves=table.values[keep], coords=coords, species=table.species
        )
        if settings.mode == "adapter":
            summary = train_adapter(train, settings, out_dir)
        else:
            summary = train_backbone(
                self._plot_chips(table, keep, settings.max_shift),
                table.values[keep],
                coords,
                table.species,
                size=spec.size,
                weights=spec.weights,
                wavelengths_um=spec.wavelengths_um,
                mean=spec.mean,
                std=spec.std,
                settings=settings,
                out_dir=out_dir,
            )
        outputs: dict[str, Any] = {
            "mode": settings.mode,
            "model": summary["model"],
            "backbone": summary.get("backbone"),
            "model_card": str(out_dir / "model_card.json"),
            "training_curve": str(out_dir / "training_curve.png"),
            "best_val_loss": summary["best_val_loss"],
            "val_recall_at_5": summary["val_recall_at_5"],
            "features_status": features.status,
        }
        metrics = {k: v for k, v in summary.items() if k not in ("history", "card")}
        if settings.botasp:
            from botaclip_core.botasp import train_botasp

            sp_summary = train_botasp(train, settings, out_dir)
            outputs["botasp"] = sp_summary["model"]
            outputs["botasp_val_auc"] = sp_summary["val_auc"]
            metrics["botasp"] = {
                k: v for k, v in sp_summary.items() if k not in ("history", "card")
            }
        card = {
            **summary.get("card", {}),
            "dofa": {
                "size": spec.size,
                "weights": spec.weights or "random initialisation (no pretrained weights)",
            },
            "settings": settings.model_dump(mode="json"),
            "data": {
                "tile_key": plan.key("tile"),
                "rasterize_key": plan.key("rasterize"),
                "features_key": features.key,
                "releves_file": plan.stages["rasterize"].inputs[releves_name]["file"]
                if "rasterize" in plan.stages
                else None,
                "n_plots": int(len(data)),
                "n_species": len(table.species),
            },
            "metrics": metrics,
            "species": table.species,
        }
        atomic_write_json(out_dir / "model_card.json", card)
        return outputs

    def _plot_chips(self, table: Any, keep: np.ndarray, margin: int) -> np.ndarray:
        """Plain chips with a margin for shifts, around the kept plots (pixel training modes)."""
        reader = self._chip_reader(self.catalog.tiling.tile_size + 2 * margin)
        rows, cols = table.sites["row"].to_numpy(), table.sites["col"].to_numpy()
        chips = np.stack([reader.read(int(rows[i]), int(cols[i])) for i in keep])
        reader.close()
        return chips

    def _imagery_dtype(self) -> str:
        """Data type of the orthophotos (the first file's; tiling checks they agree)."""
        import rasterio

        with rasterio.open(self.catalog.orthophoto_files(self.region_name)[0]) as ds:
            return str(ds.dtypes[0])

    def _chip_reader(self, size: int) -> Any:
        """Chips around plots straight from the orthophotos, on the region grid."""
        from botaclip_core.chips import SourceChipReader

        ortho = self.region.orthophotos
        return SourceChipReader(
            self.catalog.orthophoto_files(self.region_name),
            self.grid,
            size,
            nodata=ortho.nodata,
            resampling=ortho.resampling,
        )

    def _build_chip_features(self, out_dir: Path, table: Any, spec: Any) -> dict[str, Any]:
        from botaclip_core.chips import draw_augmentations
        from botaclip_core.features import encode_tiles, load_backbone

        reader = self._chip_reader(self.catalog.tiling.tile_size)
        rows, cols = table.sites["row"].to_numpy(), table.sites["col"].to_numpy()
        keep = np.array(
            [
                reader.read_with_mask(int(r), int(c), 1)[1][0, 0]
                for r, c in zip(rows, cols, strict=True)
            ]
        )
        if keep.sum() < 8:
            raise StageError(
                f"only {int(keep.sum())} of {len(rows)} relevé plots fall on valid orthophoto pixels; "
                "BotaCLIP needs at least 8. Check the relevés' CRS and the orthophoto coverage."
            )
        model = load_backbone(spec.size, spec.weights, spec.seed)
        views = self.catalog.finetune.augment_views
        plots = np.flatnonzero(keep)
        feats = np.zeros((len(plots), views, int(model.embed_dim)), dtype=np.float32)
        mean, std = np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)
        group = max(1, 64 // views)  # plots per forward group: bounded memory, progress in the log
        for start in range(0, len(plots), group):
            chips = [
                reader.read(int(rows[idx]), int(cols[idx]), aug)
                for idx in plots[start : start + group]
                for aug in draw_augmentations(
                    views,
                    seed=self.catalog.finetune.seed * 1_000_003 + int(idx),
                    max_shift=self.catalog.finetune.max_shift,
                )
            ]
            out = encode_tiles(
                model, np.stack(chips), spec.wavelengths_um, mean, std, batch_size=spec.batch_size
            )
            feats[start : start + group] = out.reshape(-1, views, out.shape[1])
            logger.info(
                "features: %d / %d plots encoded", min(start + group, len(plots)), len(plots)
            )
        reader.close()
        np.save(out_dir / "features.npy", feats)
        np.save(out_dir / "plots.npy", plots)
        return {
            "features": str(out_dir / "features.npy"),
            "plots": str(out_dir / "plots.npy"),
            "n_plots": len(plots),
            "views": views,
        }

    def _build_embed(self, out_dir: Path, plan: RegionPlan) -> dict[str, Any]:
        tile = self.upstream(plan, "tile")
        spec = self._backbone_spec(tile["dtype"])
        sp = plan.stages["embed"]
        dofa_settings = {
            "model": sp.settings["model"],
            "block_tiles": self.catalog.embed.block_tiles,
            "seed": spec.seed,
        }

        def build_dofa(d: Path) -> dict[str, Any]:
            attrs = {
                "source": "dofa",
                "dofa_size": spec.size,
                "dofa_weights": spec.weights or "random",
            }
            return self._embed(Path(tile["zarr"]), d / "dofa.zarr", spec, attrs)

        dofa = self.store.run(
            "embed-dofa",
            VERSIONS["embed-dofa"],
            dofa_settings,
            {"tile": plan.key("tile")},
            build_dofa,
        )
        outputs: dict[str, Any] = {"dofa": dofa.outputs["zarr"], "dofa_status": dofa.status}
        if not sp.inputs.get("finetune"):
            return outputs
        trained = self.upstream(plan, "finetune")
        attrs = {"finetune_key": plan.key("finetune"), "finetune_mode": trained["mode"]}
        if trained["mode"] == "adapter":
            from botaclip_core.finetune import load_adapter

            self._apply_adapter(
                dofa.outputs["zarr"],
                load_adapter(Path(trained["model"])).adapter,
                out_dir / "botaclip.zarr",
                {**attrs, "source": "botaclip"},
            )
        else:  # the fine-tuned backbone itself embeds the region (resumable block by block)
            tuned = dataclasses.replace(spec, weights=trained["backbone"])
            self._embed(
                Path(tile["zarr"]),
                out_dir / "botaclip.zarr",
                tuned,
                {**attrs, "source": "botaclip"},
            )
        outputs["botaclip"] = str(out_dir / "botaclip.zarr")
        if trained.get("botasp"):
            from botaclip_core.botasp import load_botasp_adapter

            self._apply_adapter(
                dofa.outputs["zarr"],
                load_botasp_adapter(Path(trained["botasp"])),
                out_dir / "botasp.zarr",
                {**attrs, "source": "botasp"},
            )
            outputs["botasp"] = str(out_dir / "botasp.zarr")
        return outputs

    def _embed(
        self, image_zarr: Path, out: Path, spec: Any, attrs: dict[str, Any]
    ) -> dict[str, Any]:
        """Backbone features of every covered tile (Dask or in-process, resumable by block)."""
        from botaclip_core.cluster import compute_client
        from botaclip_core.embed import embed_region
        from botaclip_core.models.dofa import DOFA_SIZES

        with compute_client(self.catalog.dask) as client:
            return embed_region(
                image_zarr,
                out,
                spec=spec,
                dim=DOFA_SIZES[spec.size].embed_dim,
                tile_size=self.catalog.tiling.tile_size,
                block_tiles=self.catalog.embed.block_tiles,
                client=client,
                attrs={**attrs, "dofa_size": spec.size},
            )

    @staticmethod
    def _apply_adapter(dofa_zarr: str, adapter: Any, out: Path, attrs: dict[str, Any]) -> None:
        """Adapted embeddings of a DOFA Zarr: ``x @ W.T + b`` block by block."""
        from botaclip_core.embed import transform_embeddings

        weight = adapter.weight.detach().cpu().numpy().T.copy()
        bias = adapter.bias.detach().cpu().numpy().copy()
        transform_embeddings(
            Path(dofa_zarr), out, lambda x: x @ weight + bias, out_dim=weight.shape[1], attrs=attrs
        )

    def _build_downstream(self, out_dir: Path, plan: RegionPlan) -> dict[str, Any]:
        from botaclip_core.embed import sample_embeddings
        from botaclip_core.releves import SiteTable

        emb = self.upstream(plan, "embed")
        raster = self.upstream(plan, "rasterize")
        settings = self.catalog.downstream
        tile_size = self.catalog.tiling.tile_size
        sources = {s: Path(emb[s]) for s in settings.feature_sources if s in emb}
        grid = plan.grid
        block = settings.block_size_m or max(grid.width, grid.height) * grid.resolution / 5.0
        background = self._background(Path(emb["dofa"]), settings, tile_size)
        landscape, projectors = {}, {}
        for source, path in sources.items():
            raw = sample_embeddings(path, background["rows"], background["cols"], tile_size)
            projectors[source] = ds_models.fit_projector(raw, settings)
            landscape[source] = projectors[source].transform(raw)
        rows: list[dict[str, Any]] = []
        per_target: dict[str, Any] = {}
        for name in self.region.targets:
            kind = self.catalog.datasets[name].kind
            table = SiteTable.load(Path(raster[name]["sites"]).parent, name)
            r, c = table.sites["row"].to_numpy(), table.sites["col"].to_numpy()
            xy = table.sites[["x", "y"]].to_numpy()
            for source, path in sources.items():
                proj = projectors[source]
                X = sample_embeddings(path, r, c, tile_size)
                ok = ~np.isnan(X).any(axis=1)
                X = proj.transform(X[ok])
                if kind == "presence_absence":
                    scores = ds_models.evaluate_presence_absence(
                        X, table.values[ok], xy[ok], table.species, settings, block_size=block
                    )
                elif kind == "presence_only":
                    scores = ds_models.evaluate_presence_only(
                        X,
                        table.values[ok],
                        xy[ok],
                        landscape[source],
                        background["xy"],
                        table.species,
                        settings,
                        block_size=block,
                    )
                else:
                    scores = ds_models.evaluate_abundance(
                        X, table.values[ok], xy[ok], table.species, settings, block_size=block
                    )
                if not scores.n_targets:
                    logger.warning(
                        "downstream %s/%s: no target has enough data to score", name, source
                    )
                for metric, value in scores.metrics.items():
                    rows.append(
                        {
                            "task": name,
                            "kind": kind,
                            "features": source,
                            "model": ds_models.MODEL_NAMES[kind],
                            "metric": metric,
                            "value": round(float(value), 4),
                            "n_targets": scores.n_targets,
                            "primary": metric == ds_models.PRIMARY_METRIC[kind],
                        }
                    )
                per_target[f"{name}/{source}"] = scores.per_target
        atomic_write_json(out_dir / "metrics.json", rows)
        atomic_write_json(out_dir / "per_target.json", per_target)
        return {
            "metrics": rows,
            "metrics_file": str(out_dir / "metrics.json"),
            "per_target_file": str(out_dir / "per_target.json"),
        }

    def _background(self, dofa_zarr: Path, settings: Any, tile_size: int) -> dict[str, np.ndarray]:
        """Background points: random pixels of covered embedding cells (seeded)."""
        import zarr

        arr = zarr.open_array(str(dofa_zarr / "embedding"), mode="r")
        covered = np.argwhere(~np.isnan(arr[0]))  # one feature plane: (ty, tx), small
        rng = np.random.default_rng(settings.seed)
        pick = covered[rng.integers(0, len(covered), size=settings.n_background)]
        rows = pick[:, 0] * tile_size + rng.integers(0, tile_size, size=len(pick))
        cols = pick[:, 1] * tile_size + rng.integers(0, tile_size, size=len(pick))
        xs, ys = self.grid.xy(rows, cols)
        return {"rows": rows, "cols": cols, "xy": np.column_stack([xs, ys])}


def build_report(region: str, results: dict[str, StageResult]) -> dict[str, Any]:
    """The run report: stage statuses and timings, embedding paths, downstream metrics."""
    report: dict[str, Any] = {"region": region, "stages": {}, "embeddings": {}, "downstream": []}
    for name, res in results.items():
        report["stages"][name] = {
            "status": res.status,
            "seconds": round(res.seconds, 2),
            "output": str(res.path),
            "key": res.key,
        }
    if "embed" in results:
        outs = results["embed"].outputs
        report["embeddings"] = {k: outs[k] for k in ("dofa", "botaclip", "botasp") if k in outs}
    if "finetune" in results:
        outs = results["finetune"].outputs
        report["model_card"] = outs.get("model_card")
    if "downstream" in results:
        report["downstream"] = results["downstream"].outputs["metrics"]
    return report


def write_report(report: dict[str, Any], path: Path) -> Path:
    """Write the report atomically."""
    atomic_write_json(path, report)
    return path


def run_region(
    catalog: Catalog,
    region: str,
    *,
    stages: Sequence[str] | None = None,
    catalog_path: str | Path = "",
    report_path: Path | None = None,
) -> dict[str, Any]:
    """Run the pipeline for one region in this process (no Prefect) and return the report."""
    pipeline = Pipeline(catalog, region, catalog_path=catalog_path)
    plan = pipeline.plan(stages)
    start = time.perf_counter()
    results = {name: pipeline.run_stage(plan, name) for name in plan.stages}
    report = build_report(region, results)
    report["seconds"] = round(time.perf_counter() - start, 2)
    path = report_path or catalog.workdir_path / "reports" / f"{region}.json"
    write_report(report, path)
    (catalog.workdir_path / "reports" / f"{region}.catalog.yaml").write_text(dump_catalog(catalog))
    logger.info("report written to %s", path)
    return report


def load_report(path: Path) -> dict[str, Any]:
    """Read a report written by :func:`write_report`."""
    return json.loads(Path(path).read_text())
