"""Batch scoring: ``painplan recommend`` patients per second, and the SHAP cost per explained row.

    /work/venv/bin/python bench/bench_batch.py [--sizes 10000 100000] [--repeats 3]
        [--episodes 20000]

The model is the one ``bench/bench_servers.py`` trains and registers (same cache under
``bench/out/servers/``, trained on the first run). Patient files are the §2 profile columns of
simulated episodes (``simulate_episodes(n, seed=11)``, episode columns dropped), written as
Parquet under ``bench/out/batch/``.

Measured:

1. **CLI, end to end**: ``painplan recommend --patients FILE --out OUT.parquet --top-k 5
   --model models:/painplan/<v>`` in a fresh process (interpreter start, imports, reading,
   contract validation, loading the model, scoring all 839 plans per patient with the safety
   floor and ranking, writing the §7 rows), ``--repeats`` times per size, median; stage split
   from the time stamps of its progress lines. Three ways of loading the model:

   * **cached** (the default): the version is in the local model cache (``training.
     model_cache``, here ``bench/out/batch/model-cache``): a read-only registry lookup, a
     SHA-256 check and unpickling, no MLflow import;
   * **registry** (``--no-model-cache``): resolved and downloaded through MLflow on every run,
     as before the cache existed;
   * **first run** (smallest size only): the cache emptied before the run, so the version is
     downloaded through MLflow and stored in the cache (what the first run after a new
     champion pays);
   * with ``--baseline GIT_REF``, also the CLI of that commit (``git archive`` under
     ``bench/out/batch/``), in the same rounds: a paired before/after.
2. **In-process stages** on the same file: read, validate, score (``recommend`` per 5000-patient
   chunk, as the CLI does), §7 rows, write Parquet.
3. **SHAP**: ``recommender.explain.explain_plans`` for each patient's top 5 (what ``POST
   /recommend`` adds per request), per patient and per explained plan row; and the raw TreeSHAP
   calls underneath (``pred_contrib`` of the effect and adverse-event boosters) per patient row
   in bulk.

Writes ``bench/results/batch.md``, ``batch.json`` and ``batch.png``. Goal: ≥ 2,000 patients/s on
2 cores with top-5.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
OUT = BENCH / "out" / "batch"
TOP_K = 5
GOAL = 2000.0
# Stage → the progress lines that open it (a stage runs until the next stage's first line).
STAGES = (("start-up", ()), ("read + validate", ("validating ",)),
          ("load model", ("loading model ",)), ("score + write", ("scoring ", "ranked ")))


def patient_file(n: int) -> Path:
    """Parquet file of n simulated patient profiles (written once)."""
    path = OUT / f"patients-{n}.parquet"
    if path.is_file():
        return path
    from features.io import write_table
    from features.schema import PATIENT_COLUMNS
    from training.simulate import simulate_episodes

    frame = simulate_episodes(n, seed=11, progress=False)
    frame = frame[[c.name for c in PATIENT_COLUMNS if c.name in frame.columns]]
    write_table(frame, path)
    return path


def cpu_probe(n: int = 5_000_000) -> float:
    """Seconds for a fixed pure-Python loop: how fast this (shared, virtual) machine is right
    now. It was seen to vary by 3x within an hour with nothing of ours running."""
    t = time.perf_counter()
    total = 0
    for i in range(n):
        total += i
    return time.perf_counter() - t


def import_probe() -> float:
    """Seconds for a fresh interpreter to import numpy and pandas: the part of every CLI
    start-up that has nothing to do with painplan (it drifted from 0.4 to 1.8 s on this
    machine with nothing else running)."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import numpy, pandas"], check=True)
    return time.perf_counter() - t


def _stage_of(line: str) -> str | None:
    text = line.removeprefix("painplan: ")
    for name, prefixes in STAGES:
        if text.startswith(prefixes):
            return name
    return None


MODES = {  # mode → (extra CLI arguments, empty the cache first, label in the table), run order
    "first": ((), True, "first run of a version (cache empty: download + fill)"),
    "cached": ((), False, "local model cache (default)"),
    "registry": (("--no-model-cache",), False, "`--no-model-cache`: MLflow download every run"),
}


