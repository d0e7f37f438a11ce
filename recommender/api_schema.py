"""Request and response models of the HTTP API (CONTRACT §8), generated from
:mod:`features.schema`, and the parsing that turns a request body into a validated frame.

Division of labour, so the service can never accept or refuse something the contract
validator would not:

* the pydantic models fix the *shape*: which objects and fields exist, which are required,
  that profile values are JSON scalars. Their JSON schema (the OpenAPI document) shows each
  column's contract type, range or levels and unit, read from the same ``Column``
  declarations :func:`features.validate.validate` uses: nothing is retyped here;
* :func:`features.validate.validate` (``kind="request"``: ``patient_id`` optional) decides
  every *value*: ranges, levels, the contract's boolean spellings, empty = missing for
  optional columns, extra columns ignored with a warning.

Every problem in a request is reported at once. Invalid input is answered with **400**
(the contract allows any 4xx; 400 is what BentoML uses for ``InvalidArgument`` and keeps one
code for "fix the request", whether the JSON, a field or a plan spelling is wrong). The body
is ``{"error": "invalid_request", "message": <one paragraph>, "violations": [{"field",
"value", "problem", "message"}, …]}``; ``field`` is a dotted path such as
``patient.age`` or ``top_k``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import pandas as pd
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    WithJsonSchema,
    create_model,
)
from pydantic.json_schema import models_json_schema

from features.catalog import COMPONENT_CODES, parse_plan
from features.errors import ContractError, PainplanError, PlanError
from features.schema import COLUMNS_BY_NAME, PATIENT_ID, Column, columns_for
from features.validate import typed_frame, validate_records
from recommender.recommend import MAX_TOP_K

DEFAULT_TOP_K = 5
MAX_VALUE_CHARS = 80  # quoted values are cut so an error stays one readable paragraph


def _json_scalar(value: Any) -> Any:
    if value is not None and not isinstance(value, str | int | float | bool):
        raise ValueError("must be a JSON string, number, boolean or null")
    return value


# A profile value is any JSON scalar; what it must be is the validator's decision.
_Scalar = Annotated[Any, AfterValidator(_json_scalar)]
_BOOL_SPELLINGS = ["true", "false", "1", "0", "yes", "no"]


def column_json_schema(col: Column) -> dict[str, Any]:
    """JSON schema of one contract column (type, range/levels, unit, description)."""
    schema: dict[str, Any] = {
        "description": col.description + (f" ({col.unit})" if col.unit else "")
    }
    if col.dtype == "int":
        schema["type"] = "integer"
    elif col.dtype == "float":
        schema["type"] = "number"
    elif col.dtype == "bool":
        schema["anyOf"] = [
            {"type": "boolean"},
            {"type": "string", "enum": _BOOL_SPELLINGS, "description": "any case"},
        ]
    elif col.levels:
        schema.update(type="string", enum=list(col.levels))
    elif col.dtype == "plan":
        schema.update(
            type="string",
            description=f"{col.description}: component codes joined by '+' "
            f"({', '.join(COMPONENT_CODES)})",
            examples=["cbt+pt+snri"],
        )
    else:
        schema["type"] = "string"
        if col.max_length:
            schema.update(minLength=1, maxLength=col.max_length)
    if col.min is not None:
        schema["exclusiveMinimum" if col.min_exclusive else "minimum"] = col.min
    if col.max is not None:
        schema["maximum"] = col.max
    if col.default is not None:
        schema["default"] = col.default
    return schema


def _value_field(col: Column, *, required: bool) -> tuple[Any, Any]:
    annotation = Annotated[_Scalar, WithJsonSchema(column_json_schema(col))]
    return annotation, Field(... if required else None)


def _profile_model() -> type[BaseModel]:
    columns = columns_for("request")
    required = [c.name for c in columns if c.required]

    def mark_required(schema: dict[str, Any]) -> None:
        # Required columns are checked by the validator (so a missing one is reported with
        # every other problem); the schema still says which they are.
        schema["required"] = required

    return create_model(
        "PatientProfile",
        __config__=ConfigDict(extra="allow", json_schema_extra=mark_required),
        __doc__="A patient profile (CONTRACT §2). Unknown fields are ignored with a warning; "
        "empty or null optional fields are missing; patient_id is optional and never stored.",
        **{c.name: _value_field(c, required=False) for c in columns},
    )


PatientProfile = _profile_model()

_PLAN = COLUMNS_BY_NAME["plan"]


class RecommendRequest(BaseModel):
    """``POST /recommend``."""

    model_config = ConfigDict(extra="forbid")
    patient: PatientProfile  # type: ignore[valid-type]
    top_k: Annotated[StrictInt, Field(ge=1, le=MAX_TOP_K)] = DEFAULT_TOP_K


class ExplainRequest(BaseModel):
    """``POST /explain``: why plan_a ranks above (or below) plan_b for this patient."""

    model_config = ConfigDict(extra="forbid")
    patient: PatientProfile  # type: ignore[valid-type]
    plan_a: Annotated[StrictStr, WithJsonSchema(column_json_schema(_PLAN))]
    plan_b: Annotated[StrictStr, WithJsonSchema(column_json_schema(_PLAN))]


OutcomeRequest = create_model(
    "OutcomeRequest",
    __config__=ConfigDict(extra="forbid"),
    __doc__="``POST /outcomes``: what happened after an answered recommendation.",
    request_id=(Annotated[StrictStr, Field(min_length=1, max_length=64)], ...),
    **{
        name: _value_field(COLUMNS_BY_NAME[name], required=True)
        for name in ("plan", "peg_12wk", "adverse_event")
    },
)


# --------------------------------------------------------------------------- responses
# Documentation of the answers (OpenAPI); the service builds plain dicts of this shape.


class ModelInfo(BaseModel):
    name: str = Field(description="registered model name in MLflow")
    version: str = Field(description="registered model version")
    tag: str = Field(description="BentoML model tag served")
    mlflow_run_id: str | None
    ruleset_version: str = Field(description="safety ruleset applied")


class RuleRef(BaseModel):
    rule_id: str
    action: str = Field(description="BLOCK, REVIEW or WARN")
    reason: str
    source: str | None = None


class PlanWarning(RuleRef):
    components: list[str]


class Contribution(BaseModel):
    feature: str
    value: str = Field(description="the patient's value, as shown to a clinician")
    shap: float = Field(description="SHAP value in PEG points")
    phrase: str


class Explanation(BaseModel):
    base_value: float = Field(description="plan part of the utility for the average patient")
    plan_effect: float = Field(description="base_value + sum of contributions")
    contributions: list[Contribution]
    note: str


class Component(BaseModel):
    code: str
    kind: str
    name: str


class RankedPlan(BaseModel):
    rank: int
    plan: str
    components: list[Component]
    utility: float
    expected_improvement: float = Field(description="PEG points at 12 weeks")
    improvement_interval: tuple[float, float] = Field(description="80 % interval [low, high]")
    p_response: float
    p_adverse_event: float
    warnings: list[PlanWarning]
    explanation: Explanation


class Exclusion(BaseModel):
    component: str | None = None
    combination: str | None = None
    rules: list[RuleRef]


class RecommendResponse(BaseModel):
    request_id: str
    created_at: str
    model: ModelInfo
    plans: list[RankedPlan]
    excluded: list[Exclusion]
    input_warnings: list[str]


class ContrastResponse(BaseModel):
    request_id: str
    created_at: str
    model: ModelInfo
    plan_a: str
    plan_b: str
    utility_gap: float = Field(description="utility(plan_a) - utility(plan_b)")
    average_patient_gap: float
    contributions: list[Contribution]
    summary: str
    plans: list[dict[str, Any]]
    input_warnings: list[str]


class OutcomeResponse(BaseModel):
    outcome_id: str
    request_id: str
    plan: str
    shown_rank: int | None = Field(description="rank at which the plan was shown, if it was")
    propensity: float | None
    recorded_at: str


class Violation(BaseModel):
    field: str
    value: Any = None
    problem: str
    message: str


class ErrorBody(BaseModel):
    error: str
    message: str
    violations: list[Violation] = []


# --------------------------------------------------------------------------- parsing


class InvalidRequest(PainplanError):
    """A request the service refuses; ``status`` is its HTTP code (400 unless said)."""

    def __init__(
        self, violations: list[dict], *, status: int = 400, error: str = "invalid_request"
    ):
        self.violations = violations
        self.status = status
        self.error = error
        super().__init__(_summary(violations))


def _summary(violations: list[dict]) -> str:
    parts = "; ".join(v["message"] for v in violations)
    return " ".join(f"{len(violations)} problem(s) in the request: {parts}.".split())


def _quote(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 1] + "…"


def violation(field: str, problem: str, value: Any = None, *, has_value: bool = True) -> dict:
    shown = f" (value {_quote(value)})" if has_value else ""
    try:  # the answer is strict JSON: 1e400 parses to inf, which it cannot carry as a number
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        value = _quote(value)
    return {
        "field": field,
        "value": value,
        "problem": problem,
        "message": f"{field}: {problem}{shown}",
    }


def parse_json(body: bytes, *, max_depth: int | None = None) -> dict:
    """The request body as a JSON object; NaN/Infinity are refused (not JSON, and a NaN
    would silently read as 'missing'), and so are lone surrogate escapes and nesting deeper
    than ``max_depth`` (default MAX_DEPTH; a FHIR bundle needs more)."""
    max_depth = MAX_DEPTH if max_depth is None else max_depth

    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not a JSON value")

    try:
        data = json.loads(body.decode("utf-8"), parse_constant=refuse)
    except RecursionError:  # '[[[[…' deeper than the interpreter's recursion limit
        raise InvalidRequest(
            [violation("(body)", f"nested more than {max_depth} levels deep", has_value=False)]
        ) from None
    except (UnicodeDecodeError, ValueError) as err:
        text = " ".join(str(err).split())
        raise InvalidRequest(
            [violation("(body)", f"not valid UTF-8 JSON: {text}", has_value=False)]
        ) from err
    if not isinstance(data, dict):
        raise InvalidRequest(
            [
                violation(
                    "(body)", f"expected a JSON object, got {type(data).__name__}", has_value=False
                )
            ]
        )
    problem = _unusable_part(data, max_depth)
    if problem is not None:
        raise InvalidRequest([problem])
    return data


MAX_DEPTH = 8  # a request is three levels deep (body, patient, value); more is never valid
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _unusable_part(data: dict, max_depth: int = MAX_DEPTH) -> dict | None:
    """The first part of a parsed body no later step can handle, as a violation: a string
    (key or value) with a lone UTF-16 surrogate escape such as ``"\\ud800"`` (valid JSON,
    but not Unicode text: it cannot be encoded, stored or even quoted back in the error), or
    nesting deeper than MAX_DEPTH. Walked iteratively, so depth cannot exhaust the stack."""
    stack: list[tuple[str, Any, int]] = [("", data, 0)]
    while stack:
        path, value, depth = stack.pop()
        if depth > max_depth:
            return violation(path, f"nested more than {max_depth} levels deep", has_value=False)
        if isinstance(value, str) and _SURROGATE.search(value):
            return violation(
                path or "(body)",
                "contains a lone UTF-16 surrogate escape (\\ud800-\\udfff), which is not "
                "a Unicode character",
                has_value=False,
            )
        if not isinstance(value, dict | list):
            continue
        for key, item in value.items() if isinstance(value, dict) else enumerate(value):
            if isinstance(key, str) and _SURROGATE.search(key):
                shown = key.encode("utf-8", "backslashreplace").decode("utf-8")
                return violation(
                    f"{path}.{shown}" if path else shown,
                    "this field name contains a lone UTF-16 surrogate escape, which is not "
                    "a Unicode character",
                    has_value=False,
                )
            name = f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else key)
            stack.append((name, item, depth + 1))
    return None


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _pydantic_violations(err: ValidationError, allowed: list[str]) -> list[dict]:
    out = []
    for e in err.errors(include_url=False):
        field = _loc(e["loc"])
        if e["type"] == "missing":
            out.append(violation(field, "required field is missing", has_value=False))
        elif e["type"] == "extra_forbidden":
            out.append(
                violation(field, f"unknown field; allowed: {', '.join(allowed)}", e["input"])
            )
        else:
            problem = e["msg"].removeprefix("Value error, ")
            out.append(violation(field, problem[0].lower() + problem[1:], e["input"]))
    return out


def _contract_violations(err: ContractError, prefix: str) -> list[dict]:
    out = []
    for v in err.violations:
        problem = v["problem"] + (f" — {v['hint']}" if v.get("hint") else "")
        has_value = bool(v.get("values"))
        value = v["values"][0] if has_value else None
        out.append(violation(f"{prefix}.{v['column']}", problem, value, has_value=has_value))
    return out


def _check_patient(raw: Any, problems: list[dict]) -> tuple[pd.DataFrame | None, list[str]]:
    """Validate a profile object with the contract validator; collect its violations."""
    if not isinstance(raw, dict):
        return None, []
    checked = validate_records([raw], "request")  # = validate(pd.DataFrame([raw]), "request")
    if checked.errors[0] is not None:
        problems.extend(_contract_violations(checked.errors[0], "patient"))
        return None, []
    return checked.frame, list(checked.warnings[0])


def _check_plan(data: dict, name: str, problems: list[dict]) -> str | None:
    value = data.get(name)
    if not isinstance(value, str):
        return None  # the shape check already named it
    try:
        return parse_plan(value)
    except PlanError as err:
        problems.append(violation(name, str(err), value))
        return None


def _unique(problems: list[dict]) -> list[dict]:
    """One violation per field: a shape problem (checked first) hides the validator's
    report on the same value."""
    seen: set[str] = set()
    out = []
    for p in problems:
        if p["field"] not in seen:
            seen.add(p["field"])
            out.append(p)
    return out


def _shape(model: type[BaseModel], data: dict) -> list[dict]:
    try:
        model.model_validate(data)
    except ValidationError as err:
        return _pydantic_violations(err, list(model.model_fields))
    return []


@dataclass
class PatientRequest:
    patient: pd.DataFrame | None  # the validated one-row frame (built on demand, see frame())
    profile: dict  # the contract columns as sent, minus patient_id (what the audit keeps)
    patient_id: str | None
    input_warnings: list[str] = field(default_factory=list)

    def frame(self) -> pd.DataFrame:
        """The validated one-row patient frame (built from the typed profile if need be)."""
        if self.patient is None:
            self.patient = typed_frame([{**self.profile, PATIENT_ID: self.patient_id}])
        return self.patient


@dataclass
class RecommendInput(PatientRequest):
    top_k: int = DEFAULT_TOP_K


@dataclass
class ExplainInput(PatientRequest):
    plan_a: str = ""
    plan_b: str = ""


def _patient_request(frame: pd.DataFrame) -> dict[str, Any]:
    row = frame.iloc[0]
    patient_id = row.get("patient_id")
    profile = {c: _plain(row[c]) for c in frame.columns if c != "patient_id"}
    return {"patient": frame, "profile": profile, "patient_id": patient_id}


def _plain(value: Any) -> Any:
    """A typed frame cell as a JSON value (missing → None, numpy → Python)."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return value.item() if hasattr(value, "item") else value


