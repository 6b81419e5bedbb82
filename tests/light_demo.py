"""The tiny demo with a light downstream stage, for tests of orchestration rather than metrics.

The tiny demo's downstream stage fits every species on six feature sources, three tasks, spatial
and random folds, with 100 bootstrap resamples per interval: 17 s of its 25 s on two cores. One
source, no random CV and no intervals take it to about 2 s. The full stage's rows and values
are what ``test_recorded_outputs``, ``test_downstream_stage`` and ``test_pipeline``'s module
fixture check.
"""

from __future__ import annotations

from pathlib import Path

LIGHT_SOURCES = ("botaclip",)
LIGHT_DOWNSTREAM = {
    "downstream": {
        "feature_sources": list(LIGHT_SOURCES),
        "random_cv_models": [],
        "bootstrap": 0,
    }
}


def tiny_demo(root: Path) -> Path:
    """The tiny demo region under ``root`` with the light downstream stage; returns its catalog."""
    from botaclip_core.demo import write_demo_region

    return write_demo_region(root, size="tiny", catalog_overrides=LIGHT_DOWNSTREAM)