def baseline_checkout(ref: str) -> tuple[str, Path]:
    """The painplan code of git commit ``ref`` (``git archive``), for a paired before/after."""
    sha = subprocess.run(["git", "rev-parse", "--short=12", ref], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout.strip()
    where = OUT / f"baseline-{sha}"
    if not (where / "training" / "cli.py").is_file():
        where.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", sha], cwd=REPO, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    return sha, where


def run_cli(patients: Path, model_uri: str, out: Path, extra: tuple[str, ...] = (),
            code: Path | None = None) -> dict:
    """One ``painplan recommend`` run: wall seconds and stage times. ``code``: run the painplan
    code in that directory instead of this checkout's."""
    cmd = [sys.executable, "-m", "training.cli", "recommend", "--patients", str(patients),
           "--out", str(out), "--top-k", str(TOP_K), "--model", model_uri, *extra]
    env = None if code is None else {**os.environ, "PYTHONPATH": str(code)}
    marks: list[tuple[float, str]] = []
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=code or REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)

    def read() -> None:
        for line in proc.stderr:
            marks.append((time.perf_counter() - started, line.strip()))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    stdout = proc.stdout.read()
    proc.wait(timeout=3600)
    seconds = time.perf_counter() - started
    reader.join(timeout=5)
    if proc.returncode != 0:
        raise RuntimeError(f"painplan recommend failed: {' '.join(m[1] for m in marks)[-2000:]}")
    stages: dict[str, float] = {}
    opened = []
    for t, line in marks:
        name = _stage_of(line)
        if name and (not opened or opened[-1][1] != name):
            opened.append((t, name))
    bounds = [(0.0, "start-up"), *opened, (seconds, None)]
    for (t0, name), (t1, _) in zip(bounds, bounds[1:], strict=False):
        stages[name] = stages.get(name, 0.0) + (t1 - t0)
    return {"seconds": seconds, "stages": stages, "stdout": stdout.strip()}


def in_process(patients: Path, bundle, out: Path) -> dict:
    """Stage times of the CLI's work without process start and model download."""
    import pyarrow.parquet as pq

    from features.schema import PATIENT_ID
    from features.validate import validate
    from recommender.recommend import ranked_rows, recommend
    from training import batch

    times: dict[str, float] = {}
    t = time.perf_counter()
    raw = batch.read_dataset(patients)
    times["read"] = time.perf_counter() - t
    t = time.perf_counter()
    frame = validate(raw, "patients").frame
    times["validate"] = time.perf_counter() - t
    score = rows_s = write_s = 0.0
    writer = None
    for start in range(0, len(frame), batch.CHUNK_SIZE):
        block = frame.iloc[start: start + batch.CHUNK_SIZE]
        t = time.perf_counter()
        ranked = recommend(bundle.model, block, top_k=TOP_K)
        t1 = time.perf_counter()
        rows = ranked_rows(ranked, block[PATIENT_ID].to_numpy())
        t2 = time.perf_counter()
        writer = writer or pq.ParquetWriter(out, batch.ranked_schema())
        writer.write_table(batch.ranked_table(rows))
        t3 = time.perf_counter()
        score, rows_s, write_s = score + t1 - t, rows_s + t2 - t1, write_s + t3 - t2
    writer.close()
    times.update({"score (recommend)": score, "§7 rows": rows_s, "write": write_s})
    times["total"] = sum(times.values())
    return times