def parse_recommend(body: bytes) -> RecommendInput:
    """One ``POST /recommend`` body; raises :class:`InvalidRequest` naming every problem."""
    (item,) = parse_recommend_many([body])
    if isinstance(item, InvalidRequest):
        raise item
    item.frame()
    return item


def parse_recommend_many(
    bodies: Sequence[bytes],
) -> list[RecommendInput | InvalidRequest]:
    """Several ``POST /recommend`` bodies, each judged on its own exactly as
    :func:`parse_recommend` would (same answer, same 400 body), validated together.

    Returns, per body, either its :class:`RecommendInput` (``profile`` its typed values;
    ``patient`` is None until ``frame()`` builds it) or its :class:`InvalidRequest`. The
    service encodes the typed values directly and never builds a frame.
    """
    pending: list[InvalidRequest | tuple[dict, list[dict], int | None]] = []
    records: list[dict] = []
    for body in bodies:
        try:
            data = parse_json(body)
        except InvalidRequest as err:
            pending.append(err)
            continue
        problems = _shape(RecommendRequest, data)
        raw = data.get("patient")
        slot = None
        if isinstance(raw, dict):
            slot = len(records)
            records.append(raw)
        pending.append((data, problems, slot))
    checked = validate_records(records, "request")
    items: list[RecommendInput | InvalidRequest] = []
    for entry in pending:
        if isinstance(entry, InvalidRequest):
            items.append(entry)
            continue
        data, problems, slot = entry
        if slot is not None and checked.errors[slot] is not None:
            problems.extend(_contract_violations(checked.errors[slot], "patient"))
        if problems or slot is None or checked.errors[slot] is not None:
            items.append(InvalidRequest(_unique(problems)))
            continue
        values = checked.values[slot]
        items.append(
            RecommendInput(
                patient=None,
                profile={c: v for c, v in values.items() if c != PATIENT_ID},
                patient_id=values[PATIENT_ID],
                input_warnings=list(checked.warnings[slot]),
                top_k=data.get("top_k", DEFAULT_TOP_K),
            )
        )
    return items


