"""Training cost: wall time and peak memory of ``painplan train`` (fit + evaluate + log +
register) for growing numbers of simulated episodes.

    .venv/bin/python bench/bench_training.py [--sizes 10000 100000 1000000]

Each size runs in a fresh subprocess (so peak RSS is that run's own) against a throw-away
MLflow store, exactly as a data scientist would run it. Writes
``bench/results/training.md`` and a log-log plot ``bench/results/training.png``.
Goals (issues 3 and 7): ≤ 2 min and < 4 GiB at 100k; roughly linear growth.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _one(n: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "episodes.parquet"
        env = {**os.environ, "PAINPLAN_HOME": str(Path(tmp) / "home")}
        env.pop("MLFLOW_TRACKING_URI", None)
        subprocess.run([sys.executable, "-m", "training.cli", "simulate", "--n", str(n),
                        "--seed", "3", "--out", str(data)], check=True, env=env,
                       capture_output=True)
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "training.cli", "train", "--data", str(data)],
                              env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if proc.returncode != 0:
            raise SystemExit(f"train failed for n={n}: {proc.stderr[-2000:]}")
    # ru_maxrss of children is the max over all children so far: runs go smallest first, so
    # a larger run's peak is its own unless an earlier one was larger.
    return {"n": n, "seconds": seconds, "peak_gib": max(peak_kib, before) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    args = parser.parse_args()
    rows = []
    for n in sorted(args.sizes):
        row = _one(n)
        rows.append(row)
        print(f"n={n}: {row['seconds']:.1f} s, peak {row['peak_gib']:.2f} GiB", flush=True)
    lines = ["# Training cost (simulate → `painplan train`: validate, fit, evaluate, log, register)",
             "", f"Machine: {platform.platform()}, {os.cpu_count()} cores, Python "
             f"{platform.python_version()}. One run per size (each minutes long).", "",
             "| episodes | wall time (s) | peak RSS (GiB) | s per 10k episodes |",
             "|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['n']:,} | {r['seconds']:.1f} | {r['peak_gib']:.2f} | "
                     f"{10_000 * r['seconds'] / r['n']:.2f} |")
    lines += ["", "Goal: ≤ 120 s and < 4 GiB at 100k episodes, roughly linear growth.", "",
              "Rerun: `.venv/bin/python bench/bench_training.py --sizes 10000 100000 1000000`"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "training.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if len(rows) >= 2:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 4))
        ns = [r["n"] for r in rows]
        ax.loglog(ns, [r["seconds"] for r in rows], marker="o", label="measured")
        ax.loglog(ns, [rows[0]["seconds"] * n / ns[0] for n in ns], ls="--", c="grey",
                  label="linear from smallest")
        ax.set(xlabel="episodes", ylabel="wall time (s)", title="painplan train")
        ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / "training.png", dpi=120)
    print(f"wrote {RESULTS / 'training.md'}")


if __name__ == "__main__":
    main()
