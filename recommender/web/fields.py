"""The patient form's description, generated from :mod:`features.schema`.

The clinician page builds its form from this JSON (``GET /ui/fields.json``), so a column
added to or changed in the contract appears on the page without touching HTML or
JavaScript. Labels reuse :func:`recommender.explain.feature_label` (the words the SHAP
explanations use) and the catalog's component names.
"""

from __future__ import annotations

from typing import Any

from features.catalog import COMPONENT_BY_CODE, COMPONENTS
from features.schema import Column, columns_for
from recommender.api_schema import DEFAULT_TOP_K, RecommendRequest
from recommender.explain import feature_label
from recommender.recommend import MAX_TOP_K

# Form sections in page order: schema group -> (section id, title). The schema's
# "identity" and "demographics" groups are three short fields, shown as one section.
SECTIONS: dict[str, tuple[str, str]] = {
    "identity": ("patient", "Patient"),
    "demographics": ("patient", "Patient"),
    "pain": ("pain", "Pain"),
    "mood": ("mood", "Mood"),
    "lifestyle": ("lifestyle", "Lifestyle and labs"),
    "risk": ("risk", "Risk flags"),
    "prior": ("prior", "Prior responses"),
}

# What a form control is for a column, decided once here rather than in the browser:
# a risk flag (absent = false) is a checkbox, a bool that may be unknown a three-way select.
_CONTROL = {"int": "number", "float": "number", "string": "text", "category": "select"}


def _label(col: Column) -> str:
    if col.group == "prior":
        return "Prior response: " + COMPONENT_BY_CODE[col.name.removeprefix("prior_")].name
    text = feature_label(col.name).removesuffix(" (missing = unknown)")
    # Capitalise "age" but leave "eGFR" alone.
    return text[0].upper() + text[1:] if text[1:2].islower() else text


def _form_label(col: Column) -> str:
    # Inside the "Prior responses" fieldset (whose legend screen readers announce with each
    # control) the component's name is enough; charts and tables use the full label.
    if col.group == "prior":
        name = COMPONENT_BY_CODE[col.name.removeprefix("prior_")].name
        return name[0].upper() + name[1:]
    return _label(col)


def _hint(col: Column) -> str | None:
    """The range a number must be in, as the help text states it ("18–110 years"); a
    select or checkbox already shows its choices."""
    if col.dtype not in ("int", "float"):
        return None
    if col.unit and f"{col.min:g}–{col.max:g}" in col.unit:
        return col.unit  # "NRS 0–10" already says it
    return col.range_text()


def _control(col: Column) -> str:
    if col.dtype == "bool":
        return "checkbox" if col.default is False else "tristate"
    return _CONTROL[col.dtype]


def field_description(col: Column) -> dict[str, Any]:
    """One column as the form needs it (request semantics: ``patient_id`` optional)."""
    return {
        "name": col.name,
        "label": _label(col),
        "form_label": _form_label(col),
        "type": col.dtype,
        "control": _control(col),
        "unit": col.unit,
        "min": col.min,
        "max": col.max,
        "step": 1 if col.dtype == "int" else "any",
        "levels": list(col.levels) if col.levels else None,
        "default": col.default,
        "required": col.required,
        "max_length": col.max_length,
        "description": col.description,
        "range": col.range_text(),
        "hint": _hint(col),
        "group": col.group,
    }


def form_description() -> dict[str, Any]:
    """``GET /ui/fields.json``: sections of fields, top-k limits, catalog, API options."""
    sections = {
        section_id: {"id": section_id, "title": title, "fields": []}
        for section_id, title in SECTIONS.values()
    }
    for col in columns_for("request"):
        sections[SECTIONS[col.group][0]]["fields"].append(field_description(col))
    return {
        "sections": list(sections.values()),
        "top_k": {"default": DEFAULT_TOP_K, "min": 1, "max": MAX_TOP_K},
        "components": [{"code": c.code, "kind": c.kind, "name": c.name} for c in COMPONENTS],
        # The FHIR input is offered only once POST /recommend accepts it.
        "accepts_fhir_bundle": "fhir_bundle" in RecommendRequest.model_fields,
    }