def parse_explain(body: bytes) -> ExplainInput:
    data = parse_json(body)
    problems = _shape(ExplainRequest, data)
    frame, warnings = _check_patient(data.get("patient"), problems)
    plan_a = _check_plan(data, "plan_a", problems)
    plan_b = _check_plan(data, "plan_b", problems)
    if problems or frame is None or plan_a is None or plan_b is None:
        raise InvalidRequest(_unique(problems))
    return ExplainInput(
        **_patient_request(frame), input_warnings=warnings, plan_a=plan_a, plan_b=plan_b
    )


def parse_outcome_shape(body: bytes) -> dict:
    """The outcome report, shape-checked; its values are checked against the episode schema
    (CONTRACT §3) once the recommendation it refers to is found."""
    data = parse_json(body)
    problems = _shape(OutcomeRequest, data)
    if problems:
        raise InvalidRequest(problems)
    return data


def episode_violations(err: ContractError) -> list[dict]:
    """Violations of an outcome report, named by the request fields."""
    return _contract_violations(err, "outcome")


# --------------------------------------------------------------------------- OpenAPI

ROUTES: tuple[tuple[str, str, str, str, type[BaseModel] | None, type[BaseModel] | None], ...] = (
    (
        "post",
        "/recommend",
        "clinician",
        "Rank plans for one patient",
        RecommendRequest,
        RecommendResponse,
    ),
    (
        "post",
        "/explain",
        "clinician",
        "Why plan_a ranks above or below plan_b",
        ExplainRequest,
        ContrastResponse,
    ),
    (
        "post",
        "/outcomes",
        "clinician",
        "Report the outcome of an answered recommendation",
        OutcomeRequest,
        OutcomeResponse,
    ),
    ("get", "/audit/{request_id}", "auditor", "One audit record", None, None),
    (
        "get",
        "/audit",
        "auditor",
        "Audit records (query: since, until, model_version, limit)",
        None,
        None,
    ),
    ("get", "/model", "auditor", "Model card and lineage", None, None),
)


