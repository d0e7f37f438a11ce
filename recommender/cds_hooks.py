"""CDS Hooks 2.0 service logic for painplan (+ the additive 3.0 fields), as pure functions.

No web framework here: ``recommender/service.py`` owns HTTP and calls the functions below.
Wire format: CDS Hooks 2.0 (HL7); additive 3.0 fields are sent too (discovery ``version`` /
``hookVersion``; errors as FHIR ``OperationOutcome``), which 2.0 clients ignore (interop.md
§1.1). One service: ``patient-view`` (hook version 1.0). Other hooks get a clear 400.

Integration API (for the service helper)
========================================
Build once at start-up (never at import)::

    from recommender import cds_hooks
    from recommender.cds_auth import AuthConfig, AuthError, authenticate
    auth = AuthConfig.from_env()                      # PAINPLAN_CDS_ISSUERS
    settings = cds_hooks.CdsSettings.from_env()       # PAINPLAN_EVIDENCE_URL, PAINPLAN_CDS_FHIR_SERVERS

Routes (mount a small ASGI app, interop.md §1.9: BentoML API routes are POST-only; keep the
whole CDS surface in the mounted app):

``GET /cds-services``
    ``status, body = 200, cds_hooks.discovery()``
``POST /cds-services/{service_id}``
    1. ``authenticate(request.headers.get("authorization"), audience=f"{PUBLIC_URL}/cds-services/{service_id}", config=auth)``
       — on :class:`~recommender.cds_auth.AuthError` answer
       ``cds_hooks.error_response(401, str(err), code="security")``. (``PUBLIC_URL`` is the URL
       the EHR calls, e.g. from ``PAINPLAN_PUBLIC_URL``; behind a proxy ``request.url`` is not
       it.) The discovery GET carries a JWT too (audience ``f"{PUBLIC_URL}/cds-services"``).
    2. ``status, body = cds_hooks.handle(service_id, await request.json(), recommend=recommend_profile, settings=settings)``
       where ``recommend_profile(profile: dict) -> dict`` is the same code path as
       ``POST /recommend`` for ``{"patient": profile, "top_k": settings.top_n}`` and returns that
       response body (``request_id``, ``model``, ``plans`` with ``rank``, ``plan``,
       ``components``, ``expected_improvement``, ``improvement_interval`` [low, high],
       ``p_response``, ``p_adverse_event``, ``warnings`` [{rule_id, action, reason, …}],
       ``explanation``; ``excluded`` [{component | combination, reasons | rules: [{rule_id|id,
       reason, floor}]}]), audited as usual. It may raise ``ContractError`` (→ 422) or
       ``ModelError`` (→ 503). A body that is not JSON: ``error_response(400, "…")``.
       To link feedback to the audit record, keep ``{card["uuid"]: request_id}`` from the answer.
``POST /cds-services/{service_id}/feedback``
    authenticate as above, then ``status, body = cds_hooks.feedback(service_id, json)``;
    on 200 persist each ``body["records"][i]`` (one per card outcome; JSON-ready dicts) and
    reply ``status`` with ``{}`` (CDS Hooks needs only the status).
``POST /recommend`` with ``{"fhir_bundle": {...}, "top_k": 5}`` (optional ``"as_of"``,
``"lookback_days"``, ``"assume_missing_scores"`` (default false))::

    fp = features.fhir.bundle_to_profile(body["fhir_bundle"], as_of=..., lookback_days=...,
                                         assume_missing_scores=...)
    fp.profile.update(body.get("patient") or {})   # optional: explicit values win over the record
    fp.require_ready()                   # ContractError naming each missing required field → 4xx
    answer = <the normal /recommend answer for fp.profile>
    answer.update(fp.report())           # adds missing, warnings, assumed, sources, notes,
                                         # current_medications, as_of, code_table_version

Functions: :func:`discovery`, :func:`handle`, :func:`feedback`, :func:`error_response`,
:class:`CdsSettings`, :func:`httpx_fetch`; JWT in :mod:`recommender.cds_auth`
(``verify_jwt``, ``authenticate``, ``AuthConfig``, ``ReplayCache``, re-exported here).

Data gathering (CDS Hooks §"Prefetch"; interop.md §1.3)
------------------------------------------------------
Prefetch templates use only what clients must support: instance read, ``patient=`` searches,
token equality, ``_sort``/``_count``. One Observation template per LOINC code (generated from the
verified rows of the code table, so the two cannot drift). A key the client did not send
(absent, ``null``, or an OperationOutcome) is "not provided", not "no data": it is fetched
from ``fhirServer`` with the ``fhirAuthorization`` bearer token (httpx, timeouts, ``next``
pages on the same server only, unresolved ``Medication`` references read individually). If any
key can be neither prefetched nor fetched, the answer is **412** with an OperationOutcome
naming the keys: ranking without, say, the medication list could miss an opioid +
benzodiazepine conflict. The token is sent only to ``fhirServer``, over https unless the
server is on loopback; ``CdsSettings.allowed_fhir_servers`` (``PAINPLAN_CDS_FHIR_SERVERS``)
restricts which servers may be contacted at all (SSRF guard when auth is off).

Privacy: logs carry the hookInstance, status and counts only, never patient data or ids.
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, datetime
from functools import partial
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from features.errors import ConfigError, ContractError, PainplanError
from features.fhir import DEFAULT_LOOKBACK_DAYS, FhirProfile, resources_to_profile
from features.fhir_codes import load_code_table
from recommender.cds_auth import (
    AuthConfig,
    AuthError,
    ReplayCache,
    authenticate,
    verify_jwt,
)
from recommender.cds_cards import CDC_2022_URL, CardSource, incomplete_card, recommendation_cards

log = logging.getLogger(__name__)

SERVICE_ID = "painplan-patient-view"
HOOK = "patient-view"
CDS_HOOKS_VERSION = "2.0.1"  # the CDS Hooks specification implemented (3.0 discovery `version`)
HOOK_VERSION = "1.0"  # patient-view hook definition (cds-hooks/docs docs/hooks/patient-view.md)
FETCH_TIMEOUT_S = 3.0
MAX_PAGES = 5
MAX_MEDICATION_READS = 20
FETCH_WORKERS = 6
_SEARCH_COUNT = (
    5  # most recent readings per Observation code: enough to skip an entered-in-error one
)

Recommend = Callable[[dict], dict]
Fetch = Callable[[str, str | None], dict]  # (absolute URL, bearer token or None) -> JSON body


class FetchError(PainplanError):
    """The FHIR server could not be read (network error, timeout, non-2xx, not JSON)."""


@dataclass(frozen=True)
class CdsSettings:
    """Service-level knobs; :meth:`from_env` reads ``PAINPLAN_*`` variables once at start-up."""

    evidence_url: str | None = CDC_2022_URL
    top_n: int = 3
    assume_missing_scores: bool = True
    lookback_days: int = DEFAULT_LOOKBACK_DAYS
    allowed_fhir_servers: tuple[str, ...] = ()  # empty: any (https or loopback)
    fetch_timeout: float = FETCH_TIMEOUT_S

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> CdsSettings:
        env = os.environ if env is None else env
        servers = tuple(
            s.strip().rstrip("/")
            for s in (env.get("PAINPLAN_CDS_FHIR_SERVERS") or "").split(",")
            if s.strip()
        )
        lookback = env.get("PAINPLAN_CDS_LOOKBACK_DAYS") or str(DEFAULT_LOOKBACK_DAYS)
        if not lookback.isdigit() or int(lookback) < 1:
            raise ConfigError(f"PAINPLAN_CDS_LOOKBACK_DAYS must be a positive whole number of "
                              f"days, got {lookback!r}")
        return cls(
            evidence_url=env.get("PAINPLAN_EVIDENCE_URL") or CDC_2022_URL,
            allowed_fhir_servers=servers,
            lookback_days=int(lookback),
        )


# ------------------------------------------------------------------------------ discovery


def prefetch_templates() -> dict[str, str]:
    """Prefetch key → FHIR query template. Observations: one per verified LOINC code."""
    table = load_code_table()
    loinc = table.systems["loinc"]
    templates = {
        "patient": "Patient/{{context.patientId}}",
        "conditions": "Condition?patient={{context.patientId}}",
        "medicationRequests": "MedicationRequest?patient={{context.patientId}}",
        "medicationStatements": "MedicationStatement?patient={{context.patientId}}",
        "allergies": "AllergyIntolerance?patient={{context.patientId}}",
    }
    for (system, code), row in sorted(
        table.observations.items(), key=lambda kv: (kv[1].measure, kv[0][1])
    ):
        if system != loinc:
            continue
        key = f"obs_{row.measure}_{code.replace('-', '_')}"
        templates[key] = (
            f"Observation?patient={{{{context.patientId}}}}&code={loinc}|{code}"
            f"&_sort=-date&_count={_SEARCH_COUNT}"
        )
    return templates


def discovery() -> dict:
    """Body of ``GET /cds-services``."""
    return {
        "services": [
            {
                "hook": HOOK,
                "id": SERVICE_ID,
                "title": "Chronic pain treatment options",
                "description": (
                    "Ranks safety-gated combinations of non-drug and drug therapies for adults "
                    "with chronic pain by expected PEG improvement at 12 weeks and adverse-event "
                    "risk, lists excluded therapies with reasons, flags current medications that "
                    "conflict with the safety rules, and says what the record lacks. Research "
                    "prototype; decision support for a clinician."
                ),
                "prefetch": prefetch_templates(),
                "usageRequirements": (
                    "Adults (18+) with an active chronic-pain condition. Best with a PEG or pain "
                    "score, PHQ-9 and GAD-7 from the last year; missing scores make the answer "
                    "provisional."
                ),
                "version": CDS_HOOKS_VERSION,
                "hookVersion": HOOK_VERSION,
            }
        ]
    }


# ------------------------------------------------------------------------------ errors


_ISSUE_CODE = {
    400: "invalid",
    401: "security",
    404: "not-found",
    412: "incomplete",
    422: "processing",
    500: "exception",
    503: "transient",
    504: "timeout",
}


def error_response(
    status: int, message: str, *, code: str | None = None, details: list[str] | None = None
) -> tuple[int, dict]:
    """``(status, OperationOutcome)`` (CDS Hooks 3.0: errors SHOULD be OperationOutcomes)."""
    issues = [
        {
            "severity": "error",
            "code": code or _ISSUE_CODE.get(status, "processing"),
            "diagnostics": message,
        }
    ]
    issues += [
        {
            "severity": "error",
            "code": code or _ISSUE_CODE.get(status, "processing"),
            "diagnostics": d,
        }
        for d in details or []
    ]
    return status, {"resourceType": "OperationOutcome", "issue": issues}


# ------------------------------------------------------------------------------ the hook call


def handle(
    service_id: str,
    request_json: Any,
    *,
    recommend: Recommend,
    fetch: Fetch | None = None,
    as_of: date | datetime | str | None = None,
    settings: CdsSettings | None = None,
) -> tuple[int, dict]:
    """Answer ``POST /cds-services/{service_id}``: ``(HTTP status, JSON body)``.

    200 with ``{"cards": [...]}`` (possibly empty); 400 invalid request or unsupported hook;
    404 unknown service; 412 FHIR data unavailable; 422 the profile was refused by
    ``recommend``; 503 the model is unavailable. Errors are OperationOutcomes.
    ``fetch`` defaults to :func:`httpx_fetch`; ``as_of`` defaults to today (UTC).
    """
    settings = settings or CdsSettings()
    started = time.perf_counter()
    if service_id != SERVICE_ID:
        return error_response(
            404, f"no CDS service '{service_id}' here; GET /cds-services lists '{SERVICE_ID}'"
        )
    problems = _request_problems(request_json)
    if problems:
        unsupported = "is not supported" in problems[0]
        return error_response(
            400, problems[0], code="not-supported" if unsupported else None, details=problems[1:]
        )
    context = request_json["context"]
    patient_id = _patient_id(context["patientId"])
    instance = request_json["hookInstance"]
    try:
        if fetch is None:
            with httpx.Client(timeout=settings.fetch_timeout, follow_redirects=False) as client:
                patient, resources = _gather(
                    request_json, patient_id, partial(httpx_fetch, client=client), settings
                )
        else:
            patient, resources = _gather(request_json, patient_id, fetch, settings)
    except _Unavailable as err:
        log.info("cds %s: 412 (%d prefetch key(s) unavailable)", instance, len(err.keys))
        return error_response(412, str(err), details=err.details)
    except _BadPrefetch as err:
        return error_response(400, str(err))
    try:
        fp = resources_to_profile(
            patient,
            resources,
            as_of=as_of,
            lookback_days=settings.lookback_days,
            assume_missing_scores=settings.assume_missing_scores,
        )
    except ContractError as err:
        return error_response(400, f"prefetch 'patient' cannot be used: {err}")
    patient_ref = f"Patient/{patient_id}"
    source = CardSource(url=settings.evidence_url)
    if not fp.applicable:
        cards: list[dict] = []
    elif not fp.ready:
        cards = [incomplete_card(fp, patient_ref=patient_ref, source=source)]
    else:
        try:
            result = recommend(dict(fp.profile))
        except ContractError as err:
            return error_response(
                422,
                f"the profile read from the record was refused: {err}",
                details=[
                    f"{v.get('column')}: {v.get('problem') or v.get('message')}"
                    for v in err.violations
                ],
            )
        except PainplanError as err:
            return error_response(503, f"the recommendation model is not available: {err}")
        cards = recommendation_cards(
            fp, result, patient_ref=patient_ref, source=source, top_n=settings.top_n
        )
    log.info(
        "cds %s: 200, %d card(s), %.0f ms",
        instance,
        len(cards),
        1000 * (time.perf_counter() - started),
    )
    return 200, {"cards": cards}


def _request_problems(body: Any) -> list[str]:
    if not isinstance(body, dict):
        return ["the request body must be a JSON object (CDS Hooks service request)"]
    out: list[str] = []
    hook = body.get("hook")
    if not isinstance(hook, str) or not hook:
        out.append("hook is required (e.g. 'patient-view')")
    elif hook != HOOK:
        out.append(
            f"hook '{hook}' is not supported by '{SERVICE_ID}': it answers '{HOOK}' only "
            "(order-select/order-sign checks are out of its scope; see GET /cds-services)"
        )
    if not isinstance(body.get("hookInstance"), str) or not body["hookInstance"].strip():
        out.append("hookInstance is required: a UUID for this invocation")
    ctx = body.get("context")
    if not isinstance(ctx, dict):
        out.append("context is required: an object with userId and patientId")
    else:
        if not isinstance(ctx.get("patientId"), str) or not ctx["patientId"].strip():
            out.append("context.patientId is required (the FHIR Patient.id in context)")
        if not isinstance(ctx.get("userId"), str) or not ctx["userId"].strip():
            out.append("context.userId is required for patient-view (e.g. 'Practitioner/123')")
    server = body.get("fhirServer")
    if server is not None and (
        not isinstance(server, str) or urlsplit(server).scheme not in ("http", "https")
    ):
        out.append("fhirServer must be an http(s) base URL")
    auth = body.get("fhirAuthorization")
    if auth is not None:
        if server is None:
            out.append("fhirAuthorization requires fhirServer (CDS Hooks invariant cds-r-1)")
        if (
            not isinstance(auth, dict)
            or not isinstance(auth.get("access_token"), str)
            or not auth["access_token"]
        ):
            out.append("fhirAuthorization.access_token is required")
        elif str(auth.get("token_type", "")).lower() != "bearer":
            out.append("fhirAuthorization.token_type must be 'Bearer'")
    prefetch = body.get("prefetch")
    if prefetch is not None and not isinstance(prefetch, dict):
        out.append("prefetch must be an object (key -> resource or Bundle)")
    return out


def _patient_id(value: str) -> str:
    # Some clients (e.g. the CDC opioid CDS examples) send "Patient/123" instead of "123".
    value = value.strip()
    return value.split("/", 1)[1] if value.startswith("Patient/") else value


# ------------------------------------------------------------------------------ data gathering


class _Unavailable(PainplanError):
    def __init__(self, message: str, keys: list[str], details: list[str]):
        super().__init__(message)
        self.keys = keys
        self.details = details


class _BadPrefetch(PainplanError):
    pass


def _gather(
    body: dict, patient_id: str, fetch: Fetch, settings: CdsSettings
) -> tuple[dict, list[dict]]:
    prefetch = body.get("prefetch") or {}
    server = (body.get("fhirServer") or "").rstrip("/")
    token = (body.get("fhirAuthorization") or {}).get("access_token")
    context = {**body["context"], "patientId": patient_id}
    got: dict[str, Any] = {}
    missing: list[str] = []
    details: list[str] = []
    to_fetch: dict[str, str] = {}
    for key, template in prefetch_templates().items():
        value = prefetch.get(key)
        if isinstance(value, dict) and value.get("resourceType") not in (None, "OperationOutcome"):
            got[key] = value
        elif not server:
            missing.append(key)
        else:
            to_fetch[key] = template
    if to_fetch:
        reason = _server_refusal(server, settings)
        if reason:
            raise _Unavailable(
                f"required FHIR data could not be fetched: {reason}", list(to_fetch), []
            )

        def one(template: str) -> dict:
            return _fetch_all(server, _expand(template, context), token, fetch)

        # Queries are independent: run them side by side to stay near the ~500 ms CDS budget.
        with ThreadPoolExecutor(max_workers=FETCH_WORKERS) as pool:
            futures = {key: pool.submit(one, template) for key, template in to_fetch.items()}
        for key, future in futures.items():
            try:
                got[key] = future.result()
            except FetchError as err:
                missing.append(key)
                details.append(f"{key}: {err}")
    if missing:
        how = (
            "the request has no fhirServer to fetch them from"
            if not server
            else "the FHIR server did not return them"
        )
        raise _Unavailable(
            f"{len(missing)} prefetch item(s) needed for a safe answer are missing and {how}: "
            + ", ".join(missing[:8])
            + (" …" if len(missing) > 8 else "")
            + ". Provide them in prefetch (see GET /cds-services) or give fhirServer and "
            "fhirAuthorization",
            missing,
            details,
        )
    patient = got.pop("patient")
    if patient.get("resourceType") == "Bundle":  # a client may answer a read with a searchset
        found = [
            e.get("resource")
            for e in patient.get("entry") or []
            if (e.get("resource") or {}).get("resourceType") == "Patient"
        ]
        patient = found[0] if len(found) == 1 else {}
    if patient.get("resourceType") != "Patient":
        raise _BadPrefetch("prefetch 'patient' must be the Patient resource of context.patientId")
    if patient.get("id") != patient_id:
        raise _BadPrefetch(
            "prefetch 'patient' is not the patient in context.patientId; refusing to mix records"
        )
    resources = list(got.values())
    if server:
        resources += _resolve_medications(resources, server, token, fetch)
    return patient, resources


def _expand(template: str, context: Mapping[str, Any]) -> str:
    def token(m: re.Match) -> str:
        name = m.group(1)
        if name.startswith("context."):
            value = context.get(name[len("context.") :])
        elif name.startswith("user") and isinstance(context.get("userId"), str):
            kind = {
                "userPractitionerId": "Practitioner",
                "userPractitionerRoleId": "PractitionerRole",
                "userPatientId": "Patient",
                "userRelatedPersonId": "RelatedPerson",
            }.get(name)
            rtype, _, rid = context["userId"].partition("/")
            value = rid if rtype == kind else None
        else:
            value = None
        if not isinstance(value, str):
            raise FetchError(f"prefetch token '{{{{{name}}}}}' has no value in this context")
        return quote(value, safe="")

    return re.sub(r"\{\{\s*([A-Za-z.]+)\s*\}\}", token, template)


def _fetch_all(server: str, relative: str, token: str | None, fetch: Fetch) -> dict:
    """Read a query; follow a searchset's ``next`` links on the same server (bounded)."""
    body = fetch(f"{server}/{relative}", token)
    if not isinstance(body, dict):
        raise FetchError("the FHIR server answered with something other than a JSON object")
    if body.get("resourceType") != "Bundle":
        return body
    entries = list(body.get("entry") or [])
    page = body
    for _ in range(MAX_PAGES - 1):
        nxt = next(
            (link.get("url") for link in page.get("link") or [] if link.get("relation") == "next"),
            None,
        )
        if not nxt or not nxt.startswith(server + "/"):
            break  # never send the token to another host
        page = fetch(nxt, token)
        entries += page.get("entry") or []
    return {**body, "entry": entries, "link": []}


