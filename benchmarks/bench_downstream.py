"""Species models on real benchmarks: NCEAS Switzerland and the butterflies of Great Britain.

Runs ``botaclip sdm-benchmark`` on ``../shared/realdata/disdat_swi`` (region SWI: presence-only
training records + background, scored on the independent presence/absence sites) with the
default model, ``glm`` and ``rf``, and a spatially blocked presence/absence evaluation of every
model on ``../shared/realdata/butterflies_gb`` (blocks of 0.2 in the data's rescaled coordinates,
about 200 km). Prints one JSON line with the mean AUC of each.

``--select`` instead runs the choice of the default model: spatially blocked cross-validation on
the SWI *training* data only (each species' presences against the background, 50 km blocks),
every model, and prints the mean held-out AUC of each. The test sites play no part in it.
``--params`` sets hyper-parameters (``ModelParams`` fields as JSON) of both runs, so that
candidate configurations are compared on the same folds; ``--models`` limits the models fitted.
``--target-group`` adds the SWI runs of the same models against a target-group background
(``sdm-benchmark --background target-group``) beside the benchmark's own.

    python benchmarks/bench_downstream.py [--realdata ../shared/realdata] [--select]
        [--species N] [--folds K] [--params '{"rf_min_leaf": 5}'] [--models rf,ensemble]
        [--target-group]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from botaclip_core.catalog import DownstreamSettings  # noqa: E402
from botaclip_core.downstream import (  # noqa: E402
    evaluate_presence_absence,
    evaluate_presence_only,
    fit_projector,
)
from botaclip_core.sdm.benchmark import load_benchmark  # noqa: E402
from botaclip_core.sdm.models import (  # noqa: E402
    DEFAULT_MODEL,
    MODEL_NAMES,
    ModelName,
    ModelParams,
)


def sdm_benchmark(
    folder: Path,
    region: str,
    model: str,
    out: Path,
    jobs: int,
    params: str | None,
    background: str = "given",
) -> dict:
    """The CLI entry point as a user runs it; its one JSON line."""
    cmd = [sys.executable, "-m", "flows.cli", "sdm-benchmark", str(folder), "--region", region]
    table = out / f"{region}-{model}-{background}.csv"
    cmd += ["--model", model, "--out", str(table), "--jobs", str(jobs)]
    cmd += ["--background", background]
    cmd += ["--params", params] if params else []
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def butterflies(folder: Path, jobs: int, params: ModelParams) -> dict[str, float]:
    """Every model on the 55 species, 200 km blocks, features the 4 projected covariates."""
    env = pd.read_csv(folder / "env.csv").to_numpy(float)
    pa = pd.read_csv(folder / "pa.csv")
    xy = pd.read_csv(folder / "xy.csv").to_numpy(float)
    settings = DownstreamSettings(model_params=params, jobs=jobs)
    X = fit_projector(env, settings).transform(env)
    by_model = evaluate_presence_absence(
        X, pa.to_numpy(float), xy, list(pa.columns), settings, block_size=0.2
    )
    return {m: round(s.metrics["auc"], 4) for m, s in by_model.items()}


def select(
    folder: Path,
    jobs: int,
    n_species: int,
    folds: int,
    params: ModelParams,
    models: list[ModelName],
) -> dict[str, float]:
    """Spatially blocked CV on the SWI training data: each model's mean held-out AUC."""
    bench = load_benchmark(folder, "SWI")
    po = pd.read_csv(folder / "SWItrain_po.csv")
    bg = pd.read_csv(folder / "SWItrain_bg.csv")
    settings = DownstreamSettings(model_params=params, jobs=jobs, folds=folds, models=models)
    aucs: dict[str, list[float]] = {m: [] for m in models}
    bg_xy = bg[["x", "y"]].to_numpy(float)
    for species, pres in sorted(bench.presences.items())[:n_species]:
        xy = po.loc[po["spid"].astype(str) == species, ["x", "y"]].to_numpy(float)
        by_model = evaluate_presence_only(
            pres,
            np.ones((len(pres), 1)),
            xy,
            bench.background,
            bg_xy,
            [species],
            settings,
            block_size=50_000,
        )
        for m, s in by_model.items():
            aucs[m].append(s.metrics["auc"])
        print(species, {m: round(v[-1], 3) for m, v in aucs.items()}, file=sys.stderr)
    return {m: round(float(np.mean(v)), 4) for m, v in aucs.items()}


def main() -> None:
    """Print one JSON line of figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--realdata", type=Path, default=ROOT.parent / "shared" / "realdata")
    parser.add_argument("--select", action="store_true", help="CV on training data only.")
    parser.add_argument("--jobs", type=int, default=2, help="Threads (forests, species).")
    parser.add_argument("--species", type=int, default=30, help="--select: the first N species.")
    parser.add_argument("--folds", type=int, default=5, help="--select: folds of the CV.")
    parser.add_argument("--params", help="ModelParams fields as JSON, e.g. '{\"rf_min_leaf\": 5}'.")
    parser.add_argument(
        "--models", default=",".join(MODEL_NAMES), help="--select: models, comma-separated."
    )
    parser.add_argument(
        "--target-group", action="store_true", help="Also SWI against a target-group background."
    )
    args = parser.parse_args()
    params = ModelParams.model_validate_json(args.params or "{}")
    swi = args.realdata / "disdat_swi"
    started = time.perf_counter()
    if args.select:
        result = {
            "cv_on_training_mean_auc": select(
                swi, args.jobs, args.species, args.folds, params, args.models.split(",")
            ),
            "species": args.species,
            "folds": args.folds,
            "params": json.loads(args.params or "{}"),
        }
    else:
        result: dict = {"swi": {}}
        with tempfile.TemporaryDirectory() as out:
            for model in dict.fromkeys([DEFAULT_MODEL, "glm", "rf"]):
                line = sdm_benchmark(swi, "SWI", model, Path(out), args.jobs, args.params)
                result["swi"][model] = {"mean_auc": line["mean_auc"], "seconds": line["seconds"]}
            for model in dict.fromkeys([DEFAULT_MODEL, "glm", "rf"] if args.target_group else []):
                line = sdm_benchmark(
                    swi, "SWI", model, Path(out), args.jobs, args.params, "target-group"
                )
                result.setdefault("swi_target_group", {})[model] = {
                    "mean_auc": line["mean_auc"],
                    "seconds": line["seconds"],
                }
        result["default_model"] = DEFAULT_MODEL
        result["butterflies_blocked_mean_auc"] = butterflies(
            args.realdata / "butterflies_gb", args.jobs, params
        )
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
