"""What the HTTP API does, without the HTTP: check the key, parse, answer, audit.

:class:`PainPlanAPI` is framework-free so that the BentoML service
(:mod:`recommender.service`) stays a thin shell, and so that the in-process cost of a
request can be measured and tested on exactly the code path the service runs. Every method
takes the raw body (or query) and returns the JSON answer as a dict, or raises:

* :class:`~recommender.access.AccessDenied` (401/403),
* :class:`~recommender.api_schema.InvalidRequest` (400, or 404 for an unknown request id),
* :class:`~recommender.audit.AuditUnavailable` (503): the answer was computed but could not
  be recorded, so it is not given.

Scoring runs with one OpenMP thread per request: a single patient is 839 rows, where
LightGBM's thread start-up costs more than it saves (measured: about half the latency on 2
cores), and concurrency comes from serving several requests at once instead.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pandas as pd
from threadpoolctl import ThreadpoolController

from features.catalog import COMPONENT_BY_CODE, PLAN_INDEX, PLANS, plan_components
from features.errors import ContractError
from features.validate import validate
from recommender.access import Role
from recommender.api_schema import (
    InvalidRequest,
    RecommendInput,
    episode_violations,
    parse_explain,
    parse_json,
    parse_outcome_shape,
    parse_recommend_many,
    violation,
)
from recommender.artifact import ModelBundle
from recommender.audit import (
    MAX_QUERY_LIMIT,
    AuditStore,
    AuditUnavailable,
    RequestRecord,
    input_hash,
    iso,
    pseudonym,
    utc_now,
)
from recommender.explain import explain_contrast, explain_each
from recommender.recommend import Ranked, recommend_each
from recommender.safety import RULESET_VERSION, assess
from recommender.settings import ServiceConfig

log = logging.getLogger(__name__)

_DIGITS = 4  # rounding of estimates in answers, as in the CONTRACT §7 file


@dataclass(frozen=True)
class ServedModel:
    """The loaded model and what an answer says about it.

    ``info``: name, version, tag, mlflow_run_id, ruleset_version (in every answer);
    ``card``: model card and lineage (``GET /model``).
    """

    bundle: ModelBundle
    info: dict
    card: dict


def _round(x: float) -> float:
    return round(float(x), _DIGITS)


def _rule(item: dict) -> dict:
    return {
        "rule_id": item["id"],
        "action": item["action"],
        "reason": item["reason"],
        "source": item["source"],
        "floor": item["floor"],
    }


def _component(code: str) -> dict:
    c = COMPONENT_BY_CODE[code]
    return {"code": c.code, "kind": c.kind, "name": c.name}


def _explanation(item: dict) -> dict:
    return {k: item[k] for k in ("base_value", "plan_effect", "contributions", "note")}


class PainPlanAPI:
    """The service's behaviour for one loaded model, audit store and configuration."""

    def __init__(self, served: ServedModel, store: AuditStore, config: ServiceConfig):
        self.served = served
        self.store = store
        self.config = config
        self._threads = ThreadpoolController()

    @property
    def model(self):
        return self.served.bundle.model

    def authorize(self, authorization: str | None, role: Role) -> None:
        self.config.api_keys.require(authorization, role)

    # ----------------------------------------------------------------------- answers

    def recommend(self, body: bytes) -> dict:
        """``POST /recommend``: the top-k allowed plans, explained, and every exclusion.

        The body holds either ``{"patient": {...}}`` or ``{"fhir_bundle": {...}}`` (FHIR R4,
        mapped by :func:`features.fhir.bundle_to_profile`; the answer then also lists what
        was missing from the record and how that limits the recommendation)."""
        (result,) = self.recommend_many([body])
        if isinstance(result, BaseException):
            raise result
        return result

    def recommend_many(self, bodies: Sequence[bytes]) -> list[dict | Exception]:
        """``POST /recommend`` for several bodies at once (the service's micro-batches).

        Each body is answered exactly as :meth:`recommend` would answer it alone, and only
        it can fail itself: the result for a body is its answer, or the exception its own
        request raises (:class:`InvalidRequest` → 4xx, anything unexpected → 500). The
        audit records of all answers are committed in one transaction before any answer is
        returned; if that commit fails, nothing is recorded and every body that had an
        answer gets the :class:`AuditUnavailable` (503) instead.
        """
        started = time.perf_counter()
        n = len(bodies)
        created = [utc_now() for _ in range(n)]
        results: list[dict | Exception | None] = [None] * n
        fhir: list[dict | None] = [None] * n
        plain: list[bytes] = []
        slots: list[int] = []  # results index of each plain body
        for i, body in enumerate(bodies):
            if b'"fhir_bundle"' in body:
                try:
                    body, fhir[i] = _profile_from_fhir(body)
                except Exception as err:  # noqa: BLE001 - this request's own error
                    results[i] = err
                    continue
            plain.append(body)
            slots.append(i)
        items = parse_recommend_many(plain)
        todo: list[tuple[int, RecommendInput]] = []
        for i, item in zip(slots, items, strict=True):
            if isinstance(item, InvalidRequest):
                results[i] = item
            else:
                todo.append((i, item))
        scored = self._score([item for _, item in todo])
        records = []
        for (i, item), outcome in zip(todo, scored, strict=True):
            if isinstance(outcome, Exception):
                results[i] = outcome
                continue
            answer, record = self._answer(item, outcome, created[i], fhir[i])
            results[i] = answer
            records.append((i, record))
        try:
            self.store.record_requests([record for _, record in records])
        except AuditUnavailable as err:
            for i, _ in records:
                results[i] = err
            return results  # type: ignore[return-value]
        spent = 1000 * (time.perf_counter() - started)
        for i, _ in records:
            answer = results[i]
            log.info(
                "recommend %s answered in %.1f ms (%d plans, %d exclusions; batch of %d)",
                answer["request_id"],
                spent,
                len(answer["plans"]),
                len(answer["excluded"]),
                n,
            )
        return results  # type: ignore[return-value]

    def _score(self, items: list[RecommendInput]) -> list:
        """(ranked, plans, explanations) per item, or the exception scoring it raised.

        The batch is scored together (:func:`recommend_each`, :func:`explain_each`: each
        patient as if alone); should that fail, each item is scored on its own, so that an
        input that breaks scoring fails only its own request."""
        if not items:
            return []
        try:
            return self._score_values([item.profile for item in items],
                                      [item.top_k for item in items])
        except Exception:  # noqa: BLE001 - isolate the culprit below
            if len(items) == 1:
                raise
            log.exception("scoring a batch of %d failed; scoring each alone", len(items))
        out: list = []
        for item in items:
            try:
                out.extend(self._score_values([item.profile], [item.top_k]))
            except Exception as err:  # noqa: BLE001 - this request's own failure
                out.append(err)
        return out

    def _score_values(self, values: list[dict], top_k: list[int]) -> list[tuple]:
        """Score and explain patients given by their typed values as validated (one dict
        per patient, ``RecordsValidated.values``): the model encodes them directly, which is
        the validated frame's encoding without building the frame or reading it back
        through pandas (most of one request's cost when it did)."""
        X = self.model.encoder_.transform_values(values)
        with self._threads.limit(limits=1, user_api="openmp"):
            ranked = recommend_each(self.model, None, top_k, X=X)
            plans = [[PLANS[i] for i in r.order[0] if i >= 0] for r in ranked]
            # the encoding and evidence prior scoring computed, reused by the explanations
            shared = self._batch_coefficients(ranked)
            explanations = explain_each(self.model, None, plans, coefficients=shared)
        return list(zip(ranked, plans, explanations, strict=True))

    @staticmethod
    def _batch_coefficients(ranked: list[Ranked]) -> dict:
        """The batch's encoded rows ``X`` and evidence prior, put back together from each
        patient's slices (when the model provides them)."""
        return {
            key: np.concatenate([r.coefficients[key] for r in ranked])
            for key in ("X", "prior")
            if all(isinstance(r.coefficients.get(key), np.ndarray) for r in ranked)
        }

    def _answer(self, parsed: RecommendInput, scored: tuple, created, fhir_report) -> tuple:
        """The answer to one scored request, and its audit record."""
        ranked, plans, explanations = scored
        order = [int(i) for i in ranked.order[0] if i >= 0]
        est, safety, row = ranked.estimates, ranked.safety, ranked.row
        answer_plans = []
        for rank, (i, plan, ex) in enumerate(zip(order, plans, explanations, strict=True), 1):
            answer_plans.append(
                {
                    "rank": rank,
                    "plan": plan,
                    "components": [_component(c) for c in plan_components(plan)],
                    "utility": _round(est.utility[0, i]),
                    "expected_improvement": _round(est.expected_improvement[0, i]),
                    "improvement_interval": [
                        _round(est.improvement_low[0, i]),
                        _round(est.improvement_high[0, i]),
                    ],
                    "p_response": _round(est.p_response[0, i]),
                    "p_adverse_event": _round(est.p_adverse_event[0, i]),
                    "warnings": [
                        {k: w[k] for k in ("rule_id", "action", "reason", "source", "components")}
                        for w in safety.plan_warnings(row, i)
                    ],
                    "explanation": _explanation(ex),
                }
            )
        excluded = [
            {
                **{k: v for k, v in e.items() if k != "rules"},
                "rules": [_rule(r) for r in e["rules"]],
            }
            for e in safety.exclusions(row)
        ]
        request_id = str(uuid.uuid4())
        answer = {
            "request_id": request_id,
            "created_at": iso(created),
            "model": self.served.info,
            "plans": answer_plans,
            "excluded": excluded,
            "input_warnings": parsed.input_warnings,
        }
        if fhir_report is not None:
            answer["fhir"] = fhir_report
        ranked_summary = [
            {k: p[k] for k in p if k not in ("explanation", "components")} for p in answer_plans
        ]
        record = self._request_record(
            request_id,
            created,
            "recommend",
            parsed,
            {"top_k": parsed.top_k},
            ranked=ranked_summary,
            exclusions=excluded,
            explanations=[{"plan": p["plan"], **p["explanation"]} for p in answer_plans],
            shown_plans=plans,
        )
        return answer, record

    def recommend_profile(self, profile: dict, top_k: int = 5) -> dict:
        """``POST /recommend`` for a profile dict (e.g. one built from FHIR for CDS Hooks):
        the same parsing, answer and audit record; raises InvalidRequest naming fields."""
        return self.recommend(json.dumps({"patient": profile, "top_k": top_k}).encode())

    def explain(self, body: bytes) -> dict:
        """``POST /explain``: SHAP contrast of two plans; contributions + the average
        patient's gap add up to the utility gap."""
        started, created = time.perf_counter(), utc_now()
        parsed = parse_explain(body)
        a, b = parsed.plan_a, parsed.plan_b
        idx = np.array([PLAN_INDEX[a], PLAN_INDEX[b]])
        with self._threads.limit(limits=1, user_api="openmp"):
            contrast = explain_contrast(self.model, parsed.patient, a, b)
            est = self.model.predict_plans(parsed.patient, plan_index=idx)
            safety = assess(parsed.patient)
        allowed = safety.plan_flags(idx).allowed[0]
        plans = [
            {
                "plan": plan,
                "utility": _round(est.utility[0, k]),
                "expected_improvement": _round(est.expected_improvement[0, k]),
                "p_adverse_event": _round(est.p_adverse_event[0, k]),
                "allowed": bool(allowed[k]),
                "warnings": [
                    {key: w[key] for key in ("rule_id", "action", "reason", "source", "components")}
                    for w in safety.plan_warnings(0, plan)
                ],
            }
            for k, plan in enumerate((a, b))
        ]
        excluded = [
            {
                **{k: v for k, v in e.items() if k != "rules"},
                "rules": [_rule(r) for r in e["rules"]],
            }
            for e in safety.exclusions(0)
        ]
        request_id = str(uuid.uuid4())
        answer = {
            "request_id": request_id,
            "created_at": iso(created),
            "model": self.served.info,
            **contrast,
            "plans": plans,
            "excluded": excluded,
            "input_warnings": parsed.input_warnings,
        }
        self._record(
            request_id,
            created,
            "explain",
            parsed,
            {"plan_a": a, "plan_b": b},
            ranked=plans,
            exclusions=excluded,
            explanations=[contrast],
            shown_plans=[],
        )
        log.info(
            "explain %s answered in %.1f ms", request_id, 1000 * (time.perf_counter() - started)
        )
        return answer

    def _record(self, *args, **kwargs) -> None:
        """Build and commit one audit record (raises AuditUnavailable)."""
        self.store.record_request(self._request_record(*args, **kwargs))

    def _request_record(
        self,
        request_id,
        created,
        endpoint,
        parsed,
        parameters,
        *,
        ranked,
        exclusions,
        explanations,
        shown_plans,
    ) -> RequestRecord:
        key = pseudonym(parsed.patient_id, self.config.hmac_key)
        info = self.served.info
        return RequestRecord(
            request_id=request_id,
            created_at=created,
            endpoint=endpoint,
            patient_key=key,
            input_sha256=input_hash(key, parsed.profile, parameters),
            profile=parsed.profile,
            parameters=parameters,
            model_name=info["name"],
            model_version=info["version"],
            model_tag=info["tag"],
            mlflow_run_id=info.get("mlflow_run_id"),
            ruleset_version=RULESET_VERSION,
            ranked=ranked,
            exclusions=exclusions,
            explanations=explanations,
            shown_plans=shown_plans,
            input_warnings=parsed.input_warnings,
        )

    def report_outcome(self, body: bytes) -> dict:
        """``POST /outcomes``: store what happened after an answered recommendation."""
        data = parse_outcome_shape(body)
        request_id = data["request_id"]
        record = self.store.get(request_id)
        if record is None or record["endpoint"] != "recommend":
            raise InvalidRequest(
                [
                    violation(
                        "request_id",
                        "no answered recommendation has this request id; "
                        "use the request_id returned by POST /recommend",
                        request_id,
                    )
                ],
                status=404,
                error="not_found",
            )
        episode = {
            **record["profile"],
            "patient_id": record["patient_key"] or f"request-{request_id}",
            "episode_id": request_id,
            "plan": data["plan"],
            "peg_12wk": data["peg_12wk"],
            "adverse_event": data["adverse_event"],
        }
        try:
            checked = validate(pd.DataFrame([episode]), "episodes").frame.iloc[0]
        except ContractError as err:
            raise InvalidRequest(episode_violations(err)) from err
        row = self.store.record_outcome(
            request_id=request_id,
            plan=checked["plan"],
            peg_12wk=float(checked["peg_12wk"]),
            adverse_event=bool(checked["adverse_event"]),
        )
        shown = record["shown_plans"]
        rank = shown.index(row["plan"]) + 1 if row["plan"] in shown else None
        log.info("outcome %s recorded for request %s", row["outcome_id"], request_id)
        return {
            "outcome_id": row["outcome_id"],
            "request_id": request_id,
            "plan": row["plan"],
            "shown_rank": rank,
            "propensity": (1.0 / len(shown)) if rank else None,
            "recorded_at": iso(row["recorded_at"]),
        }

    # ----------------------------------------------------------------------- auditors

    def audit_record(self, request_id: str) -> dict:
        """``GET /audit/{request_id}``."""
        record = self.store.get(request_id)
        if record is None:
            raise InvalidRequest(
                [violation("request_id", "no audit record has this request id", request_id)],
                status=404,
                error="not_found",
            )
        return record

    def audit_query(self, query: Mapping[str, str]) -> dict:
        """``GET /audit?since=&until=&model_version=&limit=``: records in time order."""
        allowed = ("since", "until", "model_version", "limit")
        problems = [
            violation(k, f"unknown query parameter; allowed: {', '.join(allowed)}", v)
            for k, v in query.items()
            if k not in allowed
        ]
        since = _moment(query, "since", problems)
        until = _moment(query, "until", problems)
        limit = 100
        if "limit" in query:
            try:
                limit = int(query["limit"])
            except ValueError:
                limit = 0
            if not 1 <= limit <= MAX_QUERY_LIMIT:
                problems.append(
                    violation(
                        "limit",
                        f"must be a whole number from 1 to {MAX_QUERY_LIMIT}",
                        query["limit"],
                    )
                )
        if problems:
            raise InvalidRequest(problems)
        records = self.store.find(
            since=since, until=until, model_version=query.get("model_version") or None, limit=limit
        )
        return {"count": len(records), "limit": limit, "records": records}

    def model_card(self) -> dict:
        """``GET /model``."""
        return {"model": self.served.info, **self.served.card}


