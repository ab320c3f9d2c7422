"""The machine-readable side of every benchmark: when ``UWS_BENCH_JSON`` names a file,
each figure a script prints is also appended there as one JSON line
``{"bench", "metric", "value", "unit"}`` (``bench/run_all.py`` collects them)."""

from __future__ import annotations

import json
import math
import os

ENV = "UWS_BENCH_JSON"


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (p50 of 40 values is the 20th smallest), one definition for
    every figure the benchmarks print."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def emit(bench: str, metric: str, value: float, unit: str) -> None:
    """Append one figure; nothing when ``UWS_BENCH_JSON`` is unset or the value is not a
    finite number (a phase that did not run)."""
    path = os.environ.get(ENV)
    if not path or not isinstance(value, int | float) or not math.isfinite(value):
        return
    line = json.dumps({"bench": bench, "metric": metric, "value": value, "unit": unit})
    with open(path, "a", encoding="utf-8") as out:
        out.write(line + "\n")
