"""The tiny demo with a light downstream stage, for tests of orchestration rather than metrics.

The tiny demo's downstream stage fits every species on six feature sources, three tasks, spatial
and random folds, with 100 bootstrap resamples per interval: 17 s of its 25 s on two cores. One
source, no random CV and no intervals take it to about 2 s. The full stage's rows and values
are what ``test_recorded_outputs``, ``test_downstream_stage`` and ``test_pipeline``'s module
fixture check.
"""

from __future__ import annotations

LIGHT_SOURCES = ("botaclip",)
LIGHT_DOWNSTREAM = {
    "downstream": {
        "feature_sources": list(LIGHT_SOURCES),
        "random_cv_models": [],
        "bootstrap": 0,
    }
}
