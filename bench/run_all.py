"""Every benchmark in ``bench/``, one after another, then one table of their figures.

Each script runs as its own process with ``UWS_BENCH_JSON`` naming a shared file, where it
appends one JSON line per figure (``bench/harness.py``: ``emit``); its own output streams
through. The table at the end lists every figure (ratios, percentiles, rates, counts) by
benchmark, then how each script ended. Exit status 2 from a script means it refused to run
here (``slurm_latency`` without Slurm, ``copy_throughput`` without 4 GiB free): reported as
skipped, not as a failure. A script absent from ``bench/`` is left out.

    .venv/bin/python bench/run_all.py [--quick] [--only load,api_throughput]

``--quick`` passes short settings to each script (a check that everything runs, not
figures to quote).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SKIPPED = 2

# name -> (arguments for `make bench`, arguments for --quick)
SCRIPTS: dict[str, tuple[list[str], list[str]]] = {
    "api_throughput": ([], ["--duration", "3"]),
    "jobs_latency": ([], ["--jobs", "5", "--concurrent", "20", "--hold", "15",
                          "--window", "5"]),
    "copy_throughput": ([], ["--rounds", "1", "--total-mib", "64", "--files", "500"]),
    "passthrough": ([], ["--duration", "3"]),
    "load": (["--duration", "60"], ["--users", "10", "--duration", "20"]),
    "slurm_latency": ([], ["--jobs", "3"]),
    "slurm_session": ([], ["--sessions", "1"]),
    "start_rate": ([], ["--clients", "10", "--duration", "10"]),
    "launch_failure": ([], ["--jobs", "3"]),
}


@dataclass
class Outcome:
    name: str
    code: int
    seconds: float

    @property
    def verdict(self) -> str:
        if self.code == 0:
            return "ok"
        return "skipped (refused to run here)" if self.code == SKIPPED else f"FAILED ({self.code})"


def run_script(name: str, args: list[str], json_path: Path) -> Outcome:
    print(f"\n===== {name} {' '.join(args)}", flush=True)
    began = time.monotonic()
    env = {**os.environ, "UWS_BENCH_JSON": str(json_path)}
    code = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), *args],
                          cwd=BENCH.parent, env=env).returncode
    return Outcome(name, code, time.monotonic() - began)


def read_figures(path: Path) -> list[dict]:
    figures = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            figure = json.loads(line)
        except ValueError:
            continue
        if isinstance(figure, dict) and {"bench", "metric", "value", "unit"} <= figure.keys():
            figures.append(figure)
    return figures


def fmt(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return f"{int(value)}"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def print_table(figures: list[dict], outcomes: list[Outcome]) -> None:
    width = max([len(f["metric"]) for f in figures] + [20])
    print(f"\n{'bench':<16} {'metric':<{width}} {'value':>10}  unit")
    print("-" * (16 + width + 20))
    for figure in figures:  # in the order the scripts wrote them
        print(f"{figure['bench']:<16} {figure['metric']:<{width}} "
              f"{fmt(figure['value']):>10}  {figure['unit']}")
    print()
    for outcome in outcomes:
        print(f"{outcome.name:<16} {outcome.verdict:<30} {outcome.seconds:6.0f} s")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short settings for each script")
    parser.add_argument("--only", default="", help="comma-separated script names")
    args = parser.parse_args()
    args.only = [n for n in args.only.split(",") if n]
    unknown = set(args.only) - set(SCRIPTS)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    return args


def main() -> int:
    args = parse_args()
    names = [n for n in SCRIPTS if (not args.only or n in args.only)
             and (BENCH / f"{n}.py").exists()]
    with tempfile.TemporaryDirectory(prefix="uws-bench-all-") as tmp:
        json_path = Path(tmp) / "figures.jsonl"
        json_path.touch()
        outcomes = []
        for name in names:
            full, quick = SCRIPTS[name]
            outcomes.append(run_script(name, quick if args.quick else full, json_path))
        print_table(read_figures(json_path), outcomes)
    return 1 if any(o.code not in (0, SKIPPED) for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
