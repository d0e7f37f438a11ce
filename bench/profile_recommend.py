"""Where one warm ``POST /recommend`` spends its time, in process (no HTTP).

    /work/venv/bin/python bench/profile_recommend.py [--batch 1] [--requests 300] [--profile]

Uses the model of ``bench/bench_servers.py`` (trained and registered once, cached under
``bench/out/servers/``), builds ``PainPlanAPI`` as the service does (SQLite audit store in a
temporary directory), warms it up, then times ``PainPlanAPI.recommend_many`` on batches of
``--batch`` simulated patients: CPU time of the calling thread per answer (steadier than wall
time on a shared machine) and, for each stage, the CPU it takes alone. ``--profile`` adds a
pyinstrument call tree (``pip install pyinstrument``; in the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))


def cpu_ms(fn, n: int, warm: int = 5) -> float:
    """Median CPU milliseconds of ``fn(i)`` in this thread."""
    for i in range(warm):
        fn(i)
    times = []
    for i in range(n):
        t0 = time.thread_time()
        fn(i)
        times.append(1000 * (time.thread_time() - t0))
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1, help="requests per batch (default 1)")
    parser.add_argument("--requests", type=int, default=300, help="batches timed (300)")
    parser.add_argument("--profile", action="store_true", help="print a pyinstrument tree")
    args = parser.parse_args(argv)

    from bench_servers import TOP_K, profiles, use_store

    _store, model_uri, run_id, bundle_dir, _ = use_store(args.episodes, args.seed)
    os.environ.update({
        "PAINPLAN_API_KEYS": "clinician:" + secrets.token_hex(16),
        "PAINPLAN_HMAC_KEY": secrets.token_hex(32),
        "PAINPLAN_AUDIT_URL": f"sqlite:///{tempfile.mkdtemp()}/audit.db",
    })
    from threadpoolctl import threadpool_limits

    from recommender.api import PainPlanAPI
    from recommender.api_schema import parse_recommend_many
    from recommender.audit import AuditStore, utc_now
    from recommender.recommend import recommend_each
    from recommender.safety import assess
    from recommender.service import import_model, load_served_model
    from recommender.settings import ServiceConfig

    tag = import_model(bundle_dir, version=model_uri.rsplit("/", 1)[-1], run_id=run_id)
    os.environ["PAINPLAN_MODEL_TAG"] = tag
    config = ServiceConfig.from_env()
    store = AuditStore(config.audit_url)
    store.create_schema()
    api = PainPlanAPI(load_served_model(tag), store, config)
    model = api.model
    bodies = [json.dumps({"patient": p, "top_k": TOP_K}).encode()
              for p in profiles(200, seed=args.seed + 1)]
    k, n = args.batch, len(bodies)

    def batch(i: int) -> list[bytes]:
        start = (i * k) % n
        return (bodies + bodies)[start:start + k]

    parsed = [parse_recommend_many(batch(i)) for i in range(n)]
    values = [[item.profile for item in items] for items in parsed]
    encoded = [model.encoder_.transform_values(v) for v in values]
    names = model.encoder_.feature_names_
    scored = [api._score_values(values[i], [TOP_K] * k) for i in range(n)]
    records = [[api._answer(item, s, utc_now(), None)[1] for item, s in zip(items, sc, strict=True)]
               for items, sc in zip(parsed, scored, strict=True)]
    print(f"model {tag}; batches of {k}; 1-minute load average {os.getloadavg()[0]:.1f}")
    whole = cpu_ms(lambda i: api.recommend_many(batch(i)), args.requests)
    print(f"PainPlanAPI.recommend_many: {whole:.2f} ms CPU per batch, {whole / k:.2f} per answer")

    def commit(i):
        store.record_requests([replace(r, request_id=str(uuid.uuid4())) for r in records[i % n]])

    with threadpool_limits(1, user_api="openmp"):
        stages = {
            "parse + validate (parse_recommend_many)": lambda i: parse_recommend_many(batch(i)),
            "score + explain (PainPlanAPI._score_values)":
                lambda i: api._score_values(values[i % n], [TOP_K] * k),
            "  encoding (PatientEncoder.transform_values)":
                lambda i: model.encoder_.transform_values(values[i % n]),
            "  scoring (recommend_each)":
                lambda i: recommend_each(model, None, [TOP_K] * k, X=encoded[i % n]),
            "    the safety table (assess)":
                lambda i: assess(None, encoded=(encoded[i % n], names)),
            "    coefficients (patient_coefficients)":
                lambda i: model.patient_coefficients(None, X=encoded[i % n]),
            "answers and audit records (PainPlanAPI._answer)": lambda i: [
                api._answer(it, s, utc_now(), None)
                for it, s in zip(parsed[i % n], scored[i % n], strict=True)],
            "audit commit (AuditStore.record_requests)": commit,
        }
        for name, fn in stages.items():
            print(f"  {name}: {cpu_ms(fn, args.requests) / k:.2f} ms CPU per answer")
    t0 = time.perf_counter()
    for i in range(50):
        commit(i)
    print(f"  audit commit, wall time (fsync included): {1000 * (time.perf_counter() - t0) / 50:.2f}"
          " ms per batch")
    if args.profile:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0005)
        profiler.start()
        for i in range(args.requests):
            api.recommend_many(batch(i))
        profiler.stop()
        print(profiler.output_text(unicode=False, color=False))
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