def _resolve_medications(
    resources: list[dict], server: str, token: str | None, fetch: Fetch
) -> list[dict]:
    """Read Medication resources that MedicationRequest/Statement entries only reference."""
    have, wanted = set(), []
    for bundle in resources:
        for e in (bundle.get("entry") or []) if bundle.get("resourceType") == "Bundle" else []:
            r = e.get("resource") or {}
            if r.get("resourceType") == "Medication":
                have.add(f"Medication/{r.get('id')}")
            ref = (r.get("medicationReference") or {}).get("reference") or ""
            if ref.startswith("Medication/") and ref not in wanted:
                wanted.append(ref)
    out = []
    for ref in [w for w in wanted if w not in have][:MAX_MEDICATION_READS]:
        try:
            med = fetch(f"{server}/{ref}", token)
        except FetchError:
            continue  # reported by the mapping as an unresolved medication
        if isinstance(med, dict) and med.get("resourceType") == "Medication":
            out.append(med)
    return out


def _server_refusal(server: str, settings: CdsSettings) -> str | None:
    parts = urlsplit(server)
    if settings.allowed_fhir_servers and not any(
        server == s or server.startswith(s + "/") for s in settings.allowed_fhir_servers
    ):
        return "fhirServer is not on this service's list of allowed FHIR servers (PAINPLAN_CDS_FHIR_SERVERS)"
    if parts.scheme != "https" and parts.hostname not in ("localhost", "127.0.0.1", "::1"):
        return "fhirServer must use https (a bearer token is never sent in clear text)"
    return None


