"""Benchmark the cohort simulator: episodes per second, and the cost of writing them.

    /work/venv/bin/python bench/bench_simulate.py [--sizes 10000 30000 100000] [--repeats 3]

Writes ``bench/results/simulate.md``: for each n, the median of ``--repeats`` runs of
``simulate_episodes`` (the whole structural model and the chunked 839-plan logging policy, in
memory), the same plus writing Parquet (what ``painplan simulate`` does), and the truth for the
default 2000 patients × 839 plans. Not a test: timings depend on the machine, which the table
names.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from features.io import write_table
from training.simulate import SimulatorConfig, simulate_episodes, simulate_truth

RESULTS = Path(__file__).resolve().parent / "results" / "simulate.md"


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _machine() -> str:
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if not cpu and cpuinfo.exists():  # platform.processor() is empty on most Linux builds
        names = [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else ""
    return (
        f"{platform.platform()}, {platform.machine()}, {cpu or 'unknown CPU'}, "
        f"os.cpu_count()={os.cpu_count()}, Python {platform.python_version()}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    config = SimulatorConfig.from_yaml()
    simulate_episodes(1000, seed=0, config=config, progress=False)  # warm imports and caches

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "episodes.parquet"
        for n in args.sizes:
            simulate = _median_seconds(
                lambda n=n: simulate_episodes(n, seed=7, config=config, progress=False),
                args.repeats,
            )
            written = _median_seconds(
                lambda n=n: write_table(
                    simulate_episodes(n, seed=7, config=config, progress=False), target
                ),
                args.repeats,
            )
            rows.append((n, simulate, n / simulate, written))
            print(
                f"n={n}: simulate {simulate:.2f} s ({n / simulate:,.0f} rows/s), + parquet {written:.2f} s"
            )
        truth = _median_seconds(
            lambda: simulate_truth(2000, seed=7, config=config, progress=False), args.repeats
        )
        print(f"truth 2000 × 839: {truth:.2f} s")

    lines = [
        "# Simulator benchmark",
        "",
        f"Machine: {_machine()}.",
        f"Median of {args.repeats} runs, seed 7, packaged `training/configs/simulator.yaml`; "
        "written by `bench/bench_simulate.py`.",
        "",
        f"| n episodes | simulate, s (median of {args.repeats}) | rows/s | simulate + write .parquet, s |",
        "|---:|---:|---:|---:|",
        *(f"| {n:,} | {s:.2f} | {rate:,.0f} | {w:.2f} |" for n, s, rate, w in rows),
        "",
        f"Truth for 2,000 patients × 839 plans (1,678,000 rows, in memory): {truth:.2f} s.",
        "",
        f"Load average before the run: {load} (the machine may be shared; timings are wall-clock).",
        "",
        "Requirement: 100k episodes in under 20 s on 2 cores.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
