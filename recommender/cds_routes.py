"""HTTP routes of the CDS Hooks surface, mounted on the BentoML service at ``/cds-services``.

The behaviour lives in :mod:`recommender.cds_hooks` (discovery, the patient-view hook, cards,
feedback) and :mod:`recommender.cds_auth` (JWT bearer checks); this module only does HTTP:
read the body, authenticate, run the hook in a worker thread, return JSON. It does not
import ``bentoml`` — the service hands it a function returning its :class:`PainPlanAPI`, so
recommendations made for an EHR go through exactly the ``/recommend`` code path and are
audited the same way.

Authentication follows CDS Hooks 2.0 (JWT from an allow-listed issuer, audience = the
service URL, ``exp``, ``jti`` replay check); ``PAINPLAN_CDS_AUTH=off`` switches it off for the
demo. ``PAINPLAN_PUBLIC_URL`` is the base URL the EHR calls (default: the request's own).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from recommender import cds_hooks
from recommender.cds_auth import AuthConfig, AuthError, authenticate

if TYPE_CHECKING:
    from recommender.api import PainPlanAPI

log = logging.getLogger(__name__)
PUBLIC_URL_ENV = "PAINPLAN_PUBLIC_URL"
# A patient-view call carries its prefetched FHIR resources, far larger than a /recommend body.
MAX_CDS_BODY_BYTES = 5 * 2**20


@lru_cache(maxsize=1)
def _auth_config() -> AuthConfig:
    return AuthConfig.from_env()


@lru_cache(maxsize=1)
def _settings() -> cds_hooks.CdsSettings:
    return cds_hooks.CdsSettings.from_env()


def _base_url(request: Request) -> str:
    return os.environ.get(PUBLIC_URL_ENV, str(request.base_url).rstrip("/")).rstrip("/")


def _outcome(status: int, message: str, **kw) -> JSONResponse:
    status, body = cds_hooks.error_response(status, message, **kw)
    return JSONResponse(body, status_code=status)


def _check(request: Request, audience: str) -> JSONResponse | None:
    try:
        authenticate(request.headers.get("authorization"), audience=audience,
                     config=_auth_config())
    except AuthError as err:
        return _outcome(401, str(err), code="security")
    return None


async def _json_body(request: Request) -> tuple[object | None, JSONResponse | None]:
    body = await request.body()
    if len(body) > MAX_CDS_BODY_BYTES:
        return None, _outcome(413, f"request body is {len(body)} bytes; the limit is "
                                   f"{MAX_CDS_BODY_BYTES} bytes")
    try:
        return json.loads(body.decode("utf-8")), None
    except (UnicodeDecodeError, ValueError) as err:
        return None, _outcome(400, f"the body is not valid UTF-8 JSON ({err}); send the CDS Hooks "
                                   "request as a JSON object")


def create_cds_app(current_api: Callable[[], PainPlanAPI]) -> Starlette:
    """The Starlette app for ``/cds-services``; ``current_api()`` returns the serving API."""

    async def discovery(request: Request) -> JSONResponse:
        refused = _check(request, f"{_base_url(request)}/cds-services")
        return refused or JSONResponse(cds_hooks.discovery())

    async def authenticated_body(request: Request) -> tuple[str, object, JSONResponse | None]:
        """The hook's service id and JSON body once the caller's JWT is accepted."""
        service_id = request.path_params["service_id"]
        refused = _check(request, f"{_base_url(request)}/cds-services/{service_id}")
        if refused:
            return service_id, None, refused
        data, refused = await _json_body(request)
        return service_id, data, refused

    async def call(request: Request) -> JSONResponse:
        service_id, data, refused = await authenticated_body(request)
        if refused:
            return refused
        api, settings = current_api(), _settings()

        def work() -> tuple[int, dict]:
            return cds_hooks.handle(
                service_id, data, settings=settings,
                recommend=lambda profile: api.recommend_profile(profile, settings.top_n))

        status, body = await anyio.to_thread.run_sync(work)
        log.info("cds-services/%s answered %d with %d card(s)", service_id, status,
                 len(body.get("cards", [])) if isinstance(body, dict) else 0)
        return JSONResponse(body, status_code=status)

    async def feedback(request: Request) -> JSONResponse:
        service_id, data, refused = await authenticated_body(request)
        if refused:
            return refused
        status, body = cds_hooks.feedback(service_id, data)
        if status != 200:
            return JSONResponse(body, status_code=status)
        # Feedback names cards and outcomes only (no patient data); it is logged as counts.
        log.info("cds-services/%s feedback: %d record(s)", service_id, len(body.get("records", [])))
        return JSONResponse({}, status_code=200)

    # Full paths, mounted at the root: the spec's discovery URL is exactly
    # {base}/cds-services, and a sub-mount would answer it with a redirect to a trailing '/'.
    return Starlette(routes=[
        Route("/cds-services", discovery, methods=["GET"], name="cds_discovery"),
        Route("/cds-services/{service_id}", call, methods=["POST"], name="cds_call"),
        Route("/cds-services/{service_id}/feedback", feedback, methods=["POST"],
              name="cds_feedback"),
    ])
