"""Benchmark the safety gate: ``assess`` and ``allowed_plans`` on synthetic validated cohorts.

Run: ``python bench/bench_safety.py [--sizes 1000 10000 100000] [--repeats 9]``.
Writes ``bench/results/safety.md``. Validation time is not counted: the service and the
evaluations validate once and then call the gate.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from features.catalog import COMPONENT_CODES
from features.schema import PAIN_CONDITIONS, PRIOR_LEVELS, RISK_FLAGS
from features.validate import validate
from recommender.safety import RULES, RULESET_VERSION, assess, floor_violations

RESULTS = Path(__file__).parent / "results" / "safety.md"


def synthetic_patients(n: int, seed: int = 0) -> pd.DataFrame:
    """A validated patient frame with every risk flag and prior column populated."""
    rng = np.random.default_rng(seed)
    egfr = rng.uniform(10, 120, n)
    egfr[rng.random(n) < 0.2] = np.nan  # unknown renal function is common in primary care
    raw = {
        "patient_id": [f"p{i}" for i in range(n)],
        "age": rng.integers(18, 95, n),
        "sex": rng.choice(["female", "male"], n),
        "pain_condition": rng.choice(PAIN_CONDITIONS, n),
        "pain_duration_months": rng.uniform(3, 240, n),
        "pain_intensity": rng.uniform(0, 10, n),
        "peg": rng.uniform(0, 10, n),
        "phq9": rng.integers(0, 28, n),
        "gad7": rng.integers(0, 22, n),
        "alcohol_units_week": rng.exponential(8, n).clip(0, 300),
        "egfr": egfr,
    }
    for name in RISK_FLAGS:
        raw[name] = rng.random(n) < 0.08
    for code in COMPONENT_CODES:
        raw[f"prior_{code}"] = rng.choice(PRIOR_LEVELS, n, p=[0.6, 0.1, 0.1, 0.1, 0.1])
    return validate(pd.DataFrame(raw), "patients").frame


def median_ms(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    fn()  # warm-up: compile cache, BLAS threads
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), min(times)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} logical CPU(s); {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}, numpy {np.__version__}, pandas {pd.__version__}; "
        f"1-min load average at start {os.getloadavg()[0]:.2f} (other work slows the medians)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    if args.repeats < 7:
        parser.error("use at least 7 repeats so the median means something")

    rows = []
    for n in args.sizes:
        frame = synthetic_patients(n)
        a = assess(frame)
        # Sanity, not timing: no allowed plan may break the contract floor.
        allowed = a.allowed_plans()
        i, p = np.nonzero(allowed[: min(n, 200)])
        if floor_violations(frame.iloc[i].reset_index(drop=True), p).any():
            raise RuntimeError("an allowed plan breaks the CONTRACT §5 floor; fix safety.py")
        t_assess, t_assess_min = median_ms(lambda f=frame: assess(f), args.repeats)
        # replace(..., _allowed=None): a fresh assessment, so the cached matrix is not reused.
        t_allowed, t_allowed_min = median_ms(
            lambda a=a: replace(a, _allowed=None).allowed_plans(), args.repeats
        )
        t_flags, _ = median_ms(lambda a=a: replace(a, _allowed=None).plan_flags(), args.repeats)
        distinct = np.unique(a.gate_words, axis=1).shape[1]
        rows.append(
            (
                n,
                t_assess,
                t_assess_min,
                t_allowed,
                t_allowed_min,
                t_assess + t_allowed,
                t_flags,
                allowed.mean(),
                distinct,
            )
        )
        print(
            f"n={n}: assess {t_assess:.2f} ms, allowed_plans {t_allowed:.2f} ms, "
            f"plan_flags {t_flags:.2f} ms"
        )

    n_rules = len(RULES.rules) + len(RULES.pair_rules) + len(RULES.count_rules)
    lines = [
        "# Safety gate benchmark",
        "",
        f"`python bench/bench_safety.py` — ruleset `{RULESET_VERSION}` ({n_rules} rules); "
        f"median (and min) wall time over {args.repeats} repeats after one warm-up; "
        "validation not included.",
        "",
        f"Machine: {machine()}.",
        "",
        "| n patients | assess ms (median) | assess ms (min) | allowed_plans ms (median) "
        "| allowed_plans ms (min) | assess + allowed ms | plan_flags (839 plans) ms "
        "| share of plans allowed | distinct gate states |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, ta, tam, tp, tpm, tsum, tf, share, distinct in rows:
        lines.append(
            f"| {n:,} | {ta:.2f} | {tam:.2f} | {tp:.2f} | {tpm:.2f} | {tsum:.2f} "
            f"| {tf:.2f} | {share:.2f} | {distinct:,} |"
        )
    lines += [
        "",
        "`assess` = all component rules (12 × patients), pair-rule and count-rule triggers, "
        "and the blocked/review/warn component matrices. `allowed_plans` = the (n, 839) "
        "boolean matrix (first call; the assessment caches it). `plan_flags` = allowed, "
        "needs_review and has_warning for all 839 plans. Synthetic cohort: every risk flag "
        "set with p = 0.08, priors 10 % intolerant each, 20 % eGFR unknown. Patients with "
        "the same gate state (BLOCK/REVIEW/WARN words) share one row of the plan table, so "
        "timings fall for more homogeneous real cohorts; this cohort is deliberately diverse.",
        "",
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