_FHIR_FIELDS = {"fhir_bundle", "patient", "top_k", "as_of", "lookback_days",
                "assume_missing_scores"}
FHIR_MAX_DEPTH = 64  # Bundle > entry > resource > element > … (extensions nest further)


def _profile_from_fhir(body: bytes) -> tuple[bytes, dict]:
    """Turn a ``{"fhir_bundle": ...}`` request into the ordinary ``{"patient": ...}`` body,
    plus the mapping report. Explicit ``patient`` values win over the record."""
    from features.fhir import bundle_to_profile

    # the same checks as every body (deep nesting, lone surrogates, NaN: each was a 500
    # here), with room for FHIR's nesting
    request = parse_json(body, max_depth=FHIR_MAX_DEPTH)
    if not isinstance(request.get("fhir_bundle"), dict):
        raise InvalidRequest([violation("fhir_bundle", "must be a FHIR Bundle JSON object",
                                        has_value=False)])
    unknown = sorted(set(request) - _FHIR_FIELDS)
    if unknown:
        raise InvalidRequest([violation(f, "unknown field", has_value=False) for f in unknown])
    try:
        mapped = bundle_to_profile(
            request["fhir_bundle"], as_of=request.get("as_of"),
            lookback_days=int(request.get("lookback_days", 365)),
            assume_missing_scores=bool(request.get("assume_missing_scores", False)))
        mapped.profile.update(request.get("patient") or {})
        mapped.require_ready()
    except (ContractError, ValueError, TypeError, OverflowError) as err:  # Overflow: 1e400 days
        raise InvalidRequest([violation("fhir_bundle", " ".join(str(err).split()),
                                        has_value=False)]) from err
    plain = {"patient": mapped.profile, "top_k": request.get("top_k", 5)}
    return json.dumps(plain, default=str).encode(), mapped.report()


def _moment(query: Mapping[str, str], name: str, problems: list) -> datetime | None:
    """An ISO 8601 date or date-time query parameter as naive UTC (naive input = UTC)."""
    raw = query.get(name)
    if raw is None or raw == "":
        return None
    try:
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        problems.append(
            violation(
                name,
                "not an ISO 8601 date or date-time, e.g. 2026-11-21 or 2026-11-21T09:30:00Z",
                raw,
            )
        )
        return None
    if moment.tzinfo is not None:
        try:
            moment = moment.astimezone(UTC).replace(tzinfo=None)
        except OverflowError:  # e.g. 0001-01-01T00:00+05:00 is before year 1 in UTC
            problems.append(violation(name, "outside the years 1-9999 once converted to UTC", raw))
            return None
    return moment
