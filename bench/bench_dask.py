"""Benchmark the Dask engines against the single-process ones (issue "Scale-out on Dask").

    /work/venv/bin/python bench/bench_dask.py [--sizes 100000 1000000] [--repeats 3]
        [--large-repeats 1] [--train-sizes 100000] [--train-repeats 1] [--workdir DIR]
        [--merge]

    # only the 1M training rows, keeping every other row of bench/results/dask.md:
    /work/venv/bin/python bench/bench_dask.py --sizes --train-sizes 1000000 --merge

Writes ``bench/results/dask.md``:

* **Scoring**: patients from the simulator's patient generator (``truth_cohort(n).frame()``),
  written as a partitioned Parquet dataset (files of 20,000 patients, the default partition
  size), ranked top-5 by ``painplan recommend``'s two code paths —
  ``pipeline.recommend_file`` (one process, one output file) and
  ``dask_recommend.recommend_dataset`` on a ``LocalCluster`` of 2 worker processes × 1 thread
  (one output file per partition). Wall-clock includes reading, validation, scoring and
  writing; the cluster is started once beforehand and its start-up is reported separately
  (``painplan recommend --engine dask`` without ``--scheduler`` pays it on every call). Peak
  memory is the kernel's high-water mark (VmHWM, reset before each run) of the process, and of
  each worker process.
* **Training**: ``pipeline.fit_bundle`` (the outcome model and the logging-policy model, i.e.
  every LightGBM fit of ``painplan train``) with ``engine="local"`` and ``engine="dask"`` on
  the same simulated episodes, default model settings with ``n_jobs=1`` (2 OpenMP threads on
  this shared 2-core machine oversubscribe it). MLflow logging and evaluation are the same
  code for both engines and are not timed. Every fit runs in a fresh child process (the
  *driver*; for ``dask`` it connects to the running cluster by its scheduler address), which
  reads the episodes from Parquet before the clock starts, so its peak RSS is that fit's own
  and not what an earlier fit left behind; the workers' peaks are reset before each fit.
* ``--sizes`` with no values skips scoring (and fitting the scoring model); ``--merge`` keeps
  the rows of the existing results file for sizes not measured now (each row says when and
  under which load it was measured).

Not a test: timings depend on the machine (shared with other jobs; the load average is
recorded) — medians over ``--repeats``.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "dask.md"
FILE_ROWS = 20_000
WORKERS = 2


def _machine() -> str:
    cpu = platform.processor()
    info = Path("/proc/cpuinfo")
    if not cpu and info.exists():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in info.read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else ""
    mem = ""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        kb = int(meminfo.read_text().split("MemTotal:")[1].split()[0])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    return (
        f"{platform.platform()}, {platform.machine()}, {cpu or 'unknown CPU'}, "
        f"os.cpu_count()={os.cpu_count()}{mem}, Python {platform.python_version()}"
    )


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def _reset_peak() -> None:
    """Reset this process's VmHWM (Linux ≥ 4.0); harmless elsewhere."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _cpu_seconds() -> float:
    """User + system CPU time of this process so far (all its threads)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cluster_cpu(client) -> float:
    return sum(client.run(_cpu_seconds).values()) if client is not None else 0.0


def _versions() -> str:
    from importlib.metadata import version

    return ", ".join(
        f"{p} {version(p)}"
        for p in ("dask", "distributed", "lightgbm", "numpy", "pandas", "pyarrow")
    )


def write_patients(n: int, root: Path, seed: int) -> Path:
    """``n`` simulated contract patients as ``root/part-*.parquet`` files of FILE_ROWS rows."""
    from training.simulate import truth_cohort

    root.mkdir(parents=True, exist_ok=True)
    for i, start in enumerate(range(0, n, FILE_ROWS)):
        rows = min(FILE_ROWS, n - start)
        # Each file its own seeded draw: 1M patients never sit in memory at once.
        truth_cohort(rows, seed=seed * 10_000 + i).frame().to_parquet(
            root / f"part-{i:05d}.parquet", index=False
        )
    return root


def train_scoring_model(workdir: Path, seed: int) -> tuple[str, float]:
    from features.validate import validate
    from recommender.artifact import save_bundle
    from training.config import ModelParams, TrainConfig
    from training.pipeline import fit_bundle
    from training.simulate import simulate_episodes

    episodes = validate(simulate_episodes(20_000, seed=seed, progress=False), "episodes").frame
    started = time.perf_counter()
    bundle = fit_bundle(
        episodes,
        TrainConfig(data="bench", seed=seed, model=ModelParams(n_jobs=1)),
        progress=lambda _: None,
    )
    seconds = time.perf_counter() - started
    bundle.metadata = {"seed": seed, "note": "bench_dask scoring model"}
    save_bundle(bundle, workdir / "bundle")
    return str(workdir / "bundle"), seconds


def _worker_peaks(client) -> list[float]:
    return sorted(client.run(_peak_mb).values())


def _worker_reset(client) -> None:
    client.run(_reset_peak)


def score_once(engine: str, patients: Path, model: str, out: Path, client=None) -> dict:
    from training.dask_recommend import recommend_dataset
    from training.pipeline import recommend_file

    shutil.rmtree(out, ignore_errors=True)
    if out.is_file():
        out.unlink()
    _reset_peak()
    if client is not None:
        _worker_reset(client)
    cpu = _cpu_seconds() + _cluster_cpu(client)
    started = time.perf_counter()
    if engine == "local":
        rows = recommend_file(patients, out, model=model, top_k=5, progress=lambda _: None)
    else:
        rows = recommend_dataset(
            patients,
            out,
            model=model,
            top_k=5,
            scheduler=client.scheduler.address,
            progress=lambda _: None,
        )
    seconds = time.perf_counter() - started
    cpu = _cpu_seconds() + _cluster_cpu(client) - cpu
    result = {"seconds": seconds, "cpu": cpu, "rows": rows, "peak_mb": _peak_mb()}
    if client is not None:
        result["worker_peaks_mb"] = _worker_peaks(client)
    return result


def start_cluster():
    from distributed import Client, LocalCluster

    started = time.perf_counter()
    cluster = LocalCluster(
        n_workers=WORKERS,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        silence_logs=logging.CRITICAL,
    )
    client = Client(cluster)
    # What a cold `--engine dask` call also pays: painplan imported on every worker.
    client.run(lambda: __import__("training.batch") and None)
    return cluster, client, time.perf_counter() - started


def _fit_child(engine: str, episodes_path: str, seed: int, scheduler: str | None) -> dict:
    """One ``fit_bundle`` in a fresh process: the driver's time, CPU and peak memory."""
    import pandas as pd

    from features.validate import validate
    from training.config import ModelParams, TrainConfig
    from training.pipeline import fit_bundle

    logging.getLogger("distributed").setLevel(logging.ERROR)
    episodes = validate(pd.read_parquet(episodes_path), "episodes").frame
    config = TrainConfig(data="bench", seed=seed, model=ModelParams(n_jobs=1))
    _reset_peak()
    rss_before = _rss_mb()
    cpu = _cpu_seconds()
    started = time.perf_counter()
    bundle = fit_bundle(
        episodes, config, engine=engine, scheduler=scheduler, progress=lambda _: None
    )
    seconds = time.perf_counter() - started
    cpu = _cpu_seconds() - cpu
    m = bundle.model
    return {
        "seconds": seconds,
        "cpu_driver": cpu,
        "peak_mb": _peak_mb(),
        "rss_before_mb": rss_before,
        "iterations": f"e {[e.best_iteration_ for e in m.e_models_]}, "
        f"τ {m.effect_model_.best_iteration_}, β {m.ae_model_.best_iteration_}",
    }