def httpx_fetch(
    url: str,
    token: str | None,
    *,
    timeout: float = FETCH_TIMEOUT_S,
    client: httpx.Client | None = None,
) -> dict:
    """GET a FHIR URL as JSON with an optional bearer token; errors become :class:`FetchError`.
    Pass ``client`` to reuse connections (``handle`` does, one client per hook call)."""
    headers = {"Accept": "application/fhir+json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        if client is not None:
            response = client.get(url, headers=headers)
        else:
            response = httpx.get(url, headers=headers, timeout=timeout, follow_redirects=False)
    except httpx.TimeoutException as err:
        raise FetchError(f"timed out after {timeout:g} s") from err
    except httpx.HTTPError as err:
        raise FetchError(f"request failed ({type(err).__name__})") from err
    if response.status_code != 200:
        raise FetchError(f"HTTP {response.status_code}")
    try:
        return response.json()
    except ValueError as err:
        raise FetchError("the answer was not JSON") from err


# ------------------------------------------------------------------------------ feedback


_OUTCOMES = ("accepted", "overridden")


def feedback(service_id: str, body: Any) -> tuple[int, dict]:
    """Validate ``POST /cds-services/{id}/feedback`` (CDS Hooks §"Feedback"; interop.md §1.5).

    Returns ``(200, {"records": [...]})`` with one JSON-ready record per card outcome for the
    service to persist (``service_id``, ``card``, ``outcome``, ``accepted_suggestions``,
    ``override_reason``, ``user_comment``, ``outcome_timestamp``, ``received_at``,
    ``feedback_id``), or a 400/404 OperationOutcome naming every problem.
    """
    if service_id != SERVICE_ID:
        return error_response(
            404, f"no CDS service '{service_id}' here; GET /cds-services lists '{SERVICE_ID}'"
        )
    if (
        not isinstance(body, dict)
        or not isinstance(body.get("feedback"), list)
        or not body["feedback"]
    ):
        return error_response(
            400, 'feedback body must be {"feedback": [ ... ]} with at least one item'
        )
    problems: list[str] = []
    records: list[dict] = []
    received = datetime.now().astimezone().isoformat()
    for i, item in enumerate(body["feedback"]):
        where = f"feedback[{i}]"
        if not isinstance(item, dict):
            problems.append(f"{where} must be an object")
            continue
        card = item.get("card")
        if not isinstance(card, str) or not card:
            problems.append(f"{where}.card is required (the card's uuid)")
        outcome = item.get("outcome")
        if outcome not in _OUTCOMES:
            problems.append(f"{where}.outcome must be 'accepted' or 'overridden', got {outcome!r}")
        accepted = item.get("acceptedSuggestions")
        ids: list[str] = []
        if outcome == "accepted":
            if not isinstance(accepted, list) or not accepted:
                problems.append(
                    f"{where}.acceptedSuggestions is required when outcome is 'accepted'"
                )
            else:
                for j, s in enumerate(accepted):
                    if isinstance(s, dict) and isinstance(s.get("id"), str) and s["id"]:
                        ids.append(s["id"])
                    else:
                        problems.append(f"{where}.acceptedSuggestions[{j}].id is required")
        elif accepted:
            problems.append(
                f"{where}.acceptedSuggestions is only allowed when outcome is 'accepted'"
            )
        override = item.get("overrideReason")
        reason = comment = None
        if override is not None:
            if outcome != "overridden":
                problems.append(
                    f"{where}.overrideReason is only allowed when outcome is 'overridden'"
                )
            if not isinstance(override, dict):
                problems.append(
                    f"{where}.overrideReason must be an object {{reason?, userComment?}}"
                )
            else:
                reason = override.get("reason")
                comment = override.get("userComment")
                if reason is not None and not (isinstance(reason, dict) and reason.get("code")):
                    problems.append(f"{where}.overrideReason.reason must be a Coding with a code")
                if comment is not None and not isinstance(comment, str):
                    problems.append(f"{where}.overrideReason.userComment must be text")
        stamp = item.get("outcomeTimestamp")
        when = _rfc3339(stamp)
        if when is None:
            problems.append(
                f"{where}.outcomeTimestamp is required: an RFC 3339 date-time with a time zone, e.g. 2026-11-21T10:15:00Z"
            )
        if not problems:
            records.append(
                {
                    "feedback_id": str(uuid.uuid4()),
                    "service_id": service_id,
                    "card": card,
                    "outcome": outcome,
                    "accepted_suggestions": ids,
                    "override_reason": reason,
                    "user_comment": comment,
                    "outcome_timestamp": when.isoformat(),
                    "received_at": received,
                }
            )
    if problems:
        return error_response(
            400, f"feedback rejected: {len(problems)} problem(s)", details=problems
        )
    log.info("cds feedback: %d record(s) for %s", len(records), service_id)
    return 200, {"records": records}


def _rfc3339(value: Any) -> datetime | None:
    if not isinstance(value, str) or "T" not in value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


__all__ = [
    "CDS_HOOKS_VERSION",
    "HOOK",
    "HOOK_VERSION",
    "SERVICE_ID",
    "AuthConfig",
    "AuthError",
    "CdsSettings",
    "FetchError",
    "FhirProfile",
    "ReplayCache",
    "authenticate",
    "discovery",
    "error_response",
    "feedback",
    "handle",
    "httpx_fetch",
    "prefetch_templates",
    "verify_jwt",
]


def request_from_bundle(bundle: dict, *, user_id: str = "Practitioner/example") -> dict:
    """A ``patient-view`` request for the patient in a FHIR bundle, with every discovery
    prefetch key filled as a client would: the Patient, and each search as a searchset of the
    patient's resources of that type (and LOINC code, for Observation templates). For trying
    the service against test records (``painplan cds-request``)."""
    resources = [e["resource"] for e in bundle.get("entry", []) if "resource" in e]
    patient = next((r for r in resources if r.get("resourceType") == "Patient"), None)
    if patient is None:
        raise ContractError("the bundle holds no Patient resource; a patient-view request "
                            "needs one")
    prefetch: dict[str, dict] = {}
    for key, template in prefetch_templates().items():
        rtype = template.split("?")[0].split("/")[0]
        if rtype == "Patient":
            prefetch[key] = patient
            continue
        code = template.split("code=")[1].split("&")[0].split("|")[1] if "code=" in template else None
        hits = [r for r in resources if r.get("resourceType") == rtype and (
            code is None
            or any(c.get("code") == code for c in r.get("code", {}).get("coding", [])))]
        prefetch[key] = {"resourceType": "Bundle", "type": "searchset",
                         "entry": [{"resource": r} for r in hits]}
    return {"hook": "patient-view", "hookInstance": str(uuid.uuid4()),
            "context": {"userId": user_id, "patientId": patient.get("id", "")},
            "prefetch": prefetch}