def shap_costs(bundle, patients: Path, n_patients: int) -> dict:
    """explain_plans for each patient's top 5, and raw TreeSHAP in bulk."""
    from threadpoolctl import ThreadpoolController

    from features.catalog import PLANS
    from features.validate import validate
    from recommender.explain import explain_plans
    from recommender.recommend import recommend
    from training import batch

    model = bundle.model
    frame = validate(batch.read_dataset(patients), "patients").frame.iloc[:n_patients]
    frame = frame.reset_index(drop=True)
    ranked = recommend(model, frame, top_k=TOP_K)
    rows = [frame.iloc[[i]].reset_index(drop=True) for i in range(len(frame))]
    tops = [[PLANS[j] for j in ranked.order[i] if j >= 0] for i in range(len(frame))]
    out = {}
    with ThreadpoolController().limit(limits=1, user_api="openmp"):  # as the service runs it
        for k in (1, TOP_K):
            for i in range(5):
                explain_plans(model, rows[i], tops[i][:k])
            times = []
            for i in range(len(rows)):
                t = time.perf_counter()
                explain_plans(model, rows[i], tops[i][:k])
                times.append(1000 * (time.perf_counter() - t))
            out[f"explain_top{k}_ms_per_patient"] = statistics.median(times)
            out[f"explain_top{k}_p99"] = float(np.percentile(times, 99))
        out["explain_ms_per_plan_row"] = out[f"explain_top{TOP_K}_ms_per_patient"] / TOP_K
        out["explain_marginal_ms_per_extra_plan"] = (
            out[f"explain_top{TOP_K}_ms_per_patient"] - out["explain_top1_ms_per_patient"]
        ) / (TOP_K - 1)
        X = model.encoder_.transform(frame)
        for name, booster in (("effect", model.effect_model_), ("adverse_event",
                                                                model.ae_model_)):
            booster.contributions(X[:10])
            t = time.perf_counter()
            booster.contributions(X)
            out[f"pred_contrib_{name}_ms_per_row_bulk"] = 1000 * (time.perf_counter() - t) / len(X)
            m = min(200, len(X))
            t = time.perf_counter()
            for i in range(m):
                booster.contributions(X[i: i + 1])
            out[f"pred_contrib_{name}_ms_per_row_single"] = 1000 * (time.perf_counter() - t) / m
        out["n_trees_effect"] = int(model.effect_model_.best_iteration_) * int(
            model.effect_model_.n_outputs_)
        out["n_trees_ae"] = int(model.ae_model_.best_iteration_) * int(model.ae_model_.n_outputs_)
        out["n_features"] = int(X.shape[1])
    out["patients"] = len(frame)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--episodes", type=int, default=20_000,
                        help="model trained on this many simulated episodes (default 20000, "
                        "shared with bench_servers.py)")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--shap-patients", type=int, default=300)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--baseline", metavar="GIT_REF",
                        help="also time the CLI of this commit (git archive under bench/out/batch/)"
                        " in the same rounds: a paired before/after on the same machine state")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(BENCH))
    from bench_servers import use_store

    _, model_uri, _, bundle_dir, _ = use_store(args.episodes, args.seed)
    import pyarrow.parquet as pq

    from recommender.artifact import load_bundle

    bundle = load_bundle(bundle_dir)
    OUT.mkdir(parents=True, exist_ok=True)
    cache = OUT / "model-cache"
    os.environ["PAINPLAN_MODEL_CACHE"] = str(cache)  # inherited by the CLI runs
    # Every size needs a warm cache for its "cached" runs: the smallest size's "first" run
    # fills it in each round, and it runs before any other CLI run of that round.
    args.sizes = sorted(args.sizes)
    modes = dict(MODES)
    baseline = None
    if args.baseline:
        sha, baseline = baseline_checkout(args.baseline)
        modes["baseline"] = ((), False, f"code at {sha} (before the model cache)")
    files = {n: patient_file(n) for n in args.sizes}
    loads = [os.getloadavg()[0]]
    probes = [(cpu_probe(), import_probe())]
    cli: dict[str, dict[int, list[dict]]] = {m: {n: [] for n in args.sizes} for m in modes}
    inproc: dict[int, list[dict]] = {n: [] for n in args.sizes}
    same_as_baseline: list[bool] = []
    for rnd in range(args.repeats):  # interleaved, so machine load falls on every size alike
        for n in args.sizes:
            for mode, (extra, empty, _) in modes.items():
                if mode == "first" and n != min(args.sizes):
                    continue
                if empty:
                    shutil.rmtree(cache, ignore_errors=True)
                r = run_cli(files[n], model_uri, OUT / f"ranked-{n}-{mode}.parquet", extra,
                            code=baseline if mode == "baseline" else None)
                cli[mode][n].append(r)
                print(f"[{rnd + 1}/{args.repeats}] CLI n={n} {mode}: {r['seconds']:.1f} s = "
                      f"{n / r['seconds']:,.0f} patients/s; stages "
                      + ", ".join(f"{k} {v:.1f}" for k, v in r["stages"].items()), flush=True)
            reference = pq.read_table(OUT / f"ranked-{n}-registry.parquet")
            if not pq.read_table(OUT / f"ranked-{n}-cached.parquet").equals(reference):
                raise RuntimeError(f"n={n}: the cached model ranked differently from the "
                                   "registry download")
            if baseline is not None:
                same_as_baseline.append(
                    pq.read_table(OUT / f"ranked-{n}-baseline.parquet").equals(reference))
            t = in_process(files[n], bundle, OUT / f"ranked-inproc-{n}.parquet")
            inproc[n].append(t)
            print(f"[{rnd + 1}/{args.repeats}] in-process n={n}: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in t.items()), flush=True)
        loads.append(os.getloadavg()[0])
        probes.append((cpu_probe(), import_probe()))
        print(f"[{rnd + 1}/{args.repeats}] load {loads[-1]:.1f}, CPU probe {probes[-1][0]:.2f} "
              f"s, import probe {probes[-1][1]:.2f} s", flush=True)
    shap = shap_costs(bundle, files[min(args.sizes)], args.shap_patients)
    print("SHAP:", json.dumps(shap), flush=True)
    loads.append(os.getloadavg()[0])

    def cli_summary(runs: list[dict], n: int) -> dict:
        wall = statistics.median(r["seconds"] for r in runs)
        stage_names = sorted({k for r in runs for k in r["stages"]},
                             key=[s[0] for s in STAGES].index)
        return {"seconds": wall, "rate": n / wall, "rates": [n / r["seconds"] for r in runs],
                "stages": {k: statistics.median(r["stages"].get(k, 0.0) for r in runs)
                           for k in stage_names}}

    summary = []
    for n in args.sizes:
        done = {m: cli_summary(cli[m][n], n) for m in modes if cli[m][n]}
        ip = {k: statistics.median(t[k] for t in inproc[n]) for k in inproc[n][0]}
        summary.append({"n": n, "cli": done, "cli_rate": done["cached"]["rate"],
                        "registry_rate": done["registry"]["rate"], "inproc": ip,
                        "inproc_rate": n / ip["total"],
                        "score_rate": n / ip["score (recommend)"]})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batch.json").write_text(json.dumps(
        {"model_uri": model_uri, "loads": loads, "probes_loop_import_seconds": probes,
         "baseline": args.baseline, "same_as_baseline": same_as_baseline,
         "cli": {m: {str(k): v for k, v in runs.items()} for m, runs in cli.items()},
         "inproc": {str(k): v for k, v in inproc.items()}, "summary": summary, "shap": shap},
        indent=1), encoding="utf-8")
    write_markdown(summary, shap, args, model_uri, loads, probes, modes, same_as_baseline)
    plot(summary, args)
    return 0