def fit_once(engine: str, episodes_path: Path, seed: int, client=None) -> dict:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    scheduler = client.scheduler.address if engine == "dask" else None
    load_before = _load()
    at = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    if engine == "dask":
        _worker_reset(client)
    workers_cpu = _cluster_cpu(client) if engine == "dask" else 0.0
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        res = pool.submit(_fit_child, engine, str(episodes_path), seed, scheduler).result()
    res["cpu"] = res["cpu_driver"]
    if engine == "dask":
        res["cpu"] += _cluster_cpu(client) - workers_cpu
        res["worker_peaks_mb"] = _worker_peaks(client)
    res.update(at=at, load_before=load_before, load_after=_load())
    return res


def _median(runs: list[dict], key: str = "seconds") -> float:
    return statistics.median(r[key] for r in runs)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def read_previous(path: Path) -> dict:
    """What ``--merge`` keeps from an earlier results file: its run notes, its scoring section
    (intro and rows by size) and its training rows (cells by column name, by size and engine).
    Reads both this script's format and the earlier one (one load sentence in the header)."""
    prev: dict = {"runs": [], "scoring_intro": [], "scoring_rows": {}, "training": {}}
    if not path.is_file():
        return prev
    lines = path.read_text(encoding="utf-8").splitlines()
    section = None
    header: list[str] | None = None
    for line in lines:
        if line.startswith("## Scoring"):
            section, header = "scoring", None
            continue
        if line.startswith("## Training"):
            section, header = "training", None
            continue
        if line.startswith("## "):
            section = None
            continue
        if section is None:
            if line.startswith("* run: "):
                prev["runs"].append(line[len("* run: ") :])
            elif line.startswith("Written by") and "after the run;" in line:
                # earlier format: "... jobs: load average A before, B after the run; ..."
                text = line.split("load average", 1)[1].split(";", 1)[0].strip()
                prev["runs"].append(f"earlier run (date not recorded): load average {text}")
            continue
        if line.startswith("|"):
            cells = _cells(line)
            if header is None:
                header = cells
                continue
            if set(line.replace("|", "").strip()) <= set("-: "):
                continue
            n = int(cells[0].replace(",", ""))
            if section == "scoring":
                prev["scoring_rows"].setdefault(n, []).append(line)
            else:
                prev["training"][(n, cells[1])] = dict(zip(header, cells, strict=False))
        elif section == "scoring" and header is None:
            prev["scoring_intro"].append(line)
    while prev["scoring_intro"] and not prev["scoring_intro"][-1].strip():
        prev["scoring_intro"].pop()
    while prev["scoring_intro"] and not prev["scoring_intro"][0].strip():
        prev["scoring_intro"].pop(0)
    return prev


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="*",
        default=[100_000, 1_000_000],
        help="patients for scoring; no values: skip scoring",
    )
    parser.add_argument("--repeats", type=int, default=3, help="repeats below 500k patients")
    parser.add_argument("--large-repeats", type=int, default=1, help="repeats from 500k")
    parser.add_argument("--train-sizes", type=int, nargs="*", default=[100_000])
    parser.add_argument("--train-repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of the existing --out file for sizes not measured now "
        "(e.g. add 1M training without rerunning scoring)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("distributed").setLevel(logging.ERROR)  # its INFO chatter, in-process
    prev = read_previous(args.out) if args.merge else read_previous(Path("/nonexistent"))

    work = args.workdir or Path(tempfile.mkdtemp(prefix="painplan-bench-dask-"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = _load()
    started_at = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    print(f"workdir {work}; load average {load_before}", flush=True)
    model, fit_seconds = None, None
    if args.sizes:
        model, fit_seconds = train_scoring_model(work, args.seed)
        print(f"scoring model fitted in {fit_seconds:.1f} s", flush=True)

    cluster, client, startup = start_cluster()
    startups = [startup]
    scoring: list[dict] = []
    training: list[dict] = []
    try:
        for n in args.sizes:
            patients = write_patients(n, work / f"patients-{n}", args.seed)
            repeats = args.repeats if n < 500_000 else args.large_repeats
            runs: dict[str, list[dict]] = {"local": [], "dask": []}
            for r in range(repeats):
                for engine in ("local", "dask"):
                    out = work / (
                        f"ranked-{engine}-{n}" + (".parquet" if engine == "local" else "")
                    )
                    res = score_once(
                        engine, patients, model, out, client if engine == "dask" else None
                    )
                    runs[engine].append(res)
                    print(
                        f"score n={n} {engine} run {r + 1}: {res['seconds']:.1f} s, "
                        f"CPU {res['cpu']:.1f} s, peak {res['peak_mb']:.0f} MB"
                        + (f", workers {res['worker_peaks_mb']}" if engine == "dask" else ""),
                        flush=True,
                    )
            scoring.append({"n": n, "repeats": repeats, **runs})
            shutil.rmtree(patients, ignore_errors=True)
        for n in args.train_sizes:
            from features.validate import validate
            from training.simulate import simulate_episodes

            path = work / f"episodes-{n}.parquet"
            validate(
                simulate_episodes(n, seed=args.seed, progress=False), "episodes"
            ).frame.to_parquet(path, index=False)
            runs = {"local": [], "dask": []}
            for r in range(args.train_repeats):
                for engine in ("local", "dask"):
                    res = fit_once(engine, path, args.seed, client)
                    runs[engine].append(res)
                    print(
                        f"train n={n} {engine} run {r + 1} (at {res['at']} UTC, load "
                        f"{res['load_before']} -> {res['load_after']}): {res['seconds']:.1f} s, "
                        f"CPU {res['cpu']:.1f} s (driver {res['cpu_driver']:.1f} s), peak RSS "
                        f"driver {res['peak_mb']:.0f} MB (data loaded: "
                        f"{res['rss_before_mb']:.0f} MB)"
                        + (f", workers {res['worker_peaks_mb']}" if engine == "dask" else "")
                        + f" ({res['iterations']})",
                        flush=True,
                    )
            training.append({"n": n, "repeats": args.train_repeats, **runs})
            path.unlink(missing_ok=True)
    finally:
        client.close()
        cluster.close()
    for _ in range(2):  # start-up is cheap to repeat: a median of three
        c, cl, s = start_cluster()
        startups.append(s)
        cl.close()
        c.close()

    what = []
    if args.sizes:
        what.append("scoring " + ", ".join(f"{n:,}" for n in args.sizes))
    if args.train_sizes:
        what.append("training " + ", ".join(f"{n:,}" for n in args.train_sizes))
    run_note = (
        f"{started_at} UTC: {'; '.join(what) or 'cluster start-up only'} — load average "
        f"{load_before} before, {_load()} after"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        render(scoring, training, statistics.median(startups), fit_seconds, run_note, prev, args),
        encoding="utf-8",
    )
    print(f"wrote {args.out}")
    return 0


TRAIN_COLUMNS = [
    "episodes",
    "engine",
    "runs",
    "measured at (UTC)",
    "load before / after",
    "wall-clock, s (median)",
    "ratio to local",
    "CPU, s (median)",
    "cores busy",
    "peak RSS driver, MB",
    "peak RSS per worker, MB",
    "boosting rounds kept (e(x) folds, τ, β)",
]


def _training_cells(row: dict) -> dict[str, dict[str, str]]:
    local = _median(row["local"])
    out = {}
    for engine in ("local", "dask"):
        runs = row[engine]
        sec = _median(runs)
        cpu = _median(runs, "cpu")
        last = runs[-1]
        out[engine] = {
            "episodes": f"{row['n']:,}",
            "engine": engine,
            "runs": str(len(runs)),
            "measured at (UTC)": last["at"],
            "load before / after": f"{last['load_before'].split(',')[0]} / "
            f"{last['load_after'].split(',')[0]}",
            "wall-clock, s (median)": f"{sec:.1f}",
            "ratio to local": f"{sec / local:.2f}",
            "CPU, s (median)": f"{cpu:.1f}",
            "cores busy": f"{cpu / sec:.2f}",
            "peak RSS driver, MB": f"{max(r['peak_mb'] for r in runs):.0f}",
            "peak RSS per worker, MB": ", ".join(f"{m:.0f}" for m in last["worker_peaks_mb"])
            if engine == "dask"
            else "–",
            "boosting rounds kept (e(x) folds, τ, β)": last["iterations"],
        }
    return out


def render(scoring, training, startup, fit_seconds, run_note, prev, args) -> str:
    runs = [*prev["runs"], run_note]
    lines = [
        "# Dask engines benchmark",
        "",
        f"Machine: {_machine()}.",
        f"Libraries: {_versions()}.",
        f"Written by `bench/bench_dask.py` (seed {args.seed}); timings are wall-clock medians "
        "of the stated repeats. The machine is shared with other jobs; runs merged into this "
        "file (`--merge`), with the 1-minute, 5-minute and 15-minute load averages:",
        "",
        *[f"* run: {r}" for r in runs],
        "",
        "How to read it: with a load average above 2 the two cores are already saturated, so "
        "wall-clock mostly measures the CPU share the run got. *CPU, s* (user + system time of "
        "the driver process plus every worker process, summed over their threads) is the work "
        "done, and is the number that carries over to other machines: scoring is embarrassingly "
        "parallel, so on idle or additional cores the Dask wall-clock approaches CPU ÷ worker "
        "threads. *cores busy* = CPU ÷ wall-clock. The single-process engine is one process, "
        "not one thread: numpy's BLAS and Arrow use both cores where they can, while each Dask "
        "worker runs one thread (Dask sets OMP/OPENBLAS/MKL_NUM_THREADS=1 in its workers). "
        "Peak RSS is the kernel's high-water mark (VmHWM) of each process, reset before each "
        "run.",
        "",
        "Dask: `LocalCluster` of 2 worker processes × 1 thread, no dashboard, started once "
        f"beforehand; start-up incl. importing painplan on the workers: **{startup:.1f} s** "
        f"(median of 3, run of {runs[-1].split(' UTC')[0]} UTC), paid by every "
        "`painplan recommend/train --engine dask` call without `--scheduler`.",
        "",
        "## Scoring (`painplan recommend`, top-5 of 839 plans)",
        "",
    ]
    if scoring:
        lines += [
            f"Patients from the simulator's patient generator, Parquet files of {FILE_ROWS:,} "
            "patients (= one Dask partition each), 5000-patient scoring chunks in both engines. "
            f"Scoring model: default settings, n_jobs=1, fitted on 20,000 episodes "
            f"({fit_seconds:.0f} s). Output is identical between the engines (tests/training/"
            "test_dask.py).",
        ]
    else:
        lines += prev["scoring_intro"] or ["(not run: `--sizes` was empty)"]
    table: dict[int, list[str]] = {
        n: rows for n, rows in prev["scoring_rows"].items() if n not in args.sizes
    }
    for row in scoring:
        local = _median(row["local"])
        table[row["n"]] = []
        for engine in ("local", "dask"):
            runs_ = row[engine]
            sec = _median(runs_)
            cpu = _median(runs_, "cpu")
            peak = max(r["peak_mb"] for r in runs_)
            workers = (
                ", ".join(f"{m:.0f}" for m in runs_[-1]["worker_peaks_mb"])
                if engine == "dask"
                else "–"
            )
            table[row["n"]].append(
                f"| {row['n']:,} | {'single process' if engine == 'local' else 'Dask, 2 workers'}"
                f" | {len(runs_)} | {sec:.1f} | {row['n'] / sec:,.0f} | {local / sec:.2f}× | "
                f"{cpu:.1f} | {cpu / sec:.2f} | {peak:.0f} | {workers} |"
            )
    if table:
        lines += [
            "",
            "| patients | engine | runs | wall-clock, s (median) | patients/s | speed-up | "
            "CPU, s (median) | cores busy | peak RSS driver, MB | peak RSS per worker, MB |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
            *[line for n in sorted(table) for line in table[n]],
        ]
    lines += [
        "",
        "## Training (`pipeline.fit_bundle`: outcome model + logging-policy model)",
        "",
        "Simulated episodes (seed of the run), default model settings with n_jobs=1, all "
        "episodes used for fitting. Each fit runs in a fresh process (the *driver*), which "
        "holds the validated episodes before the clock starts; for `dask` it connects to the "
        "running cluster. *CPU* = driver + both workers. '–' = not recorded by that run.",
        "",
    ]
    cells: dict[tuple[int, str], dict[str, str]] = {
        key: row for key, row in prev["training"].items() if key[0] not in args.train_sizes
    }
    for row in training:
        for engine, c in _training_cells(row).items():
            cells[(row["n"], engine)] = c
    if cells:
        lines += [
            "| " + " | ".join(TRAIN_COLUMNS) + " |",
            "|---:|---|---:|---|---|---:|---:|---:|---:|---:|---|---|",
        ]
        for key in sorted(cells, key=lambda k: (k[0], k[1] != "local")):
            c = cells[key]
            lines.append("| " + " | ".join(c.get(col, "–") for col in TRAIN_COLUMNS) + " |")
    else:
        lines.append("(not run: `--train-sizes` was empty)")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
