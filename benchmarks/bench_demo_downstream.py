"""The downstream stage of the default-size demo: its wall time and where the time goes.

Issue 11 asks the downstream stage of the default demo to stay within about 3 minutes on two
cores. The stages before it run once (cached under ``--work``; the tiny DOFA configuration keeps
them short, the downstream stage sees the same sites, sources and models as with DOFA-Base),
then the downstream stage runs again from scratch, timed. With ``--jobs 1`` every species is
fitted in this process and every model fit is timed in CPU seconds, so the figures say which
model and task cost what (the stage's worker processes, by default, are not timed per model).

Prints one JSON line: ``seconds`` (the stage's wall time), ``goal_s`` (180), the CPU seconds of
each model's fits and predictions, and the stage's own record of rows.

    python benchmarks/bench_demo_downstream.py [--work /tmp/botaclip-demo-bench] [--jobs 1] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import shutil
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from botaclip_core.catalog import load_catalog  # noqa: E402
from botaclip_core.demo.generate import write_demo_region  # noqa: E402
from botaclip_core.pipeline import run_region  # noqa: E402
from botaclip_core.sdm import models  # noqa: E402

GOAL_S = 180.0
_cpu: dict[str, float] = defaultdict(float)
_lock = threading.Lock()


class _Timed:
    """A species model whose fit and predict add their thread's CPU time to its name."""

    def __init__(self, name: str, inner: Any) -> None:
        self.name, self.inner = name, inner

    def _time(self, call: Any, *args: Any) -> Any:
        start = time.thread_time()
        out = call(*args)
        with _lock:
            _cpu[self.name] += time.thread_time() - start
        return out

    def fit(self, X: Any, y: Any) -> _Timed:
        self._time(self.inner.fit, X, y)
        return self

    def predict(self, X: Any) -> Any:
        return self._time(self.inner.predict, X)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/botaclip-demo-bench"))
    parser.add_argument("--jobs", type=int, default=None, help="downstream.jobs (1: per-model CPU)")
    parser.add_argument(
        "--profile", action="store_true", help="cProfile of the main thread, to stderr"
    )
    args = parser.parse_args()
    tiny_dofa = {"model": {"dofa": {"size": "tiny"}}}
    catalog_path = write_demo_region(args.work, size="default", catalog_overrides=tiny_dofa)
    jobs = {"downstream": {"jobs": args.jobs}} if args.jobs else None
    catalog = load_catalog(catalog_path, jobs)
    upstream = ["tile", "rasterize", "features", "finetune", "embed-dofa", "embed"]
    started = time.perf_counter()
    run_region(catalog, "demo", stages=upstream, catalog_path=catalog_path)
    upstream_s = time.perf_counter() - started
    shutil.rmtree(catalog.workdir_path / "downstream", ignore_errors=True)

    base = models._base_model

    def timed(name: Any, kind: Any, params: Any, seed: int) -> _Timed:
        return _Timed(f"{kind}/{name}", base(name, kind, params, seed))

    models._base_model = timed  # type: ignore[assignment]
    profile = cProfile.Profile() if args.profile else None
    started = time.perf_counter()
    if profile:
        profile.enable()
    report = run_region(catalog, "demo", stages=["downstream"], catalog_path=catalog_path)
    seconds = time.perf_counter() - started
    if profile:
        profile.disable()
        pstats.Stats(profile, stream=sys.stderr).sort_stats("cumulative").print_stats(40)
    stage = report["stages"]["downstream"]
    print(
        json.dumps(
            {
                "seconds": round(seconds, 1),
                "goal_s": GOAL_S,
                "stage_status": stage["status"],
                "upstream_s": round(upstream_s, 1),
                "fit_cpu_s": {k: round(v, 1) for k, v in sorted(_cpu.items())},
                "fit_cpu_total_s": round(sum(_cpu.values()), 1),
                "rows": len(report["downstream"]),
            }
        )
    )


if __name__ == "__main__":
    main()