def write_markdown(summary, shap, args, model_uri, loads, probes, modes,
                   same_as_baseline) -> None:
    import lightgbm

    cmd = (f"/work/venv/bin/python bench/bench_batch.py --sizes "
           f"{' '.join(map(str, args.sizes))} --repeats {args.repeats}"
           + (f" --baseline {args.baseline}" if args.baseline else ""))
    lines = [
        "# Batch scoring: `painplan recommend` and the cost of SHAP",
        "",
        f"`{cmd}` — model `{model_uri}` (trained by `training.pipeline.run` on "
        f"{args.episodes:,} simulated episodes, shared with bench_servers.py); patients = the "
        "§2 profile columns of simulated episodes, Parquet; top-k = 5 of 839 plans, safety "
        f"floor applied. Medians of {args.repeats} interleaved runs. The CLI's model cache "
        "(`PAINPLAN_MODEL_CACHE`) is `bench/out/batch/model-cache`, emptied before each "
        "first-run measurement.",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical "
        f"CPUs (shared with other jobs), Python {platform.python_version()}, LightGBM "
        f"{lightgbm.__version__}. 1-minute load average during the runs: "
        f"{', '.join(f'{x:.1f}' for x in loads)}. This virtual machine's speed drifts (the "
        "same runs were seen 2-3x slower within an hour with nothing else running), so two "
        "probes were taken before the runs and after each round: a 5M-iteration Python loop "
        f"{', '.join(f'{x:.2f}' for x, _ in probes)} s, and a fresh `python -c 'import numpy, "
        f"pandas'` {', '.join(f'{y:.2f}' for _, y in probes)} s.",
        "",
        "## `painplan recommend`, end to end (fresh process)",
        "",
        "| patients | model loading | wall s | patients/s (min–max) | start-up s | "
        "read + validate s | load model s | score + write s | goal ≥ 2,000/s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in summary:
        for mode in ("cached", "registry", "first", "baseline"):
            if mode not in r["cli"]:
                continue
            c = r["cli"][mode]
            st = c["stages"]
            lines.append(
                f"| {r['n']:,} | {modes[mode][2]} | {c['seconds']:.2f} | {c['rate']:,.0f} "
                f"({min(c['rates']):,.0f}–{max(c['rates']):,.0f}) | "
                f"{st.get('start-up', 0):.2f} | {st.get('read + validate', 0):.2f} | "
                f"{st.get('load model', 0):.2f} | {st.get('score + write', 0):.2f} | "
                f"**{'met' if c['rate'] >= GOAL else 'NOT met'}** |")
    lines += [
        "",
        "Stages are cut at the CLI's progress lines: *start-up* is interpreter start and "
        "imports (until `validating`), *read + validate* runs until `loading model`, *load "
        "model* is resolving the version in the registry plus the cache check and unpickling "
        "(or the MLflow download) until `scoring`, and *score + write* is everything after, "
        "including process exit. The cached and registry runs wrote identical Parquet tables "
        "(checked on every round). Both include the other start-up work of the same change "
        "(threaded scoring, no simulator import, collector settings); "
        + (f"the `{args.baseline}` rows are the code before it, run in the same rounds (it "
           "prints no `scoring` line, so its *load model* runs to the first ranked chunk); its "
           "output was "
           + ("identical in every round." if all(same_as_baseline) else "NOT identical.")
           if args.baseline else "rerun with `--baseline <commit>` for the code before it."),
    ]
    lines += [
        "",
        "## The same work in-process (no interpreter start, model already loaded, one "
        "scoring thread)",
        "",
        "| patients | read s | validate s | score (`recommend`) s | §7 rows s | write s | "
        "total s | patients/s | scoring only, patients/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary:
        ip = r["inproc"]
        lines.append(
            f"| {r['n']:,} | {ip['read']:.2f} | {ip['validate']:.2f} | "
            f"{ip['score (recommend)']:.2f} | {ip['§7 rows']:.2f} | {ip['write']:.2f} | "
            f"{ip['total']:.2f} | {r['inproc_rate']:,.0f} | {r['score_rate']:,.0f} |")
    lines += [
        "",
        "`recommend` per 5000-patient chunk: one tree pass per booster for the patients, the "
        "(patients × 839) plan products for expected improvement, interval, P(response), "
        "P(adverse event) and utility, the safety floor, and a stable sort for the top 5.",
        "",
        f"## SHAP (explanations), {shap['patients']} patients",
        "",
        "| what | ms |",
        "|---|---:|",
        f"| `explain_plans`, top 5 plans, per patient (what `/recommend` adds per request) | "
        f"{shap['explain_top5_ms_per_patient']:.2f} (p99 {shap['explain_top5_p99']:.2f}) |",
        f"| `explain_plans`, top 1 plan, per patient | "
        f"{shap['explain_top1_ms_per_patient']:.2f} |",
        f"| per explained plan row (top-5 cost / 5) | {shap['explain_ms_per_plan_row']:.2f} |",
        f"| marginal cost of one more explained plan | "
        f"{shap['explain_marginal_ms_per_extra_plan']:.2f} |",
        f"| raw TreeSHAP (`pred_contrib`), effect booster ({shap['n_trees_effect']} trees), "
        f"per patient row, in bulk / one row at a time | "
        f"{shap['pred_contrib_effect_ms_per_row_bulk']:.3f} / "
        f"{shap['pred_contrib_effect_ms_per_row_single']:.3f} |",
        f"| raw TreeSHAP, adverse-event booster ({shap['n_trees_ae']} trees), per patient "
        f"row, in bulk / one row at a time | "
        f"{shap['pred_contrib_adverse_event_ms_per_row_bulk']:.3f} / "
        f"{shap['pred_contrib_adverse_event_ms_per_row_single']:.3f} |",
        "",
        "The model is linear in the plan basis, so SHAP runs TreeSHAP once per *patient* (one "
        "`pred_contrib` row per booster) and each plan's values are a linear combination of "
        "those (recommender/explain.py); explaining more plans for the same patient costs "
        "only the combination and the phrasing. Nearly all of the per-patient time is "
        "Python/pandas overhead around one-row frames (encoding, evidence prior), not TreeSHAP.",
        "",
        "![batch throughput](batch.png)",
        "",
        f"Rerun: `{cmd}`",
        "",
    ]
    (args.out / "batch.md").write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {args.out / 'batch.md'}")


def plot(summary, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    labels = [f"{r['n']:,}" for r in summary]
    x = np.arange(len(summary))
    w = 0.2
    ax.bar(x - 1.5 * w, [r["registry_rate"] for r in summary], w,
           label="CLI, --no-model-cache (MLflow download)")
    ax.bar(x - 0.5 * w, [r["cli_rate"] for r in summary], w, label="CLI, model cache (default)")
    ax.bar(x + 0.5 * w, [r["inproc_rate"] for r in summary], w, label="in-process (read→write)")
    ax.bar(x + 1.5 * w, [r["score_rate"] for r in summary], w, label="scoring only")
    ax.axhline(GOAL, color="tab:red", ls=":", label="goal 2,000/s")
    ax.set_xticks(x, labels)
    ax.set(xlabel="patients", ylabel="patients / s", title="painplan recommend (top 5)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "batch.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
