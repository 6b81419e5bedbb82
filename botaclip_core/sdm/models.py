"""Species distribution models as ecologists fit them: GLM, down-sampled RF, BRT, MaxEnt, ensemble.

Features should be on comparable scales (the GLMs are penalised): the downstream stage projects
embeddings with a standardised PCA, the benchmark standardises covariates. Every model is fitted
per species (or per abundance target) on a feature matrix and predicts a
score for new sites: a presence probability or relative suitability for presence/absence and
presence-only data, an expected abundance for counts. The libraries do the fitting:
scikit-learn (GLM, boosted trees; the trees of the down-sampled random forest of Valavi et al.
2022, in :mod:`botaclip_core.sdm.forest`: each tree draws as many background or absence points as
there are presences) and elapid (MaxEnt, the Python port of maxnet). The ensemble is the mean of its members' scores, each
rescaled to ranks by the distribution of its own predictions on the training data, so that it is
a fixed function of a site's features and can be mapped block by block.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger(__name__)

ModelName = Literal["glm", "rf", "brt", "maxent", "ensemble"]
MODEL_NAMES: tuple[ModelName, ...] = ("glm", "rf", "brt", "maxent", "ensemble")
#: Models of 0/1 data; abundance (counts) has no MaxEnt.
ABUNDANCE_MODELS: tuple[ModelName, ...] = ("glm", "rf", "brt", "ensemble")
#: The default, chosen by cross-validation on training data (README, "Species models").
DEFAULT_MODEL: ModelName = "ensemble"
#: Chosen with the default model (README, "Species models"): adding glm or MaxEnt lowered the
#: ensemble's AUC on the NCEAS Swiss data (training-data CV and test sites alike).
MemberName = Literal["glm", "rf", "brt", "maxent"]
ENSEMBLE_MEMBERS: tuple[MemberName, ...] = ("rf", "brt")
MaxentFeature = Literal["linear", "quadratic", "hinge", "product", "threshold"]
MAXENT_FEATURES: tuple[MaxentFeature, ...] = ("linear", "hinge", "product")

Kind = Literal["presence_absence", "presence_only", "abundance"]
_LIBLINEAR = threading.Lock()


class ModelParams(BaseModel):
    """Hyper-parameters of the species models (the catalog's ``downstream.model_params``)."""

    model_config = ConfigDict(extra="forbid")

    C: float = Field(0.1, gt=0, description="glm: inverse L2 strength of the logistic models.")
    alpha: float = Field(10.0, gt=0, description="glm: ridge strength of log(1 + abundance).")
    rf_trees: int = Field(500, ge=10, description="rf: trees of the down-sampled forest.")
    rf_min_leaf: int = Field(1, ge=1, description="rf: fewest samples in a leaf.")
    rf_max_features: int | None = Field(
        None,
        ge=1,
        description="rf: features tried per split of the presence/absence forest; None: the "
        "square root of their number (randomForest's default mtry).",
    )
    brt_iterations: int = Field(400, ge=10, description="brt: boosting iterations.")
    brt_learning_rate: float = Field(0.02, gt=0, le=1)
    brt_leaves: int = Field(6, ge=2, description="brt: most leaves per tree (gbm's depth 5).")
    brt_min_leaf: int = Field(10, ge=1, description="brt: fewest samples in a leaf.")
    brt_max_features: float = Field(
        0.5, gt=0, le=1, description="brt: share of features per split."
    )
    maxent_features: list[MaxentFeature] = Field(
        default_factory=lambda: list(MAXENT_FEATURES),
        description="maxent: feature classes (elapid's defaults).",
    )
    maxent_beta: float = Field(1.0, gt=0, description="maxent: regularisation multiplier.")
    ensemble_members: list[MemberName] = Field(
        default_factory=lambda: list(ENSEMBLE_MEMBERS),
        description="ensemble: the models averaged (by rank).",
    )
    n_jobs: int = Field(
        1,
        ge=1,
        description="Threads of the forest; not part of any result.",
        json_schema_extra={"runtime": True},
    )


class SpeciesModel(Protocol):
    """A fitted model of one species or target."""

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Score (probability, suitability or abundance) of each row of ``X``."""
        ...


class _Classifier:
    """A scikit-learn classifier reporting the presence probability."""

    def __init__(self, estimator: Any) -> None:
        self.estimator = estimator

    def fit(self, X: np.ndarray, y: np.ndarray) -> _Classifier:
        self.estimator.fit(X, y)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(self.estimator.predict_proba(X)[:, 1], dtype=float)


class _LogAbundance:
    """A regressor of log(1 + abundance) that predicts abundances."""

    def __init__(self, estimator: Any) -> None:
        self.estimator = estimator

    def fit(self, X: np.ndarray, y: np.ndarray) -> _LogAbundance:
        self.estimator.fit(X, np.log1p(y))
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.clip(np.expm1(np.asarray(self.estimator.predict(X), dtype=float)), 0.0, None)


class _Abundance:
    """A count regressor (Poisson loss) predicting abundances directly."""

    def __init__(self, estimator: Any) -> None:
        self.estimator = estimator

    def fit(self, X: np.ndarray, y: np.ndarray) -> _Abundance:
        self.estimator.fit(X, y)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.clip(np.asarray(self.estimator.predict(X), dtype=float), 0.0, None)


class _Maxent:
    """elapid's MaxentModel (maxnet), cloglog output; presences against background or absences."""

    def __init__(self, params: ModelParams, seed: int) -> None:
        import elapid

        self.estimator = elapid.MaxentModel(
            feature_types=list(params.maxent_features),
            beta_multiplier=params.maxent_beta,
            transform="cloglog",
            n_cpus=1,
            random_state=seed,
        )

    def fit(self, X: np.ndarray, y: np.ndarray) -> _Maxent:
        # liblinear draws from the C library's global rand(): fits in concurrent threads would
        # change each other's results
        with _LIBLINEAR, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # liblinear convergence chatter on hinge features
            self.estimator.fit(X, y)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(self.estimator.predict(X), dtype=float).ravel()


class EnsembleModel:
    """Mean of members' scores, each rank-rescaled by its own predictions on the training data.

    For abundance the members' predicted abundances are averaged instead (ranks have no scale).
    """

    def __init__(
        self,
        members: Mapping[str, SpeciesModel],
        training_scores: Mapping[str, np.ndarray],
        *,
        ranks: bool,
    ) -> None:
        self.members = dict(members)
        self.ranks = ranks
        self._reference = {
            k: np.sort(np.asarray(v, dtype=float)) for k, v in training_scores.items()
        }

    def combine(self, scores: Mapping[str, np.ndarray]) -> np.ndarray:
        """The ensemble score from members' scores on the same rows."""
        if not self.ranks:
            return np.mean([np.asarray(scores[m], dtype=float) for m in self.members], axis=0)
        rescaled = [
            np.searchsorted(self._reference[m], np.asarray(scores[m], dtype=float), "right")
            / len(self._reference[m])
            for m in self.members
        ]
        return np.mean(rescaled, axis=0)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """The ensemble score of each row of ``X``."""
        return self.combine({m: model.predict(X) for m, model in self.members.items()})


def _base_model(name: ModelName, kind: Kind, params: ModelParams, seed: int) -> Any:
    from sklearn.ensemble import (
        HistGradientBoostingClassifier,
        HistGradientBoostingRegressor,
        RandomForestRegressor,
    )
    from sklearn.linear_model import LogisticRegression, Ridge

    if kind == "abundance":
        if name == "glm":
            return _LogAbundance(Ridge(alpha=params.alpha))
        if name == "rf":
            return _LogAbundance(
                RandomForestRegressor(
                    n_estimators=params.rf_trees,
                    min_samples_leaf=max(params.rf_min_leaf, 3),
                    max_features="sqrt",
                    n_jobs=params.n_jobs,
                    random_state=seed,
                )
            )
        if name == "brt":
            return _Abundance(
                HistGradientBoostingRegressor(
                    loss="poisson",
                    learning_rate=params.brt_learning_rate,
                    max_iter=params.brt_iterations,
                    max_leaf_nodes=params.brt_leaves,
                    min_samples_leaf=params.brt_min_leaf,
                    max_features=params.brt_max_features,
                    l2_regularization=1.0,
                    early_stopping=False,
                    random_state=seed,
                )
            )
        raise ValueError(f"model {name!r} does not model abundances; use one of {ABUNDANCE_MODELS}")
    if name == "glm":
        return _Classifier(LogisticRegression(C=params.C, class_weight="balanced", max_iter=2000))
    if name == "rf":
        from botaclip_core.sdm.forest import DownsampledForest

        return _Classifier(
            DownsampledForest(
                params.rf_trees,
                min_samples_leaf=params.rf_min_leaf,
                max_features=params.rf_max_features or "sqrt",
                n_jobs=params.n_jobs,
                seed=seed,
            )
        )
    if name == "brt":
        return _Classifier(
            HistGradientBoostingClassifier(
                learning_rate=params.brt_learning_rate,
                max_iter=params.brt_iterations,
                max_leaf_nodes=params.brt_leaves,
                min_samples_leaf=params.brt_min_leaf,
                max_features=params.brt_max_features,
                l2_regularization=1.0,
                class_weight="balanced",
                early_stopping=False,
                random_state=seed,
            )
        )
    if name == "maxent":
        return _Maxent(params, seed)
    raise ValueError(f"unknown model {name!r}; use one of {MODEL_NAMES}")


def models_for(kind: Kind, names: Sequence[ModelName]) -> list[ModelName]:
    """The models of ``names`` that apply to ``kind`` (MaxEnt models no abundance)."""
    allowed = ABUNDANCE_MODELS if kind == "abundance" else MODEL_NAMES
    return [n for n in names if n in allowed]


def fit_models(
    names: Sequence[ModelName],
    kind: Kind,
    X: np.ndarray,
    y: np.ndarray,
    params: ModelParams,
    *,
    seed: int,
) -> dict[str, SpeciesModel]:
    """Fit each named model of one species on ``(X, y)``; an ensemble reuses fitted members.

    Args:
        names: models to fit; ``ensemble`` fits ``params.ensemble_members`` (once each, shared
            with the side-by-side models of the same name).
        kind: ``presence_absence`` and ``presence_only`` take 0/1 ``y`` (background or
            absences 0); ``abundance`` takes counts.
        X: features, one row per site.
        y: observations.
        params: hyper-parameters.
        seed: seeds every model, so that refits give the same scores.

    Returns:
        Fitted models by name, in the order of ``names``.
    """
    names = models_for(kind, names)
    members = [m for m in params.ensemble_members if kind != "abundance" or m != "maxent"]
    needed = list(
        dict.fromkeys(
            [n for n in names if n != "ensemble"] + (members if "ensemble" in names else [])
        )
    )
    fitted: dict[str, SpeciesModel] = {}
    for name in needed:
        fitted[name] = _base_model(name, kind, params, seed).fit(X, y)
    out: dict[str, SpeciesModel] = {n: fitted[n] for n in names if n != "ensemble"}
    if "ensemble" in names:
        chosen: dict[str, SpeciesModel] = {m: fitted[m] for m in members}
        training: dict[str, np.ndarray] = {m: model.predict(X) for m, model in chosen.items()}
        out["ensemble"] = EnsembleModel(chosen, training, ranks=kind != "abundance")
    return {n: out[n] for n in names}


def predict_models(models: Mapping[str, SpeciesModel], X: np.ndarray) -> dict[str, np.ndarray]:
    """Every model's scores on ``X``; an ensemble combines its members' scores computed once."""
    scores: dict[str, np.ndarray] = {}
    for name, model in models.items():
        if isinstance(model, EnsembleModel):
            continue
        scores[name] = model.predict(X)
    for name, model in models.items():
        if isinstance(model, EnsembleModel):
            member_scores = {
                m: scores[m] if m in scores and models.get(m) is member else member.predict(X)
                for m, member in model.members.items()
            }
            scores[name] = model.combine(member_scores)
    return {n: scores[n] for n in models}
