"""Training cost: wall time and peak memory of ``painplan train`` (validate, fit, evaluate, log
to MLflow, register) for growing numbers of simulated episodes.

    /work/venv/bin/python bench/bench_training.py [--sizes 10000 100000 1000000] [--timeout 5400]

Each size runs ``painplan simulate`` and then ``painplan train`` in fresh subprocesses against a
throw-away MLflow store (SQLite + artifacts in a temporary ``PAINPLAN_HOME``), exactly as a data
scientist would run them. Measured per run:

* wall time of ``painplan train`` (simulation excluded), split into stages by time-stamping the
  progress lines ``painplan train`` prints on stderr;
* **peak memory of that run alone**: the kernel's high-water RSS of the train process, read
  with ``os.wait4`` on that child (not ``RUSAGE_CHILDREN``, which is a maximum over every child
  so far), cross-checked by polling the RSS of its whole process tree every 50 ms (psutil);
* the 1-minute load average before and during the run (the machine may be shared).

Writes ``bench/results/training.md`` (+ ``training.json``) and a log-log plot
``bench/results/training.png``. Goals: ≤ 2 min and < 4 GiB at 100k episodes; roughly linear
growth. A size whose run exceeds ``--timeout`` seconds is reported as such, not dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]

# Progress lines of `painplan train` (training/pipeline.py, model.py, evaluate.py) that open a
# stage; everything until the next opener belongs to it.
STAGES = (
    ("start-up", None),  # interpreter, imports, CLI set-up: until the first progress line
    ("validate + split", "validating "),
    ("fit", "fitting the logging-policy and baseline-outcome"),
    ("evaluate", "evaluating on the held-out"),
    ("log + register", "logging the run to MLflow"),
)


def _stage_of(line: str) -> str | None:
    text = line.removeprefix("painplan: ")
    for name, prefix in STAGES:
        if prefix and text.startswith(prefix):
            return name
    return None


class _TreePeak(threading.Thread):
    """Polls the summed RSS of a process and its descendants; keeps the maximum."""

    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak = pid, interval, 0
        self.loads: list[float] = []
        self._halt = threading.Event()

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        last_load = 0.0
        while not self._halt.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                rss = 0
                for p in procs:
                    try:
                        rss += p.memory_info().rss
                    except psutil.NoSuchProcess:
                        pass
                self.peak = max(self.peak, rss)
            except psutil.NoSuchProcess:
                break
            now = time.monotonic()
            if now - last_load >= 5:
                self.loads.append(os.getloadavg()[0])
                last_load = now
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=2)


def _run_train(cmd: list[str], env: dict, log_path: Path, timeout: float) -> dict:
    """Run ``cmd``; return seconds, exit status, own peak RSS (wait4), tree peak, stage times."""
    marks: list[tuple[float, str]] = []
    with log_path.open("w", encoding="utf-8") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.PIPE, text=True,
                                cwd=REPO)
        poll = _TreePeak(proc.pid)
        poll.start()

        def read_stderr() -> None:
            for line in proc.stderr:
                log.write(line)
                marks.append((time.perf_counter() - started, line.strip()))

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        timed_out = False
        deadline = time.monotonic() + timeout
        while True:  # wait4 with a deadline: poll with WNOHANG
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                timed_out = True
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        poll.stop()
        reader.join(timeout=5)
    stages: dict[str, float] = {}
    opened = [(t, _stage_of(line)) for t, line in marks if _stage_of(line)]
    bounds = [(0.0, STAGES[0][0]), *opened, (seconds, None)]
    for (t0, name), (t1, _) in zip(bounds, bounds[1:], strict=False):
        stages[name] = stages.get(name, 0.0) + (t1 - t0)
    return {
        "seconds": seconds,
        "returncode": proc.returncode,
        "timed_out": timed_out,
        "peak_gib": usage.ru_maxrss / 2**20,  # KiB on Linux → GiB
        "tree_peak_gib": poll.peak / 2**30,
        "load_during": (sum(poll.loads) / len(poll.loads)) if poll.loads else None,
        "stages": stages,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
    }


def _one(n: int, timeout: float, keep: Path | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="painplan-bench-train-") as tmp:
        tmp = Path(tmp)
        data = tmp / "episodes.parquet"
        env = {**os.environ, "PAINPLAN_HOME": str(tmp / "home")}
        env.pop("MLFLOW_TRACKING_URI", None)
        env.pop("PAINPLAN_ARTIFACT_ROOT", None)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "training.cli", "simulate", "--n", str(n),
                        "--seed", "3", "--out", str(data)], check=True, env=env,
                       capture_output=True, cwd=REPO)
        simulate_s = time.perf_counter() - t0
        load_before = os.getloadavg()[0]
        log_path = (keep or tmp) / f"train-{n}.log"
        row = _run_train([sys.executable, "-m", "training.cli", "train", "--data", str(data)],
                         env, log_path, timeout)
    if row["returncode"] != 0 and not row["timed_out"]:
        raise SystemExit(f"train failed for n={n} (exit {row['returncode']}); see {log_path}"
                         if keep else f"train failed for n={n} (exit {row['returncode']})")
    at = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    return {"n": n, "at": at, "simulate_s": simulate_s, "load_before": load_before, **row}


def _fmt_stages(stages: dict) -> str:
    return " / ".join(f"{stages.get(name, 0):.0f}" for name, _ in STAGES)


def write(rows: list[dict], args) -> None:
    import lightgbm
    import mlflow

    lines = [
        "# Training cost (`painplan train`: validate, fit, evaluate, log, register)",
        "",
        f"`/work/venv/bin/python bench/bench_training.py --sizes "
        f"{' '.join(map(str, getattr(args, 'shown', args.sizes)))}`"
        " — one run per size (each is minutes long), each in its own subprocess against a "
        "throw-away MLflow store (SQLite + local artifacts); the simulated episode file is "
        "written beforehand and not timed. Seed 3, default `TrainConfig` (production model "
        "settings, `n_jobs=2`).",
        "",
        f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} logical CPUs; Python {platform.python_version()}, LightGBM "
        f"{lightgbm.__version__}, MLflow {mlflow.__version__}. The machine is shared: the load "
        "columns are the 1-minute load average just before and (mean) during each run; on 2 "
        "CPUs anything above ~2 means the run did not have the machine to itself.",
        "",
        "| episodes | measured at (UTC) | wall time (s) | CPU time (s) | stages: start-up / validate / fit / evaluate / log (s) "
        "| peak RSS, train process (GiB) | peak RSS, process tree (GiB) | s per 10k episodes "
        "| load before / during |",
        "|---:|---|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in rows:
        status = " (timed out)" if r["timed_out"] else ""
        during = f"{r['load_during']:.1f}" if r["load_during"] is not None else "-"
        lines.append(
            f"| {r['n']:,} | {r.get('at', '-')} | {r['seconds']:.1f}{status} | {r['cpu_seconds']:.0f} | "
            f"{_fmt_stages(r['stages'])} | {r['peak_gib']:.2f} | {r['tree_peak_gib']:.2f} | "
            f"{10_000 * r['seconds'] / r['n']:.2f} | {r['load_before']:.1f} / {during} |"
        )
    done = [r for r in rows if not r["timed_out"]]
    if len(done) >= 2:
        import math

        a, b = done[0], done[-1]
        slope = math.log(b["seconds"] / a["seconds"]) / math.log(b["n"] / a["n"])
        mslope = math.log(b["peak_gib"] / a["peak_gib"]) / math.log(b["n"] / a["n"])
        lines += ["", f"Growth from {a['n']:,} to {b['n']:,} episodes: time ∝ n^{slope:.2f}, "
                  f"peak memory ∝ n^{mslope:.2f} (1.00 = linear)."]
    at_100k = next((r for r in rows if r["n"] == 100_000), None)
    goal = ""
    if at_100k is not None:
        ok = (not at_100k["timed_out"] and at_100k["seconds"] <= 120
              and at_100k["peak_gib"] < 4)
        goal = (f" Measured at 100k: {at_100k['seconds']:.0f} s, {at_100k['peak_gib']:.2f} GiB — "
                f"**{'met' if ok else 'NOT met'}**.")
    lines += [
        "",
        "Goal: ≤ 120 s and < 4 GiB at 100k episodes, roughly linear growth." + goal,
        "",
        "Peak RSS is the kernel's high-water mark of the `painplan train` process itself "
        "(`os.wait4` on that child); the tree column polls the process and its children every "
        "50 ms (the two agree when the run spawns no large children). The stage split comes "
        "from the time stamps of the progress lines `painplan train` prints; 'fit' includes "
        "the logging-policy model, 'log' includes SHAP summaries, the validation set, the "
        "model bundle and registration. Small sizes carry a fixed cost (imports, MLflow "
        "store creation, SHAP summary, registration) of roughly 15–20 s, so time per episode "
        "falls with n.",
        "",
        "![training time and memory](training.png)",
        "",
        f"Rerun: `/work/venv/bin/python bench/bench_training.py --sizes "
        f"{' '.join(map(str, getattr(args, 'shown', args.sizes)))}` (`--merge` reruns some "
        "sizes and keeps the others' rows)",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "training.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (RESULTS / "training.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    if len(done) >= 2:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax, bx) = plt.subplots(1, 2, figsize=(9, 3.8))
        ns = [r["n"] for r in done]
        ax.loglog(ns, [r["seconds"] for r in done], marker="o", label="measured")
        ax.loglog(ns, [done[0]["seconds"] * n / ns[0] for n in ns], ls="--", c="grey",
                  label="linear from smallest")
        ax.axhline(120, c="tab:red", lw=0.8, ls=":", label="goal at 100k (120 s)")
        ax.set(xlabel="episodes", ylabel="wall time (s)", title="painplan train: time")
        ax.legend(fontsize=8)
        bx.loglog(ns, [r["peak_gib"] for r in done], marker="o", c="tab:green",
                  label="peak RSS")
        bx.loglog(ns, [done[0]["peak_gib"] * n / ns[0] for n in ns], ls="--", c="grey",
                  label="linear from smallest")
        bx.set(xlabel="episodes", ylabel="GiB", title="painplan train: peak memory")
        bx.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(RESULTS / "training.png", dpi=120)
    print(f"wrote {RESULTS / 'training.md'}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--timeout", type=float, default=5400.0,
                        help="seconds before one train run is stopped (default 5400)")
    parser.add_argument("--keep-logs", type=Path, default=None, metavar="DIR",
                        help="keep each run's train log in DIR")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of bench/results/training.json for sizes not "
                        "run now (e.g. rerun 10k and 100k without repeating a long 1M run)")
    args = parser.parse_args(argv)
    if args.keep_logs:
        args.keep_logs.mkdir(parents=True, exist_ok=True)
    kept = []
    if args.merge and (RESULTS / "training.json").is_file():
        kept = [r for r in json.loads((RESULTS / "training.json").read_text())
                if r["n"] not in args.sizes]
    shown = sorted({*args.sizes, *(r["n"] for r in kept)})
    rows = list(kept)
    for n in sorted(args.sizes):
        row = _one(n, args.timeout, args.keep_logs)
        rows.append(row)
        rows.sort(key=lambda r: r["n"])
        args.shown = shown
        print(f"n={n}: {row['seconds']:.1f} s{' (timed out)' if row['timed_out'] else ''}, "
              f"peak {row['peak_gib']:.2f} GiB (tree {row['tree_peak_gib']:.2f}), stages "
              f"{_fmt_stages(row['stages'])}", flush=True)
        write(rows, args)  # after every size, so a long run leaves partial results
    return 0


if __name__ == "__main__":
    sys.exit(main())
