"""`botaclip sdm-benchmark`: the species models and metrics on an NCEAS-style benchmark."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from botaclip_core.errors import BotaclipError, InputDataError
from botaclip_core.sdm.models import DEFAULT_MODEL, MODEL_NAMES


def sdm_benchmark(
    folder: Annotated[
        Path, typer.Argument(help="Folder of NAMEtrain_po/train_bg/test_pa/test_env CSV files.")
    ],
    region: Annotated[str, typer.Option(help="Region name: the files' prefix, e.g. SWI.")],
    categorical: Annotated[
        str | None, typer.Option(help="Categorical covariates, comma-separated (one-hot).")
    ] = None,
    model: Annotated[str, typer.Option(help=f"One of {', '.join(MODEL_NAMES)}.")] = DEFAULT_MODEL,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Per-species table (.csv or .parquet); default ./sdm-<region>-<model>.csv."
        ),
    ] = None,
    background: Annotated[
        str,
        typer.Option(
            help="given: NAMEtrain_bg.csv (the benchmark's protocol); target-group: those "
            "points plus the other species' presence sites of the same group (Phillips et al. "
            "2009)."
        ),
    ] = "given",
    seed: Annotated[int, typer.Option(help="Seed of every model.")] = 0,
    jobs: Annotated[int, typer.Option(help="Threads of the random forest.")] = 1,
    params: Annotated[
        str | None,
        typer.Option(
            help="Model hyper-parameters as JSON (ModelParams fields), e.g. '{\"rf_min_leaf\": 5}'."
        ),
    ] = None,
) -> None:
    """Train per species on presences + background, score on the independent test sites.

    Prints one JSON line: region, model, n_species, mean_auc, mean_cor, seconds.
    """
    from pydantic import ValidationError

    from botaclip_core.sdm.benchmark import BACKGROUNDS, load_benchmark, run_benchmark
    from botaclip_core.sdm.models import ModelParams
    from flows.cli import _fail

    logging.getLogger("botaclip_core").setLevel(logging.WARNING)
    try:
        if model not in MODEL_NAMES:
            raise InputDataError(f"--model {model!r}: unknown; use one of {', '.join(MODEL_NAMES)}")
        if background not in BACKGROUNDS:
            raise InputDataError(
                f"--background {background!r}: unknown; use one of {', '.join(BACKGROUNDS)}"
            )
        cats = [c.strip() for c in categorical.split(",") if c.strip()] if categorical else []
        try:
            chosen = ModelParams.model_validate_json(params or "{}").model_copy(
                update={"n_jobs": jobs}
            )
        except ValidationError as exc:
            raise InputDataError(f"--params: {exc}") from exc
        bench = load_benchmark(folder, region, categorical=cats)
        summary, table = run_benchmark(
            bench,
            model,  # type: ignore[arg-type]
            chosen,
            seed=seed,
            background=background,  # type: ignore[arg-type]
        )
        suffix = "" if background == "given" else f"-{background}"
        path = out or Path.cwd() / f"sdm-{region}-{model}{suffix}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".parquet":
            table.to_parquet(path, index=False)
        else:
            table.to_csv(path, index=False)
    except BotaclipError as exc:
        _fail(exc)
    print(json.dumps(summary))  # plain print: one JSON line for scripts, never wrapped
