"""`botaclip sdm-benchmark` on NCEAS-layout folders: the real Swiss data and constructed cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from botaclip_core.sdm.benchmark import load_benchmark, run_benchmark
from botaclip_core.sdm.models import ModelParams
from flows.cli import app

META = ["siteid", "spid", "x", "y", "occ", "group"]


def _subset(realdata: Path, out: Path, *, species: list[str], n_bg: int, n_test: int) -> Path:
    """A smaller SWI region (the real tables, fewer rows) with a categorical covariate added.

    ``soil`` is a made-up class of the ``calc`` covariate (0/1 in the data) crossed with the
    sign of ``topo``: four levels as strings, as categorical columns arrive in CSV files.
    """
    src = realdata / "disdat_swi"
    po = pd.read_csv(src / "SWItrain_po.csv")
    bg = pd.read_csv(src / "SWItrain_bg.csv").iloc[:n_bg]
    rows = np.sort(np.random.default_rng(0).permutation(10013)[:n_test])  # sites seeded at random
    pa = pd.read_csv(src / "SWItest_pa.csv").iloc[rows]
    env = pd.read_csv(src / "SWItest_env.csv").iloc[rows]
    po = po[po["spid"].isin(species)]

    def soil(frame: pd.DataFrame) -> pd.Series:
        return "c" + frame["calc"].astype(str) + np.where(frame["topo"] > 0, "-up", "-down")

    for frame in (po, bg, env):
        frame["soil"] = soil(frame)
    pa = pa[["group", "siteid", "x", "y", *species]]
    out.mkdir()
    po.to_csv(out / "SUBtrain_po.csv", index=False)
    bg.to_csv(out / "SUBtrain_bg.csv", index=False)
    pa.to_csv(out / "SUBtest_pa.csv", index=False)
    env.to_csv(out / "SUBtest_env.csv", index=False)
    return out


@pytest.fixture(scope="module")
def subset(realdata, tmp_path_factory):
    return _subset(
        realdata,
        tmp_path_factory.mktemp("sdm") / "sub",
        species=["swi01", "swi02", "swi12"],
        n_bg=3000,
        n_test=4000,
    )


def test_glm_benchmark_equals_scikit_learn_by_hand(subset, tmp_path, monkeypatch):
    # the CLI as a user runs it, from another folder: one JSON line, the table in the cwd
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in subset.iterdir())
    result = CliRunner().invoke(
        app,
        [
            "sdm-benchmark",
            str(subset),
            "--region",
            "SUB",
            "--model",
            "glm",
            "--categorical",
            "soil",
        ],
    )
    assert result.exit_code == 0, result.output
    line = json.loads(result.output.strip().splitlines()[-1])
    assert set(line) == {"region", "model", "n_species", "mean_auc", "mean_cor", "seconds"}
    assert (line["region"], line["model"], line["n_species"]) == ("SUB", "glm", 3)
    assert sorted(p.name for p in subset.iterdir()) == before  # nothing written into DIR
    table = pd.read_csv(tmp_path / "sdm-SUB-glm.csv")
    assert list(table["species"]) == ["swi01", "swi02", "swi12"]

    # by hand: the training columns the test table also has, soil one-hot (pandas), z-scores of
    # the training data, balanced L2 logistic regression (C 0.1), AUC on the test sites
    po = pd.read_csv(subset / "SUBtrain_po.csv")
    bg = pd.read_csv(subset / "SUBtrain_bg.csv")
    env = pd.read_csv(subset / "SUBtest_env.csv")
    pa = pd.read_csv(subset / "SUBtest_pa.csv")
    covariates = [c for c in po.columns if c not in META]
    train = pd.get_dummies(pd.concat([po, bg])[covariates], columns=["soil"], dtype=float)
    test = pd.get_dummies(env[covariates], columns=["soil"], dtype=float)[train.columns]
    mean, sd = train.to_numpy().mean(0), train.to_numpy().std(0)
    aucs, cors = [], []
    for species in ["swi01", "swi02", "swi12"]:
        Xp = train.iloc[: len(po)][po["spid"].to_numpy() == species].to_numpy()
        X = (np.vstack([Xp, train.iloc[len(po) :].to_numpy()]) - mean) / sd
        y = np.r_[np.ones(len(Xp)), np.zeros(len(bg))]
        clf = LogisticRegression(C=0.1, class_weight="balanced", max_iter=2000).fit(X, y)
        score = clf.predict_proba((test.to_numpy() - mean) / sd)[:, 1]
        aucs.append(roc_auc_score(pa[species], score))
        cors.append(np.corrcoef(pa[species], score)[0, 1])
    np.testing.assert_allclose(table["auc"], aucs, atol=1e-9)
    assert line["mean_auc"] == pytest.approx(np.mean(aucs), abs=5e-5)
    assert line["mean_cor"] == pytest.approx(np.mean(cors), abs=5e-5)


def test_categorical_levels_one_hot_and_unknown_columns_named(subset):
    bench = load_benchmark(subset, "SUB", categorical=["soil"])
    assert [c for c in bench.covariates if c.startswith("soil=")] == [
        "soil=c0-down",
        "soil=c0-up",
        "soil=c1-down",
        "soil=c1-up",
    ]
    assert "soil" not in bench.covariates and len(bench.covariates) == 13 + 4
    from botaclip_core.errors import InputDataError

    with pytest.raises(InputDataError, match="--categorical vegsys: not a covariate"):
        load_benchmark(subset, "SUB", categorical=["vegsys"])
    with pytest.raises(InputDataError, match="NOPEtrain_po.csv: file not found"):
        load_benchmark(subset, "NOPE")


@pytest.mark.slow  # 29 s; every model on the demo runs in test_downstream_stage.py
def test_every_model_scores_every_species_and_reruns_equal(subset):
    bench = load_benchmark(subset, "SUB", categorical=["soil"])
    params = ModelParams(rf_trees=60, brt_iterations=60)
    for model in ("rf", "brt", "maxent", "ensemble"):
        summary, table = run_benchmark(bench, model, params, seed=0)
        assert summary["n_species"] == 3 and table["auc"].notna().all(), model
        # measured: swi01 0.83–0.85, swi02 0.72–0.75 (swi12 has 10 test presences: 0.46–0.51)
        auc = dict(zip(table["species"], table["auc"], strict=True))
        assert auc["swi01"] > 0.8 and auc["swi02"] > 0.7, (model, auc)
        again, _ = run_benchmark(bench, model, params, seed=0)
        assert again["mean_auc"] == summary["mean_auc"], model


def test_bad_folder_is_one_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["sdm-benchmark", str(tmp_path), "--region", "SWI"])
    assert result.exit_code != 0
    assert "SWItrain_po.csv: file not found" in result.output
    assert "Traceback" not in result.output


def test_params_reach_the_forest_and_bad_params_are_one_clear_error(subset, tmp_path):
    from botaclip_core.sdm.models import fit_models

    bench = load_benchmark(subset, "SUB", categorical=["soil"])
    X = np.vstack([bench.presences["swi01"], bench.background])
    y = np.r_[np.ones(len(bench.presences["swi01"])), np.zeros(len(bench.background))]
    params = ModelParams(rf_trees=10, rf_max_features=2, rf_min_leaf=4)
    forest = fit_models(["rf"], "presence_only", X, y, params, seed=0)["rf"].estimator  # type: ignore[attr-defined]
    assert {(t.max_features, t.min_samples_leaf) for t in forest.trees_} == {(2, 4)}
    default = fit_models(["rf"], "presence_only", X, y, ModelParams(rf_trees=10), seed=0)["rf"]
    assert {t.max_features for t in default.estimator.trees_} == {"sqrt"}  # type: ignore[attr-defined]

    cli = [
        "sdm-benchmark",
        str(subset),
        "--region",
        "SUB",
        "--model",
        "rf",
        "--categorical",
        "soil",
    ]
    out = ["--out", str(tmp_path / "rf.csv")]
    result = CliRunner().invoke(app, [*cli, *out, "--params", '{"rf_trees": 10, "rf_min_leaf": 3}'])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["model"] == "rf"
    result = CliRunner().invoke(app, [*cli, *out, "--params", '{"rf_leaves": 3}'])
    assert result.exit_code != 0
    assert "--params" in result.output and "rf_leaves" in result.output
    assert "Traceback" not in result.output


def test_text_covariate_not_named_categorical_is_one_clear_error(subset):
    from botaclip_core.errors import InputDataError

    with pytest.raises(InputDataError, match="covariate soil has no numeric value"):
        load_benchmark(subset, "SUB")


def test_target_group_background_by_hand(subset, tmp_path):
    # the reference: pandas on the CSV rows. swi12 is moved to another group, so swi01's
    # target-group background is the sites of swi01 and swi02, once each
    region = tmp_path / "tg"
    region.mkdir()
    for f in subset.iterdir():
        (region / f.name).write_bytes(f.read_bytes())
    po = pd.read_csv(region / "SUBtrain_po.csv")
    po.loc[po["spid"] == "swi12", "group"] = "shrub"
    po.to_csv(region / "SUBtrain_po.csv", index=False)
    bg = pd.read_csv(region / "SUBtrain_bg.csv")
    bench = load_benchmark(region, "SUB", categorical=["soil"])

    covariates = [c for c in po.columns if c not in META]
    train = pd.get_dummies(pd.concat([po, bg])[covariates], columns=["soil"], dtype=float)
    z = (train.to_numpy() - train.to_numpy().mean(0)) / train.to_numpy().std(0)
    sites = po[po["spid"].isin(["swi01", "swi02"])].drop_duplicates("siteid")
    expected = z[: len(po)][sites.index.to_numpy()]
    got = bench.background_for("swi01", "target-group")
    shared = po["siteid"][po["spid"] == "swi01"].isin(po["siteid"][po["spid"] == "swi02"])
    assert shared.sum() > 50 and got.shape == expected.shape  # shared sites counted once
    np.testing.assert_allclose(
        got[np.lexsort(got.T)], expected[np.lexsort(expected.T)], rtol=0, atol=1e-12
    )
    assert bench.background_for("swi01") is bench.background  # the benchmark's own points
    from botaclip_core.errors import InputDataError

    with pytest.raises(InputDataError, match="'swi12' is the only species of group 'shrub'"):
        bench.background_for("swi12", "target-group")

    whole = load_benchmark(subset, "SUB", categorical=["soil"])  # one group: tree
    summary, table = run_benchmark(whole, "glm", seed=0, background="target-group")
    assert set(table["n_background"]) == {po["siteid"].nunique()}
    assert set(table["background"]) == {"target-group"}
    given, _ = run_benchmark(whole, "glm", seed=0)
    assert summary["mean_auc"] != given["mean_auc"]

    result = CliRunner().invoke(
        app,
        [
            "sdm-benchmark",
            str(region),
            "--region",
            "SUB",
            "--categorical",
            "soil",
            "--background",
            "sampled",
        ],
    )
    assert result.exit_code != 0
    assert "--background 'sampled': unknown; use one of given, target-group" in result.output
    assert "Traceback" not in result.output
