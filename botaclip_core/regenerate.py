"""Plans that rebuild a region's embedding maps with another fine-tuned model.

The DOFA map (``embed-dofa``) does not depend on the fine-tuned model, so a new adapter
regenerates the BotaCLIP and BotaSP maps from the cached DOFA features in seconds; only a
fine-tuned backbone (``finetune.mode`` partial or full) embeds the image again.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from botaclip_core.catalog import Catalog
from botaclip_core.errors import CatalogError, StageError
from botaclip_core.pipeline import RegionPlan, StagePlan, plan_region
from botaclip_core.stages import registry
from botaclip_core.store import SUCCESS, ArtifactStore, atomic_write_json, stage_key

FINETUNE = "finetune"


def finetune_folder(
    store: ArtifactStore, *, finetune_key: str | None = None, checkpoint: str | Path | None = None
) -> Path:
    """The completed ``finetune`` output named by a store key or by one of its files.

    Args:
        store: the region's artifact store.
        finetune_key: a key under ``<workdir>/finetune/``.
        checkpoint: a file of a finetune output (``model.pt``, ``backbone.pt``) or its folder,
            in this store or another one.

    Raises:
        CatalogError: if both or neither are given, or they name no completed finetune output.
    """
    if (finetune_key is None) == (checkpoint is None):
        raise CatalogError("give either a finetune key or a checkpoint path, not both or neither")
    if finetune_key is not None:
        folder = store.stage_dir(FINETUNE, finetune_key)
        if not store.is_complete(FINETUNE, finetune_key):
            done = sorted(p.parent.name for p in (store.root / FINETUNE).glob(f"*/{SUCCESS}"))
            raise CatalogError(
                f"finetune_key {finetune_key!r}: no completed finetune output at {folder}; "
                f"completed keys in {store.root / FINETUNE}: {done or 'none'}"
            )
        return folder
    path = Path(str(checkpoint)).expanduser().resolve()
    folder = path if path.is_dir() else path.parent
    manifest = folder / SUCCESS
    if not path.exists() or not manifest.is_file():
        raise CatalogError(
            f"checkpoint {str(checkpoint)!r}: not a file or folder of a completed finetune output "
            f"(expected <workdir>/finetune/<key>/model.pt with {SUCCESS} beside it)"
        )
    stage = json.loads(manifest.read_text()).get("stage")
    if stage != FINETUNE:
        raise CatalogError(
            f"checkpoint {str(checkpoint)!r} belongs to a {stage!r} output, not a finetune one"
        )
    return folder


def adopt_finetune(store: ArtifactStore, folder: Path) -> dict[str, Any]:
    """The manifest of a finetune output, copied into ``store`` first if it lives elsewhere.

    A copy keeps its key; the paths in its output record are rewritten to the copy, so the
    maps built from it never read another workdir.
    """
    manifest = json.loads((folder / SUCCESS).read_text())
    key = manifest["key"]
    home = store.stage_dir(FINETUNE, key)
    if folder.resolve() == home.resolve() or store.is_complete(FINETUNE, key):
        return store.manifest(FINETUNE, key) if store.is_complete(FINETUNE, key) else manifest
    tmp = home.with_name(f".{key}.adopting")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(folder, tmp, ignore=shutil.ignore_patterns(SUCCESS))
    shutil.rmtree(home, ignore_errors=True)  # a partial output under the same key
    tmp.rename(home)
    old, new = str(folder.resolve()), str(home)
    outputs = {
        k: v.replace(old, new, 1) if isinstance(v, str) and v.startswith(old) else v
        for k, v in manifest["outputs"].items()
    }
    manifest = {**manifest, "outputs": outputs, "adopted_from": old}
    atomic_write_json(home / SUCCESS, manifest)  # last: the copy is complete only now
    return manifest


def with_finetune(plan: RegionPlan, manifest: dict[str, Any], targets: list[str]) -> RegionPlan:
    """``plan`` with its ``finetune`` stage replaced by a completed output, re-keyed.

    The stages only that finetune needed (``rasterize``, ``features``, unless a target needs
    them) leave the plan; every stage after it gets the key its new upstream gives.

    Args:
        plan: a plan that holds ``finetune``.
        manifest: the completed finetune output's manifest (in ``plan``'s store).
        targets: the stages the plan is for (they and what they need stay).
    """
    stage = registry.get(FINETUNE)
    settings = stage.load_settings(manifest["settings"])
    content = stage_key(
        FINETUNE, manifest["stage_version"], settings.key_dict(content=True), manifest["inputs"]
    )
    imported = StagePlan(
        FINETUNE, manifest["stage_version"], manifest["key"], content, (), manifest["settings"], {}
    )
    stages = {**plan.stages, FINETUNE: imported}
    kept: set[str] = set()

    def visit(name: str) -> None:
        if name not in kept:
            kept.add(name)
            for need in stages[name].needs:
                visit(need)

    for name in targets:
        visit(name)
    content_keys: dict[str, str] = {}
    rekeyed: dict[str, StagePlan] = {}
    for name, planned in stages.items():
        if name not in kept:
            continue
        if name != FINETUNE:
            settings = registry.get(name).load_settings(planned.settings)
            upstream = planned.key_inputs(content_keys)
            planned = replace(
                planned,
                key=stage_key(name, planned.version, settings.key_dict(), upstream),
                content_key=stage_key(
                    name, planned.version, settings.key_dict(content=True), upstream
                ),
            )
        content_keys[name] = planned.content_key
        rekeyed[name] = planned
    return replace(plan, stages=rekeyed)


def regenerate_plan(
    catalog: Catalog,
    region: str,
    *,
    finetune_key: str | None = None,
    checkpoint: str | Path | None = None,
    stages: list[str] | None = None,
    catalog_path: str | Path = "",
) -> RegionPlan:
    """The plan of a region's embedding maps, from the catalog's model or a named one.

    Without ``finetune_key`` and ``checkpoint`` this is the pipeline's plan for ``embed``.
    With one of them, the maps are built from that fine-tuned model: its output (copied into
    this store if it comes from another) replaces the catalog's ``finetune``.

    Args:
        catalog: the validated catalog.
        region: the region.
        finetune_key: a completed key under ``<workdir>/finetune/``.
        checkpoint: a file or the folder of a completed finetune output.
        stages: the target stages (default ``["embed"]``; add ``"downstream"`` to refit too).
        catalog_path: recorded in the plan.

    Raises:
        CatalogError: for a region without relevés (nothing fine-tuned to apply) or a key or
            checkpoint that names no completed finetune output.
    """
    targets = stages or ["embed"]
    plan = plan_region(catalog, region, targets, catalog_path=catalog_path)
    if finetune_key is None and checkpoint is None:
        return plan
    if FINETUNE not in plan.stages:
        raise CatalogError(
            f"region {region!r} has no relevés, so no fine-tuned model applies to it; "
            "regenerate it without a finetune key or checkpoint"
        )
    store = plan.store
    folder = finetune_folder(store, finetune_key=finetune_key, checkpoint=checkpoint)
    try:
        manifest = adopt_finetune(store, folder)
    except OSError as exc:
        raise StageError(
            f"could not copy the finetune output {folder} into {store.root}: {exc}"
        ) from exc
    return with_finetune(plan, manifest, targets)
