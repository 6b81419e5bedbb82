"""The down-sampled random forest of presence/background (or presence/absence) data.

Valavi et al. (2022) found it the best single method of the NCEAS benchmark: each tree is grown
on a sample drawn with replacement of as many background (or absence) points as there are
presences, plus as many presences, so that no tree sees the background's numbers.
imbalanced-learn's ``BalancedRandomForestClassifier`` does the same with a sampler object per
tree; growing scikit-learn trees on index draws directly is 2.4× faster on the small samples of a
downstream fold (measured 0.14 s against 0.33 s of CPU for 200 trees on 40 sites), and the
downstream stage grows thousands of forests.
"""

from __future__ import annotations

import numpy as np
from sklearn.tree import DecisionTreeClassifier


class DownsampledForest:
    """A forest of classification trees, each grown on a class-balanced bootstrap sample.

    Args:
        n_trees: trees in the forest.
        min_samples_leaf: fewest samples in a leaf.
        max_features: features tried per split (``"sqrt"`` as randomForest's ``mtry``).
        n_jobs: threads growing trees (trees release the GIL).
        seed: seeds the samples and the trees.
    """

    def __init__(
        self,
        n_trees: int = 500,
        *,
        min_samples_leaf: int = 1,
        max_features: str | int | float = "sqrt",
        n_jobs: int = 1,
        seed: int = 0,
    ) -> None:
        self.n_trees = n_trees
        self.min_samples_leaf = min_samples_leaf
        self.max_features = max_features
        self.n_jobs = n_jobs
        self.seed = seed
        self.trees_: list[DecisionTreeClassifier] = []

    def fit(self, X: np.ndarray, y: np.ndarray) -> DownsampledForest:
        """Grow the trees on ``X`` (sites × features) and 0/1 ``y``."""
        y = np.asarray(y).astype(int)
        presences, others = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
        if not len(presences) or not len(others):
            raise ValueError("a down-sampled forest needs both presences and absences/background")
        n = min(len(presences), len(others))
        rng = np.random.default_rng(self.seed)
        draws = [
            (
                np.concatenate([rng.choice(presences, n), rng.choice(others, n)]),
                int(rng.integers(0, 2**31 - 1)),
            )
            for _ in range(self.n_trees)
        ]
        X = np.ascontiguousarray(X, dtype=np.float32)
        if not np.isfinite(X).all():
            raise ValueError("features hold NaN or infinite values")
        labels = y.astype(np.float64)

        def grow(draw: tuple[np.ndarray, int]) -> DecisionTreeClassifier:
            index, seed = draw
            tree = DecisionTreeClassifier(
                max_features=self.max_features,
                min_samples_leaf=self.min_samples_leaf,
                random_state=seed,
            )
            # the arrays are checked once above: scikit-learn's per-call validation was half of
            # the stage's time (measured 27 s of 82 s for 21,250 trees on the tiny demo)
            return tree.fit(X[index], labels[index], check_input=False)

        if self.n_jobs > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(self.n_jobs) as pool:
                self.trees_ = list(pool.map(grow, draws))
        else:
            self.trees_ = [grow(d) for d in draws]
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Mean over trees of the leaf's class shares: ``(n, 2)``, presence in column 1."""
        X = np.ascontiguousarray(X, dtype=np.float32)
        p = np.zeros(len(X))
        for tree in self.trees_:
            # every tree saw both classes (both are drawn), so column 1 is the presence
            p += tree.predict_proba(X, check_input=False)[:, 1]
        p /= len(self.trees_)
        return np.column_stack([1 - p, p])