def openapi_document(version: str) -> dict[str, Any]:
    """OpenAPI 3.1 description of the routes above, schemas from the pydantic models."""
    models = {m for r in ROUTES for m in r[4:] if m is not None} | {ErrorBody}
    refs, schema = models_json_schema(
        [
            (m, "validation" if m in {r[4] for r in ROUTES} else "serialization")
            for m in sorted(models, key=lambda m: m.__name__)
        ],
        ref_template="#/components/schemas/{model}",
    )
    error = {"content": {"application/json": {"schema": refs[(ErrorBody, "serialization")]}}}
    paths: dict[str, Any] = {}
    for method, path, role, summary, request, response in ROUTES:
        op: dict[str, Any] = {
            "summary": summary,
            "description": f"Needs an API key with the {role} role.",
            "security": [{"bearer": []}],
            "responses": {
                "200": {"description": "OK"},
                "400": {"description": "invalid request", **error},
                "401": {"description": "no or unknown API key", **error},
                "403": {"description": f"key lacks the {role} role", **error},
            },
        }
        if request is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": refs[(request, "validation")]}},
            }
            op["responses"]["413"] = {"description": "request too large", **error}
            op["responses"]["503"] = {"description": "audit store unavailable", **error}
        if response is not None:
            op["responses"]["200"]["content"] = {
                "application/json": {"schema": refs[(response, "serialization")]}
            }
        paths.setdefault(path, {})[method] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "painplan",
            "version": version,
            "description": "Safety-gated chronic-pain treatment plans (CONTRACT §8).",
        },
        "paths": paths,
        "components": {
            "schemas": schema.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
