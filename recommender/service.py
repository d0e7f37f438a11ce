"""The HTTP service (CONTRACT §8) and the BentoML model store: the only module that
imports ``bentoml``.

How a model gets here
---------------------
``training.register.promote`` moves MLflow's ``champion`` alias and then runs, as a
subprocess (training and serving never import each other)::

    python -m recommender.service import-model --bundle DIR --version V --run-id R

which verifies the bundle (content hash, feature schema, safety ruleset, a smoke test) and
copies it into BentoML's model store as ``painplan:v<V>-<first 12 hex of its sha256>``, with
labels and metadata naming the registered model and version, the MLflow run id, the data
hash, the ruleset version, the schema fingerprint and the content hash. The tag carries the
content hash, so importing the same version twice is a no-op and two different bundles can
never share a tag. ``BENTOML_HOME`` defaults to ``$PAINPLAN_HOME/bentoml``.

Start-up
--------
The service serves ``PAINPLAN_MODEL_TAG`` (``painplan serve`` passes the champion's explicit
tag; the fallback ``painplan:latest`` is resolved to a version once, at start-up, and that
version is what every answer names). Before any worker starts, an ``on_deployment`` hook
checks the configuration, loads and verifies the model and creates the audit tables; a
missing model (:class:`~features.errors.ModelNotFound`), a tampered one (content hash
mismatch) or an incompatible one (other feature schema or safety ruleset) stops
``bentoml serve`` with a one-paragraph message and exit code 1. Each worker then loads the
model once, in ``__init__``.

Routes
------
BentoML provides ``/livez``, ``/readyz`` and ``/metrics`` (Prometheus; painplan adds
``painplan_rejected_requests_total`` and ``painplan_audit_failures_total``). The painplan
routes are a Starlette app mounted on the service, because they need what ``@bentoml.api``
does not give: the key is checked before the body is read (401/403 first), the body size is
capped (413) before parsing, invalid input gets the contract's named-field 400 body, and an
answer whose audit record cannot be committed becomes a 503. The behaviour itself lives in
:class:`recommender.api.PainPlanAPI`; see ``GET /openapi.json`` for the schemas.

``POST /recommend`` requests that arrive while a batch is being scored are answered
together as the next micro-batch (:mod:`recommender.batching`,
``PainPlanAPI.recommend_many``; docs/serving.md): each answer is exactly what the request
would get alone, and no request waits when the service is idle.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import bentoml
from bentoml.exceptions import BentoMLException, NotFound
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from features.errors import ConfigError, ModelError, ModelNotFound, PainplanError
from recommender.access import AccessDenied, Role
from recommender.api import PainPlanAPI, ServedModel
from recommender.api_schema import InvalidRequest, openapi_document, violation
from recommender.artifact import METADATA_FILE, load_bundle
from recommender.audit import AuditStore, AuditUnavailable
from recommender.batching import MicroBatcher
from recommender.cds_routes import create_cds_app
from recommender.cpu_affinity import pin_process
from recommender.safety import RULESET_VERSION
from recommender.settings import ServiceConfig, default_bentoml_home
from recommender.web import UI_PATH, ui_app  # clinician/auditor pages (/ui)

log = logging.getLogger(__name__)

MODEL_NAME = "painplan"  # name of the model in BentoML's store
CARD_FILE = "model_card.md"

REJECTED = bentoml.metrics.Counter(
    name="painplan_rejected_requests",
    documentation="Requests refused with a 4xx answer; nothing else is kept of them",
    labelnames=["endpoint", "status"],
)
AUDIT_FAILURES = bentoml.metrics.Counter(
    name="painplan_audit_failures",
    documentation="Answers withheld (503) because the audit store could not record them",
    labelnames=["endpoint"],
)
with warnings.catch_warnings():
    # bentoml.metrics warns (DeprecationWarning) on the first use of a metric type it has not
    # handed out before; under `python -m recommender.service` that would reach stderr,
    # whose one line operators read. It stays the way to create metrics in a worker.
    warnings.simplefilter("ignore", DeprecationWarning)
    BATCH_SIZE = bentoml.metrics.Histogram(
        name="painplan_recommend_batch_size",
        documentation="POST /recommend requests answered together in one micro-batch",
        buckets=(1, 2, 4, 8, 16, 32, 64, float("inf")),
    )


# --------------------------------------------------------------------------- model store


def serving_tag(version: str, content_sha256: str, model_name: str = MODEL_NAME) -> str:
    """``<name>:v<version>-<12 hex>``: explicit, and unique per content."""
    return f"{model_name}:v{version}-{content_sha256[:12]}".lower()


def import_model(
    bundle_dir: str | os.PathLike,
    *,
    version: str,
    run_id: str | None = None,
    registered_name: str = "painplan",
    model_name: str = MODEL_NAME,
) -> str:
    """Verify a model bundle and put it into BentoML's model store; return its tag.

    Idempotent: a bundle already stored under its tag is left as it is.
    """
    bundle_dir = Path(bundle_dir)
    bundle = load_bundle(bundle_dir, expected_ruleset=RULESET_VERSION)
    meta = bundle.metadata
    recorded_run = meta.get("mlflow_run_id")
    if run_id and recorded_run and run_id != recorded_run:
        raise ConfigError(
            f"--run-id {run_id} does not match the MLflow run {recorded_run} recorded in the "
            f"bundle at {bundle_dir}; pass the run that logged this bundle (or omit --run-id)."
        )
    sha = meta["content_sha256"]
    tag = serving_tag(str(version), sha, model_name)
    try:
        existing = bentoml.models.get(tag)
    except NotFound:
        existing = None
    if existing is not None:
        if existing.info.metadata.get("content_sha256") != sha:
            raise ModelError(
                f"BentoML model {tag} exists with other content than {bundle_dir}; the store "
                "was modified by hand. Delete it ('bentoml models delete "
                f"{tag}') and import again."
            )
        log.info("model %s is already in the BentoML store", tag)
        return tag
    lineage = {
        "registered_model": registered_name,
        "registered_version": str(version),
        "mlflow_run_id": run_id or recorded_run,
        "data_hash": meta.get("data_hash"),
        "ruleset_version": meta.get("ruleset_version"),
        "schema_fingerprint": meta.get("schema_fingerprint"),
        "content_sha256": sha,
    }
    labels = {k: str(v) for k, v in lineage.items() if v is not None}
    metadata = {
        **lineage,
        "imported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "bundle": meta,
    }
    with bentoml.models.create(tag, labels=labels, metadata=metadata) as stored:
        for path in bundle_dir.iterdir():
            if path.is_file():
                shutil.copy2(path, stored.path_of(path.name))
    log.info(
        "imported %s (run %s) into the BentoML store as %s",
        registered_name,
        lineage["mlflow_run_id"],
        tag,
    )
    return tag


def _store_tags() -> list[str]:
    try:
        return sorted(str(m.tag) for m in bentoml.models.list(MODEL_NAME))
    except (BentoMLException, OSError):
        return []


def load_served_model(tag: str) -> ServedModel:
    """Load and verify the model behind ``tag`` from BentoML's store.

    Raises ModelNotFound (no such model), ModelError (content hash mismatch: tampered or
    truncated) or IncompatibleModel (feature schema or safety ruleset differ).
    """
    try:
        stored = bentoml.models.get(tag)
    except NotFound as err:
        known = ", ".join(_store_tags()[-5:]) or "none"
        raise ModelNotFound(
            f"no model {tag!r} in the BentoML model store "
            f"({os.environ.get('BENTOML_HOME', '~/bentoml')}; "
            f"painplan models there: {known}). Run 'painplan serve', which imports the MLflow "
            "champion, or import a bundle with 'python -m recommender.service import-model "
            "--bundle DIR --version V', or set PAINPLAN_MODEL_TAG to a stored tag."
        ) from err
    except BentoMLException as err:
        raise ConfigError(
            f"PAINPLAN_MODEL_TAG={tag!r} is not a usable BentoML tag ({err}); write it as "
            "name:version, e.g. painplan:v3-0123456789ab."
        ) from err
    path = Path(stored.path)
    try:
        bundle = load_bundle(path, expected_ruleset=RULESET_VERSION)
    except ModelError as err:
        raise type(err)(f"cannot serve model {stored.tag}: {err}") from err
    meta = stored.info.metadata
    if bundle.metadata.get("content_sha256") != meta.get("content_sha256"):
        raise ModelError(
            f"cannot serve model {stored.tag}: its {METADATA_FILE} records content hash "
            f"{str(bundle.metadata.get('content_sha256'))[:12]}…, but the model was imported "
            f"with {str(meta.get('content_sha256'))[:12]}…; the stored files were replaced "
            "after import. Delete the model from the BentoML store and import it again from "
            "the MLflow registry ('painplan serve' does this for the champion)."
        )
    info = {
        "name": meta.get("registered_model", MODEL_NAME),
        "version": str(meta.get("registered_version", stored.tag.version)),
        "tag": str(stored.tag),
        "mlflow_run_id": meta.get("mlflow_run_id"),
        "ruleset_version": RULESET_VERSION,
    }
    card_path = path / CARD_FILE
    card = {
        "lineage": {
            k: meta.get(k)
            for k in (
                "registered_model",
                "registered_version",
                "mlflow_run_id",
                "data_hash",
                "ruleset_version",
                "schema_fingerprint",
                "content_sha256",
                "imported_at",
            )
        },
        "bundle": bundle.metadata,
        "bentoml": {
            "tag": str(stored.tag),
            "labels": dict(stored.info.labels),
            "created_at": stored.info.creation_time.isoformat(),
        },
        "model_card": card_path.read_text(encoding="utf-8") if card_path.is_file() else None,
    }
    return ServedModel(bundle=bundle, info=info, card=card)


# --------------------------------------------------------------------------- HTTP layer


def _error(
    status: int,
    error: str,
    message: str,
    violations: list | None = None,
    headers: dict | None = None,
) -> JSONResponse:
    return JSONResponse(
        {"error": error, "message": message, "violations": violations or []},
        status_code=status,
        headers=headers,
    )


def _render(answer: dict) -> bytes:
    """The JSON body of an answer, exactly as Starlette's JSONResponse renders it, but in
    the worker thread that computed the answer: the event loop then only sends bytes, and
    keeps serving other connections meanwhile."""
    return json.dumps(answer, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode(
        "utf-8"
    )


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it exceeds ``limit`` bytes (declared or sent)."""
    too_large = InvalidRequest(
        [
            violation(
                "(body)",
                f"the request body exceeds {limit} bytes "
                "(PAINPLAN_MAX_BODY_BYTES); send one patient per request",
                has_value=False,
            )
        ],
        status=413,
        error="payload_too_large",
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


Work = Callable[[PainPlanAPI, Any], dict]
Extract = Callable[[Request, int], Awaitable[Any]]


async def _path_id(request: Request, _limit: int) -> str:
    return request.path_params["request_id"]


async def _query(request: Request, _limit: int) -> dict:
    return dict(request.query_params)


async def _nothing(_request: Request, _limit: int) -> None:
    return None


def _route(
    path: str,
    method: str,
    endpoint: str,
    role: Role,
    work: Work | None,
    extract: Extract,
    ok: int = 200,
) -> Route:
    """A painplan route; ``work=None`` sends the input to the service's micro-batcher."""

    async def handle(request: Request) -> Response:
        service = bentoml.get_current_service()
        return await service.answer(request, endpoint, role, work, extract, ok)

    return Route(path, handle, methods=[method], name=endpoint)


async def _openapi(_request: Request) -> Response:
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("painplan")
    except PackageNotFoundError:  # a built Bento carries the source, not the package
        release = "unknown"
    return JSONResponse(openapi_document(release))


# (path, method, endpoint name for metrics, role, what to run, how to read the input)
_app = Starlette(
    routes=[
        # PainPlanAPI.recommend_many, in micro-batches (PainPlan._batched)
        _route("/recommend", "POST", "recommend", "clinician", None, _read_body),
        _route("/explain", "POST", "explain", "clinician", PainPlanAPI.explain, _read_body),
        _route(
            "/outcomes",
            "POST",
            "outcomes",
            "clinician",
            PainPlanAPI.report_outcome,
            _read_body,
            ok=201,
        ),
        _route(
            "/audit/{request_id}",
            "GET",
            "audit_record",
            "auditor",
            PainPlanAPI.audit_record,
            _path_id,
        ),
        _route("/audit", "GET", "audit_query", "auditor", PainPlanAPI.audit_query, _query),
        _route("/model", "GET", "model", "auditor", lambda api, _: api.model_card(), _nothing),
        Route("/openapi.json", _openapi, methods=["GET"], name="openapi"),
    ]
)


def _startup_config() -> tuple[ServiceConfig, ServedModel, AuditStore]:
    config = ServiceConfig.from_env()
    served = load_served_model(config.model_tag)
    store = AuditStore(config.audit_url)
    store.create_schema()
    return config, served, store


def _exit_with_arbiter(poll_s: float = 0.5) -> None:
    """Stop this worker when the ``bentoml serve`` process that started it is gone.

    BentoML starts workers in sessions of their own, so when the server is killed (SIGKILL
    of its process group, the OOM killer) a worker would live on as an orphan: answering on
    the inherited socket under no supervisor, and holding the port, so that restarting the
    service fails with "Address already in use" (docs/reliability.md). A committed audit
    record is unaffected by the exit; an uncommitted one is rolled back and its answer was
    never sent.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        log.error("the bentoml serve process (pid %d) is gone; this worker exits too", parent)
        os._exit(70)

    threading.Thread(target=watch, name="painplan-arbiter-watch", daemon=True).start()


def _freeze_startup_objects() -> None:
    """Keep what start-up allocated out of every later garbage collection.

    A worker holds several hundred thousand long-lived objects (the imported libraries, the
    model, the schemas). Python's full (generation 2) collection walks all of them: measured
    at 240-310 ms per collection on the bench machine, which stalled every request in
    flight and set p99 under load. ``gc.freeze()`` moves them to a permanent generation, so
    a full collection only walks what requests allocate (measured: < 1 ms). They were alive
    for the life of the process anyway; nothing that becomes garbage later is kept.
    """
    gc.collect()
    gc.freeze()


@bentoml.service(name="painplan", traffic={"timeout": 60})
@bentoml.asgi_app(_app, path="/")
@bentoml.asgi_app(ui_app, path=UI_PATH)  # the web pages; they call the routes above
@bentoml.asgi_app(  # CDS Hooks for EHRs; recommendations go through the same PainPlanAPI
    create_cds_app(lambda: bentoml.get_current_service().api), path="/")
class PainPlan:
    """Safety-gated plan recommendations with SHAP explanations and an audit trail."""

    @bentoml.on_deployment
    def check_before_serving() -> None:
        """Runs once in ``bentoml serve`` before workers start: refuse to serve at all,
        with one paragraph, rather than start workers that fail one after another."""
        try:
            _, _, store = _startup_config()
            store.close()
        except PainplanError as err:
            raise SystemExit(f"painplan service cannot start: {err}") from None

    def __init__(self) -> None:
        config, served, store = _startup_config()
        self.api = PainPlanAPI(served, store, config)
        self._limiter: anyio.CapacityLimiter | None = None
        self._batcher: MicroBatcher | None = None
        worker = bentoml.server_context.worker_index
        if worker is not None:  # a `bentoml serve` worker
            _exit_with_arbiter()
            if config.cpu_affinity:
                log.info("worker %d pinned to CPU %s", worker, pin_process(worker))
        _freeze_startup_objects()
        log.info(
            "serving %s version %s (%s, MLflow run %s); audit store %r",
            served.info["name"],
            served.info["version"],
            served.info["tag"],
            served.info["mlflow_run_id"],
            store,
        )

    def __is_ready__(self) -> bool:
        return True  # the model was loaded and verified in __init__

    def _recommend_rendered(self, bodies: list[bytes]) -> list:
        return [
            a if isinstance(a, BaseException) else _render(a)
            for a in self.api.recommend_many(bodies)
        ]

    async def _run_batch(self, bodies: list[bytes]) -> list:
        return await anyio.to_thread.run_sync(
            self._recommend_rendered, bodies, limiter=self._limiter
        )

    async def answer(
        self,
        request: Request,
        endpoint: str,
        role: Role,
        work: Work | None,
        extract: Extract,
        ok: int,
    ) -> Response:
        """Check the key, read the input, compute and render the answer in a worker thread,
        map errors.

        ``work=None`` (``POST /recommend``): the body joins the micro-batcher, which runs
        at most one batch at a time in a worker thread (docs/serving.md)."""
        if self._limiter is None:  # created on the event loop that serves requests
            self._limiter = anyio.CapacityLimiter(self.api.config.threads)
            self._batcher = MicroBatcher(
                self._run_batch, max_batch=self.api.config.max_batch, on_batch=BATCH_SIZE.observe
            )
        try:
            self.api.authorize(request.headers.get("authorization"), role)
            data = await extract(request, self.api.config.max_body_bytes)
            started = time.perf_counter()
            if work is None:
                answer = await self._batcher.submit(data)
            else:
                answer = await anyio.to_thread.run_sync(
                    lambda: _render(work(self.api, data)), limiter=self._limiter
                )
            spent = 1000 * (time.perf_counter() - started)
        except AccessDenied as err:
            REJECTED.labels(endpoint=endpoint, status=str(err.status)).inc()
            headers = {"WWW-Authenticate": 'Bearer realm="painplan"'} if err.status == 401 else None
            return _error(
                err.status,
                "unauthorized" if err.status == 401 else "forbidden",
                str(err),
                headers=headers,
            )
        except InvalidRequest as err:
            REJECTED.labels(endpoint=endpoint, status=str(err.status)).inc()
            return _error(err.status, err.error, str(err), err.violations)
        except AuditUnavailable as err:
            AUDIT_FAILURES.labels(endpoint=endpoint).inc()
            log.error("%s: answer withheld, audit record not committed: %s", endpoint, err)
            return _error(
                503,
                "audit_unavailable",
                f"the answer was not given because it could not be recorded: {err}",
                headers={"Retry-After": "5"},
            )
        # Server-Timing lets a client (and bench/bench_serving.py) split its latency into the
        # painplan work (queueing for a thread included) and everything around it.
        return Response(
            answer,
            status_code=ok,
            media_type="application/json",
            headers={"Server-Timing": f"app;dur={spent:.1f}"},
        )


# --------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m recommender.service import-model …`` (used by ``training.register``)."""
    parser = argparse.ArgumentParser(prog="python -m recommender.service")
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser(
        "import-model",
        help="verify a model bundle and put it into BentoML's model store; prints its tag",
    )
    imp.add_argument("--bundle", required=True, metavar="DIR", help="model bundle directory")
    imp.add_argument("--version", required=True, metavar="V", help="registered version")
    imp.add_argument("--run-id", metavar="R", help="MLflow run id that logged the bundle")
    imp.add_argument(
        "--registered-name",
        default="painplan",
        metavar="NAME",
        help="registered model name in MLflow (default: painplan)",
    )
    chk = sub.add_parser("check-model", help="load and verify a stored model; prints its tag")
    chk.add_argument("--tag", metavar="TAG", help="default: PAINPLAN_MODEL_TAG or painplan:latest")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Set before the store is first touched (bentoml resolves its home lazily).
    os.environ.setdefault("BENTOML_HOME", str(default_bentoml_home()))
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    try:
        if args.command == "import-model":
            tag = import_model(
                args.bundle,
                version=args.version,
                run_id=args.run_id,
                registered_name=args.registered_name,
            )
        else:
            from recommender.settings import DEFAULT_MODEL_TAG, MODEL_TAG_ENV

            tag = load_served_model(
                args.tag or os.environ.get(MODEL_TAG_ENV) or DEFAULT_MODEL_TAG
            ).info["tag"]
    except PainplanError as err:
        sys.stderr.write(f"painplan {args.command}: error: {err}\n")
        return 3 if isinstance(err, ModelError) else 4
    sys.stdout.write(tag + "\n")  # the one line callers read
    return 0


__all__ = ["PainPlan", "import_model", "load_served_model", "main", "serving_tag"]

if __name__ == "__main__":
    sys.exit(main())
