"""Fuzz the HTTP API in-process: ≥ 2,000 generated requests, zero 5xx, every 4xx names the
field, one audit row per answer (docs/reliability.md §1).

Run: ``python bench/bench_fuzz.py [--targeted 1400] [--schema-cases 700] [--seeds 2]
[--audit sqlite|postgres]``. Writes ``bench/results/fuzz.md`` (``fuzz-postgres.md`` with a
PostgreSQL audit store, a private cluster started for the run); exits 1 when the oracle
found a problem. The generators and the oracle are ``tests/reliability/reliability_harness.py``
(the CI test, tests/reliability/test_fuzz.py, runs 450 of the same requests).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "reliability"))
import reliability_harness as H  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "fuzz.md"
CACHE = Path(__file__).parent / "out" / "reliability-bundle"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targeted", type=int, default=1400, help="targeted cases per seed")
    parser.add_argument("--schema-cases", type=int, default=700,
                        help="schemathesis cases per seed")
    parser.add_argument("--seeds", type=int, default=1, help="seeds (runs)")
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--audit", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--max-body", type=int, default=65536)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="painplan-fuzz-"))
    os.environ["BENTOML_HOME"] = str(work / "bentoml")
    os.environ["BENTOML_DO_NOT_TRACK"] = "true"
    if not (CACHE / "model.pkl").is_file():
        print("training a small bundle …", flush=True)
        H.train_bundle(CACHE)
    tag, bentoml_home = H.import_here(CACHE, version="1")
    pg = None
    if args.audit == "postgres":
        pg = H.ThrowawayPostgres()
        pg.start()
        audit_url = pg.create_database("painplan_fuzz")
    else:
        audit_url = f"sqlite:///{work}/audit.db"
    os.environ.update(H.service_env(bentoml_home=bentoml_home, home=work / "home", tag=tag,
                                    audit_url=audit_url,
                                    PAINPLAN_MAX_BODY_BYTES=str(args.max_body)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient
    from recommender.service import PainPlan

    logging.getLogger("features.validate").setLevel(logging.ERROR)  # one line per extra field
    report = H.FuzzReport()
    load_start = os.getloadavg()[0]
    t0 = time.monotonic()
    try:
        with TestClient(PainPlan.to_asgi(), raise_server_exceptions=False) as client:
            seed_body = {"patient": H.random_profile(random.Random(0), H.SENTINEL_ID)}
            first = client.post("/recommend", json=seed_body,
                                headers={"Authorization": f"Bearer {H.CLINICIAN_KEY}"})
            request_id = first.json()["request_id"]
            document = client.get("/openapi.json").json()
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                H.fuzz(H.asgi_sender(client), targeted=args.targeted,
                       schema_cases=args.schema_cases, seed=seed, max_body=args.max_body,
                       document=document, request_id=request_id, report=report)
                print(json.dumps(H.fuzz_summary(report)), flush=True)
        report.seconds = time.monotonic() - t0
        try:
            rows = H.check_rows(audit_url, [request_id, *report.answered], exact=True)
            rows_ok = True
        except AssertionError as err:
            rows, rows_ok = {"error": str(err)}, False
    finally:
        if pg is not None:
            pg.close()
    write(report, rows, rows_ok, args, load_start, os.getloadavg()[0])
    return 0 if not report.problems and rows_ok else 1


def write(report: H.FuzzReport, rows: dict, rows_ok: bool, args, load_start, load_end) -> None:
    import hypothesis
    import schemathesis

    summary = H.fuzz_summary(report)
    families: dict[str, Counter] = {}
    for (kind, status), n in report.kind_status.items():
        family = "/".join(kind.split("/")[:2]) if kind.startswith("schemathesis") else \
            kind.split("/")[0]
        families.setdefault(family, Counter())[status] += n
    statuses = sorted(report.statuses)
    server_errors = sum(n for s, n in report.statuses.items() if s >= 500)
    lines = [
        "# Fuzzing benchmark",
        "",
        f"`python bench/bench_fuzz.py --targeted {args.targeted} --schema-cases "
        f"{args.schema_cases} --seeds {args.seeds} --first-seed {args.first_seed} --audit "
        f"{args.audit}` — the service in-process (Starlette TestClient over "
        "`PainPlan.to_asgi()`: the whole ASGI stack, key check, body limit "
        f"{args.max_body} bytes, error mapping, audit commit to {args.audit}), schemathesis "
        f"{schemathesis.__version__} cases from the service's `GET /openapi.json` plus targeted "
        f"Hypothesis {hypothesis.__version__} mutations; generators and oracle in "
        "`tests/reliability/reliability_harness.py`.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} logical CPU(s), Python "
        f"{platform.python_version()}; 1-min load average {load_start:.2f} at start, "
        f"{load_end:.2f} at end; {report.seconds:.0f} s in all.",
        "",
        f"**{summary['requests']} requests; 5xx: {server_errors}; oracle problems: "
        f"{len(report.problems)}; audit rows "
        f"{rows.get('rows', '?')} = answered /recommend + /explain "
        f"{len(report.answered) + 1}: {'yes' if rows_ok else 'NO'}.**",
        "",
        "| family | " + " | ".join(str(s) for s in statuses) + " | total |",
        "|---|" + "---:|" * (len(statuses) + 1),
    ]
    for family in sorted(families):
        counts = families[family]
        lines.append(f"| {family} | " + " | ".join(str(counts.get(s, 0)) for s in statuses)
                     + f" | {sum(counts.values())} |")
    lines.append("| **all** | " + " | ".join(f"**{report.statuses[s]}**" for s in statuses)
                 + f" | **{summary['requests']}** |")
    lines += [
        "",
        f"Latency per request (in-process, all statuses): p50 {summary['p50_ms']:.1f} ms, p99 "
        f"{summary['p99_ms']:.1f} ms, max {summary['max_ms']:.1f} ms.",
        "",
        "Families: `recommend` (valid profiles; wrong types, out-of-range and huge numbers per "
        "column; missing required columns; extra patient fields with free text; unknown "
        "top-level fields; bad `top_k`; `patient` not an object), `malformed` (truncated, "
        "invalid UTF-8, BOM, UTF-16, trailing bytes, single quotes, not an object, empty, "
        "binary, nesting up to the body limit), `unicode` (lone surrogate escapes in values "
        "and keys), `oversize` (declared and chunked bodies over the limit, every POST "
        "route), `explain` (valid and rule-breaking/unknown/unicode plans), `outcomes` "
        "(valid, unknown ids, bad plan/peg_12wk/adverse_event, missing/extra fields), "
        "`audit` (known and random ids, odd query values and parameters), `auth` (no key, "
        "wrong scheme, unknown key, wrong role), `model`, `fhir` (`{\"fhir_bundle\": …}` "
        "requests: a minimal rankable bundle as is, or with an option, an element, deep "
        "nesting or a lone surrogate replaced); `schemathesis/positive|negative` "
        "for every operation (one in ten with schemathesis' own generated Authorization "
        "header).",
        "",
    ]
    if report.problems:
        lines += ["## Problems", "", *[f"- `{p[:400]}`" for p in report.problems], ""]
    out = RESULTS if args.audit == "sqlite" else RESULTS.with_name(f"fuzz-{args.audit}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
