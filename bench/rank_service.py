"""Benchmark-only BentoML service: painplan's ranking **without** explanations or audit.

``POST /rank`` takes the same body as ``POST /recommend`` (``{"patient": {…}, "top_k": 5}``)
and does per request exactly the work of the MLflow pyfunc (``training/pyfunc.py``):
validate the profile with the contract validator, score all 839 plans, apply the safety floor,
rank, and return the CONTRACT §7 rows. No SHAP, no audit record, no API key. It exists so
``bench/bench_servers.py`` can compare BentoML and ``mlflow models serve`` on the *same*
work; the product service (``recommender/service.py``) has no switch to turn explanations or
the audit off, and should not get one for a benchmark.

It mirrors the product service's execution model: the Starlette app reads the body on the
event loop and scores in a worker thread (``PAINPLAN_THREADS`` at once, default 2) with one
OpenMP thread per request.

    BENTOML_HOME=… PAINPLAN_MODEL_TAG=painplan:v1-… \\
        python -m bentoml serve rank_service:RankOnly --working-dir bench --port 38423
"""

from __future__ import annotations

import os
import time

import anyio
import bentoml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from threadpoolctl import ThreadpoolController

from features.schema import PATIENT_ID
from recommender.api_schema import InvalidRequest, parse_recommend
from recommender.recommend import ranked_rows, recommend
from recommender.service import load_served_model


async def _rank(request: Request) -> Response:
    service = bentoml.get_current_service()
    return await service.answer(request)


_app = Starlette(routes=[Route("/rank", _rank, methods=["POST"])])


@bentoml.service(name="painplan_rank_only", traffic={"timeout": 60})
@bentoml.asgi_app(_app, path="/")
class RankOnly:
    def __init__(self) -> None:
        self.served = load_served_model(os.environ["PAINPLAN_MODEL_TAG"])
        self.threads = int(os.environ.get("PAINPLAN_THREADS", "2"))
        self._limiter: anyio.CapacityLimiter | None = None
        self._openmp = ThreadpoolController()

    def work(self, body: bytes) -> list[dict]:
        parsed = parse_recommend(body)
        with self._openmp.limit(limits=1, user_api="openmp"):
            ranked = recommend(self.served.bundle.model, parsed.patient, parsed.top_k)
        rows = ranked_rows(ranked, parsed.patient[PATIENT_ID].to_numpy())
        return rows.to_dict(orient="records")

    async def answer(self, request: Request) -> Response:
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.threads)
        body = await request.body()
        started = time.perf_counter()
        try:
            rows = await anyio.to_thread.run_sync(self.work, body, limiter=self._limiter)
        except InvalidRequest as err:
            return JSONResponse({"error": err.error, "message": str(err)}, status_code=err.status)
        spent = 1000 * (time.perf_counter() - started)
        return JSONResponse({"model": self.served.info, "predictions": rows},
                            headers={"Server-Timing": f"app;dur={spent:.1f}"})
