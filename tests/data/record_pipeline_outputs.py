"""Record the tiny demo's outputs (every variant) as the reference for test_recorded_outputs.

Run from the repository root: ``.venv/bin/python tests/data/record_pipeline_outputs.py``.
Recorded from the code before the stages refactor (issue 8); rerun only when a change of
outputs is intended, and say why in the commit. ``--only-downstream`` rewrites the metric rows
alone, for this machine's CPU kind, and keeps every recorded array and digest (done for
issues 11 and 12: five models, variogram-sized blocks, folds balanced in presences, the spectral
source, covariates, test sets). Metric rows are kept per CPU kind: record them on each kind.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline_outputs import VARIANTS, cpu_kind, run_variant, summarize  # noqa: E402

OUT = Path(__file__).resolve().parent / "golden"


def main() -> None:
    only_downstream = "--only-downstream" in sys.argv[1:]
    OUT.mkdir(exist_ok=True)
    recorded = OUT / "pipeline_outputs.json"
    infos = json.loads(recorded.read_text()) if only_downstream else {}
    for name in VARIANTS:
        with tempfile.TemporaryDirectory() as tmp:
            report = run_variant(Path(tmp), name)
            info, arrays = summarize(Path(tmp), report)
        rows = info.pop("downstream")
        if only_downstream:
            infos[name].setdefault("downstream_by_cpu", {})[cpu_kind()] = rows
            print(name, len(rows), "metric rows for", cpu_kind())
            continue
        infos[name] = info | {"downstream_by_cpu": {cpu_kind(): rows}}
        np.savez_compressed(OUT / f"{name}.npz", **arrays)
        print(name, info["stages"], {k: v.shape for k, v in arrays.items()})
    recorded.write_text(json.dumps(infos, indent=1) + "\n")


if __name__ == "__main__":
    main()
