"""CDS Hooks cards for painplan (CDS Hooks 2.0 §"CDS Service Response"; interop.md §1.4, §1.7).

Pure functions from a :class:`features.fhir.FhirProfile` and a ``/recommend`` result to card
dicts. Card policy — what the clinician sees when opening the chart:

* **Options card** (always, when plans were ranked): summary = the top option with its
  expected PEG benefit and 80 % interval (≤ 140 characters, cut at a word if needed);
  ``detail`` = markdown with the top plans (benefit, interval, adverse-event risk, caution
  flags), the REVIEW/WARN cautions that apply to them, the components excluded for this
  patient with reasons and rule ids, the other cautions the record raises, what is currently
  prescribed, what was missing / approximated / assumed in the record and how that limits the
  answer, notes, and provenance. ``indicator`` is ``warning`` when something is excluded, a
  shown plan needs clinician REVIEW, or scores were assumed (provisional); otherwise
  ``info``. ``suggestions`` (``selectionBehavior: any``) propose ordering the missing
  measures (PHQ-9, GAD-7, PEG) as draft ServiceRequests: recording a measure is a sensible
  one-click action; ordering a *plan* is not, because a plan is several referrals and drugs
  whose details the clinician must choose.
* **Medication-conflict card** (only when a *currently prescribed* drug class is excluded for
  the patient): ``critical`` when a CONTRACT §5 floor rule is behind it (e.g. an active
  opioid with a benzodiazepine, CDC 2022 Rec 11), else ``warning``. Interop.md §1.7: safety
  findings belong on their own card so EHRs can sort and colour them.
* **Incomplete card** (chronic-pain patient whose record lacks a required field that cannot
  be assumed): ``info``, names the missing fields and why they matter, with the same order
  suggestions.

A patient the tool does not apply to (no chronic-pain condition, under 18) gets no card: a
patient-view service fires on every chart opening and must stay silent when it has nothing
to say (CDS Hooks: 200 with ``{"cards": []}``).

Component-level cautions that are not tied to a shown plan (e.g. NSAID: eGFR 30-59) come from
:func:`recommender.safety.assess` on the same validated profile the ranking used: the same
rule table, so the card cannot disagree with the ranking.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import pandas as pd

from features.catalog import COMPONENT_CODES, DRUG
from features.errors import ContractError
from features.fhir import FhirProfile
from features.validate import validate
from recommender.safety import RULESET_VERSION, assess

MAX_SUMMARY = 140  # CDS Hooks: summary "<140 characters"
CDC_2022_URL = "https://www.cdc.gov/mmwr/volumes/71/rr/rr7103a1.htm"
# Project-owned code systems for card topics and override reasons (replace with the project's
# canonical URL when it has one; CDS Hooks only needs them to be stable URIs).
TOPIC_SYSTEM = "urn:painplan:cds-topic"
OVERRIDE_SYSTEM = "urn:painplan:override-reason"
PHQ9_PANEL = (
    "http://loinc.org",
    "44249-1",
    "PHQ-9 quick depression assessment panel",
)  # evidence §1.1 (V)

SHORT_NAMES = {
    "pt": "PT/exercise",
    "cbt": "CBT",
    "mbsr": "MBSR",
    "acupuncture": "acupuncture",
    "diet": "diet programme",
    "yoga": "yoga/tai chi",
    "nsaid": "NSAID",
    "snri": "SNRI",
    "tca": "TCA",
    "gabapentinoid": "gabapentinoid",
    "muscle_relaxant": "muscle relaxant",
    "opioid": "opioid",
}
ORDERABLE = {  # measures a clinician can ask the patient to complete, with the order text
    "phq9": "PHQ-9 depression screen",
    "gad7": "GAD-7 anxiety screen",
    "peg": "PEG-3 pain, enjoyment and activity score",
    "pain_intensity": "pain intensity rating (0-10 NRS)",
}
OVERRIDE_REASONS = [
    {"system": OVERRIDE_SYSTEM, "code": "patient-preference", "display": "Patient preference"},
    {
        "system": OVERRIDE_SYSTEM,
        "code": "already-tried",
        "display": "Already tried without benefit",
    },
    {
        "system": OVERRIDE_SYSTEM,
        "code": "clinical-judgement",
        "display": "Not appropriate for this patient",
    },
]


@dataclass(frozen=True)
class CardSource:
    """``card.source``: who says so and where the evidence is."""

    label: str = "painplan chronic-pain treatment options (research prototype)"
    url: str | None = CDC_2022_URL
    topic_code: str = "chronic-pain-plan"
    topic_display: str = "Chronic pain treatment plan"

    def as_dict(self, topic_code: str | None = None, topic_display: str | None = None) -> dict:
        out = {
            "label": self.label,
            "topic": {
                "system": TOPIC_SYSTEM,
                "code": topic_code or self.topic_code,
                "display": topic_display or self.topic_display,
            },
        }
        if self.url:
            out["url"] = self.url
        return out


# ------------------------------------------------------------------------------ public


def recommendation_cards(
    fp: FhirProfile,
    result: dict,
    *,
    patient_ref: str,
    source: CardSource | None = None,
    top_n: int = 3,
) -> list[dict]:
    """Cards for a ranked answer (see the module docstring for the policy)."""
    source = source or CardSource()
    plans = _plans(result)[:top_n]
    safety = _record_safety(fp.profile)
    excluded = _excluded(result) or safety["excluded"]
    provisional = bool(fp.assumed)
    review = any(w["action"] == "REVIEW" for p in plans for w in p["warnings"])
    indicator = "warning" if (excluded or review or provisional) else "info"

    if plans:
        top = plans[0]
        summary = (
            f"{'Provisional: ' if provisional else ''}Top option: {plan_label(top['components'])}, "
            f"{_benefit(top)} PEG points at 12 weeks (80% interval {_interval(top)})"
        )
    else:
        summary = "No treatment plan passes the safety rules for this patient; see details"
        indicator = "warning"
    detail = _detail(fp, plans, excluded, safety["cautions"], result)
    card = {
        "uuid": str(uuid.uuid4()),
        "summary": fit_summary(summary),
        "indicator": indicator,
        "detail": detail,
        "source": source.as_dict(),
        "overrideReasons": OVERRIDE_REASONS,
    }
    suggestions = _order_suggestions(fp, patient_ref)
    if suggestions:
        card["suggestions"] = suggestions
        card["selectionBehavior"] = "any"
    cards = [card]
    conflict = _conflict_card(fp, excluded, source)
    if conflict is not None:
        cards.insert(0, conflict)
    return cards


def incomplete_card(fp: FhirProfile, *, patient_ref: str, source: CardSource | None = None) -> dict:
    """An ``info`` card for a chronic-pain patient whose record cannot be ranked yet."""
    source = source or CardSource()
    names = [_field_name(f) for f in fp.incomplete]
    summary = "Chronic-pain plan options need: " + ", ".join(names)
    lines = [
        "**Treatment options could not be ranked**: the record lacks required information.",
        "",
    ]
    for m in fp.missing:
        if m["required"] and m["field"] in fp.incomplete:
            seen = (
                f" (last recorded {m['last_seen']}, outside the {fp.lookback_days}-day look-back)"
                if m.get("last_seen")
                else ""
            )
            lines.append(f"- **{_field_name(m['field'])}**{seen}: {m['impact']}")
    lines += _provenance(fp, None)
    card = {
        "uuid": str(uuid.uuid4()),
        "summary": fit_summary(summary),
        "indicator": "info",
        "detail": "\n".join(lines),
        "source": source.as_dict(),
    }
    suggestions = _order_suggestions(fp, patient_ref)
    if suggestions:
        card["suggestions"] = suggestions
        card["selectionBehavior"] = "any"
    return card


def plan_label(components: Iterable[str] | str) -> str:
    """``['cbt', 'pt', 'snri']`` → ``'PT/exercise + CBT + SNRI'`` (non-drug first, catalog order)."""
    codes = components.split("+") if isinstance(components, str) else list(components)
    order = {c: i for i, c in enumerate(COMPONENT_CODES)}
    return " + ".join(SHORT_NAMES.get(c, c) for c in sorted(codes, key=lambda c: order.get(c, 99)))


def fit_summary(text: str, limit: int = MAX_SUMMARY) -> str:
    """Cut ``text`` to fewer than ``limit`` characters at a word boundary, with an ellipsis."""
    text = " ".join(text.split())
    if len(text) < limit:
        return text
    cut = text[: limit - 2].rsplit(" ", 1)[0].rstrip(",;:(")
    return cut + "…"


# ------------------------------------------------------------------------------ result parsing


def _plans(result: dict) -> list[dict]:
    """The ranked plans of a /recommend answer, tolerant of small shape differences."""
    out = []
    for p in result.get("plans") or []:
        if not isinstance(p, dict):
            continue
        plan = p.get("plan") or ""
        # /recommend sends components as {"code", "kind", "name"} objects; accept bare codes too
        comps = [c.get("code") if isinstance(c, dict) else c for c in p.get("components") or []]
        comps = [c for c in comps if isinstance(c, str)] or (plan.split("+") if plan else [])
        lo, hi = _bounds(p)
        out.append(
            {
                "rank": p.get("rank"),
                "plan": plan,
                "components": list(comps),
                "ei": _num(p.get("expected_improvement")),
                "lo": lo,
                "hi": hi,
                "p_ae": _num(p.get("p_adverse_event")),
                "warnings": [_warning(w) for w in p.get("warnings") or []],
                "why": _why(p.get("explanation")),
            }
        )
    return out


def _bounds(p: dict) -> tuple[float | None, float | None]:
    iv = p.get("improvement_interval")
    if isinstance(iv, list | tuple) and len(iv) == 2:
        return _num(iv[0]), _num(iv[1])
    if isinstance(iv, dict):
        return (_num(iv.get("low", iv.get("lower"))), _num(iv.get("high", iv.get("upper"))))
    return _num(p.get("improvement_low")), _num(p.get("improvement_high"))


def _warning(w) -> dict:
    if isinstance(w, dict):
        return {
            "action": str(w.get("action") or "WARN").upper(),
            "rule_id": w.get("rule_id") or w.get("id") or "",
            "reason": str(w.get("reason") or w.get("message") or ""),
            "components": w.get("components") or [],
        }
    return {"action": "WARN", "rule_id": "", "reason": str(w), "components": []}


def _why(explanation) -> list[str]:
    items = explanation
    if isinstance(explanation, dict):
        items = explanation.get("contributions") or []
    phrases = []
    for item in items if isinstance(items, list) else []:
        if (
            isinstance(item, dict)
            and item.get("phrase")
            and item.get("feature") != "other features"
            and item.get("value") != "missing"  # "alcohol of missing" helps nobody
        ):
            phrases.append(str(item["phrase"]))
    return phrases[:2]


def _excluded(result: dict) -> list[dict]:
    out = []
    for e in result.get("excluded") or []:
        if not isinstance(e, dict):
            continue
        name = e.get("component") or e.get("combination") or e.get("plan")
        raw = e.get("reasons") or e.get("rules") or []
        reasons = []
        for r in raw if isinstance(raw, list) else [raw]:
            if isinstance(r, dict):
                reasons.append(
                    {
                        "rule_id": r.get("rule_id") or r.get("id") or "",
                        "reason": str(r.get("reason") or ""),
                        "floor": bool(r.get("floor", False)),
                    }
                )
            else:
                reasons.append({"rule_id": "", "reason": str(r), "floor": False})
        if name:
            out.append({"name": str(name), "is_component": "component" in e, "reasons": reasons})
    return out


def _num(x) -> float | None:
    try:
        return None if x is None else float(x)
    except (TypeError, ValueError):
        return None


# ------------------------------------------------------------------------------ safety view


def _record_safety(profile: dict) -> dict:
    """Exclusions and component-level REVIEW/WARN cautions for one profile, from the rule table."""
    try:
        frame = validate(pd.DataFrame([profile]), "request").frame
    except ContractError:
        return {"excluded": [], "cautions": []}
    a = assess(frame)
    excluded = [
        {
            "name": e.get("component") or e.get("combination"),
            "is_component": "component" in e,
            "reasons": [
                {"rule_id": r["id"], "reason": r["reason"], "floor": r["floor"]} for r in e["rules"]
            ],
        }
        for e in a.exclusions(0)
    ]
    blocked = {e["name"] for e in excluded}
    cautions: dict[str, dict] = {}
    for code in COMPONENT_CODES:
        if code in blocked:
            continue
        for w in a.plan_warnings(0, code):
            c = cautions.setdefault(w["rule_id"], {**_warning(w), "components": []})
            c["components"].append(code)
    return {"excluded": excluded, "cautions": list(cautions.values())}


# ------------------------------------------------------------------------------ rendering


def _benefit(p: dict) -> str:
    return "n/a" if p["ei"] is None else f"{p['ei']:+.1f}"


def _interval(p: dict) -> str:
    if p["lo"] is None or p["hi"] is None:
        return "n/a"
    return f"{p['lo']:.1f} to {p['hi']:.1f}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _field_name(name: str) -> str:
    return {
        "phq9": "PHQ-9",
        "gad7": "GAD-7",
        "peg": "PEG",
        "egfr": "eGFR",
        "bmi": "BMI",
        "pain_intensity": "pain score",
        "pain_condition": "chronic-pain diagnosis",
        "pain_duration_months": "pain duration",
        "age": "age (birth date)",
        "sex": "sex",
        "smoker": "smoking status",
        "activity_min_week": "physical activity",
        "pcs": "PCS",
        "isi": "ISI",
        "alcohol_units_week": "alcohol use",
        "diet_quality": "diet quality",
    }.get(name, name)


def _detail(
    fp: FhirProfile, plans: list[dict], excluded: list[dict], cautions: list[dict], result: dict
) -> str:
    lines: list[str] = []
    if fp.assumed:
        assumed = ", ".join(f"{_field_name(k)} {v['value']}" for k, v in fp.assumed.items())
        lines += [
            f"**Provisional**: not on record, so assumed at the cohort median ({assumed}). "
            "Record the real scores and reopen the chart for a firm ranking.",
            "",
        ]
    if plans:
        lines += [
            "**Ranked options** (expected improvement of the PEG score at 12 weeks, 80% interval, "
            "risk of a treatment-limiting adverse event; ranked by utility = benefit minus a "
            "penalty for that risk, CONTRACT §4)",
            "",
            "| # | Plan | Benefit (PEG pts) | 80% interval | Adverse-event risk | Needs |",
            "|---|---|---|---|---|---|",
        ]
        for i, p in enumerate(plans, 1):
            needs = (
                sorted({w["action"] for w in p["warnings"]}, key=["REVIEW", "WARN"].index)
                if p["warnings"]
                else []
            )
            flag = {"REVIEW": "clinician review", "WARN": "caution"}
            lines.append(
                f"| {p['rank'] or i} | {_md(plan_label(p['components']))} | {_benefit(p)} | "
                f"{_interval(p)} | {_pct(p['p_ae'])} | {', '.join(flag[n] for n in needs) or '-'} |"
            )
        if plans[0]["why"]:
            lines += ["", "Why option 1: " + "; ".join(plans[0]["why"]) + "."]
        shown = [(i, w) for i, p in enumerate(plans, 1) for w in p["warnings"]]
        if shown:
            lines += ["", "**Cautions for these options**"]
            seen = set()
            for _, w in shown:
                key = (w["rule_id"], w["reason"])
                if key in seen:
                    continue
                seen.add(key)
                options = [
                    str(j)
                    for j, p in enumerate(plans, 1)
                    if any((x["rule_id"], x["reason"]) == key for x in p["warnings"])
                ]
                rid = f" ({w['rule_id']})" if w["rule_id"] else ""
                lines.append(
                    f"- Option {', '.join(options)}: {w['action']}{rid}: {_md(w['reason'])}"
                )
    if excluded:
        lines += ["", "**Excluded for this patient**"]
        for e in excluded:
            name = SHORT_NAMES.get(e["name"], e["name"])
            why = (
                "; ".join(
                    f"{_md(r['reason'])}" + (f" ({r['rule_id']})" if r["rule_id"] else "")
                    for r in e["reasons"]
                )
                or "safety rule"
            )
            lines.append(f"- {name}: {why}")
    shown_ids = {w["rule_id"] for p in plans for w in p["warnings"]}
    other = [c for c in cautions if c["rule_id"] not in shown_ids]
    if other:
        lines += ["", "**Other cautions from the record** (apply if these components are chosen)"]
        for c in other:
            comps = ", ".join(SHORT_NAMES.get(x, x) for x in c["components"])
            lines.append(f"- {comps}: {c['action']} ({c['rule_id']}): {_md(c['reason'])}")
    if fp.current_medications:
        by_class: dict[str, set[str]] = {}
        for m in fp.current_medications:
            by_class.setdefault(m["class"], set()).update(m["ingredients"])
        lines += [
            "",
            "**Currently prescribed**: "
            + "; ".join(
                f"{SHORT_NAMES.get(c, c)} ({', '.join(sorted(n))})"
                for c, n in sorted(by_class.items())
            ),
        ]
    lines += _missing_lines(fp)
    if fp.notes:
        lines += ["", "**Notes**"] + [f"- {_md(n)}" for n in fp.notes]
    if fp.warnings:
        lines += ["", "**Record warnings**"] + [f"- {_md(w)}" for w in fp.warnings]
    lines += _provenance(fp, result)
    return "\n".join(lines).strip()


def _missing_lines(fp: FhirProfile) -> list[str]:
    important = [m for m in fp.missing if m["status"] != "not_mapped"]
    not_mapped = [m for m in fp.missing if m["status"] == "not_mapped"]
    if not important and not not_mapped:
        return []
    out = ["", "**Missing or approximated in the record**"]
    label = {
        "absent": "not recorded",
        "stale": "out of date",
        "approximated": "approximated",
        "assumed": "assumed",
        "not_mapped": "not read",
    }
    for m in important:
        seen = f", last recorded {m['last_seen']}" if m.get("last_seen") else ""
        out.append(f"- {_field_name(m['field'])} ({label[m['status']]}{seen}): {_md(m['impact'])}")
    if not_mapped:
        out.append(
            "- Not read from FHIR (no verified code or element): "
            + ", ".join(_field_name(m["field"]) for m in not_mapped)
            + "; their effects are averaged out."
        )
    return out


def _provenance(fp: FhirProfile, result: dict | None) -> list[str]:
    model = (result or {}).get("model") or {}
    bits = [
        f"record as of {fp.as_of}",
        f"look-back {fp.lookback_days} days",
        f"FHIR code table {fp.code_table_version}",
        f"safety rules {RULESET_VERSION}",
    ]
    if isinstance(model, dict) and model.get("version"):
        bits.append(f"model {model.get('name', '')} v{model['version']}".replace("  ", " "))
    if result and result.get("request_id"):
        bits.append(f"request {result['request_id']}")
    return [
        "",
        "_" + "; ".join(bits) + ". Decision support for a clinician, not a prescription: "
        "confirm diagnoses, co-medication and renal function before acting._",
    ]


def _order_suggestions(fp: FhirProfile, patient_ref: str) -> list[dict]:
    wanted = [
        m["field"]
        for m in fp.missing
        if m["field"] in ORDERABLE and m["status"] in ("absent", "stale", "assumed", "approximated")
    ]
    out = []
    for name in wanted:
        code: dict = {"text": ORDERABLE[name]}
        if name == "phq9":
            code["coding"] = [dict(zip(("system", "code", "display"), PHQ9_PANEL, strict=True))]
        out.append(
            {
                "label": f"Ask the patient to complete a {ORDERABLE[name]}",
                "uuid": str(uuid.uuid4()),
                "isRecommended": name in fp.assumed or name in fp.incomplete,
                "actions": [
                    {
                        "type": "create",
                        "description": f"Draft order: {ORDERABLE[name]} (for the pain-plan ranking)",
                        "resource": {
                            "resourceType": "ServiceRequest",
                            "status": "draft",
                            "intent": "proposal",
                            "code": code,
                            "subject": {"reference": patient_ref},
                        },
                    }
                ],
            }
        )
    return out


def _conflict_card(fp: FhirProfile, excluded: list[dict], source: CardSource) -> dict | None:
    current = {m["class"] for m in fp.current_medications if m["class"] in DRUG}
    hits = [e for e in excluded if e["is_component"] and e["name"] in current]
    if not hits:
        return None
    floor = any(r["floor"] for e in hits for r in e["reasons"])
    names = " and ".join(SHORT_NAMES.get(e["name"], e["name"]) for e in hits)
    first = hits[0]["reasons"][0]["reason"].rstrip(".") if hits[0]["reasons"] else "a safety rule"
    summary = f"Current {names} is excluded for this patient: {first}"
    lines = [
        "**A drug class this patient is currently prescribed is excluded by the safety rules.**",
        "",
    ]
    for e in hits:
        meds = sorted(
            {n for m in fp.current_medications if m["class"] == e["name"] for n in m["ingredients"]}
        )
        lines.append(f"- {SHORT_NAMES.get(e['name'], e['name'])} ({', '.join(meds)}):")
        for r in e["reasons"]:
            tag = " — CONTRACT §5 safety floor" if r["floor"] else ""
            lines.append(f"  - {_md(r['reason'])} ({r['rule_id']}{tag})")
    lines += [
        "",
        "Review the combination and consider a taper plan; the ranked options never include this class.",
    ]
    return {
        "uuid": str(uuid.uuid4()),
        "summary": fit_summary(summary),
        "indicator": "critical" if floor else "warning",
        "detail": "\n".join(lines),
        "source": CardSource(
            label="painplan safety rules (CONTRACT §5; clinical-evidence §5.2)",
            url=source.url,
        ).as_dict("medication-safety", "Medication safety"),
        "overrideReasons": OVERRIDE_REASONS,
    }


__all__ = [
    "CDC_2022_URL",
    "CardSource",
    "MAX_SUMMARY",
    "fit_summary",
    "incomplete_card",
    "plan_label",
    "recommendation_cards",
]
