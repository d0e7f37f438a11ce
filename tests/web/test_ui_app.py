"""The /ui app without a browser or BentoML: the form description is the schema, the pages
are served with their security headers, and nothing in them points at another origin."""

from __future__ import annotations

import re
import warnings
from html.parser import HTMLParser

import pytest

from features.schema import columns_for
from recommender.web.app import CSP, STATIC_DIR, ui_app
from recommender.web.fields import SECTIONS, form_description


@pytest.fixture(scope="module")
def client():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Starlette's TestClient announces its httpx move
        from starlette.testclient import TestClient
    with TestClient(ui_app) as client:
        yield client


def test_the_form_description_is_the_request_schema(client):
    served = client.get("/fields.json").json()
    assert served == form_description()
    fields = {f["name"]: f for s in served["sections"] for f in s["fields"]}
    columns = columns_for("request")
    order = list(dict.fromkeys(section for section, _ in SECTIONS.values()))
    assert [s["id"] for s in served["sections"]] == order
    assert list(fields) == [
        c.name for section in order for c in columns if SECTIONS[c.group][0] == section
    ]
    for col in columns:
        f = fields[col.name]
        assert (f["type"], f["required"], f["min"], f["max"], f["unit"]) == (
            col.dtype,
            col.required,
            col.min,
            col.max,
            col.unit,
        )
        assert f["levels"] == (list(col.levels) if col.levels else None)
        assert f["description"] == col.description
        assert SECTIONS[col.group][0] in {s["id"] for s in served["sections"]}
    assert fields["patient_id"]["required"] is False  # optional in a request
    assert fields["gi_bleed_history"]["control"] == "checkbox"  # absent = false
    assert fields["smoker"]["control"] == "tristate"  # absent = unknown
    assert served["top_k"] == {"default": 5, "min": 1, "max": 50}


@pytest.mark.parametrize("path", ["/", "/clinician", "/auditor"])
def test_pages_are_served_with_a_same_origin_policy(client, path):
    page = client.get(path)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CSP
    assert "default-src 'self'" in CSP and "script-src 'self'" in CSP
    assert page.headers["x-content-type-options"] == "nosniff"


def test_static_files_are_served(client):
    for name in ("style.css", "common.js", "clinician.js", "auditor.js", "charts.js"):
        assert client.get(f"/static/{name}").status_code == 200
    assert client.get("/static/missing.js").status_code == 404


def test_nothing_points_at_another_origin():
    """No CDN, font or script from elsewhere: the only absolute URL is the SVG namespace."""
    for path in sorted(STATIC_DIR.iterdir()):
        text = path.read_text(encoding="utf-8")
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.\w+[^\s\"'`)]*", text))
        assert urls <= {"http://www.w3.org/2000/svg"}, (path.name, urls)
        # Values from requests are shown as text, never parsed as markup.
        assert not re.search(r"\.(inner|outer)HTML\b|insertAdjacentHTML|document\.write", text)


class _Controls(HTMLParser):
    def __init__(self):
        super().__init__()
        self.controls: list[str] = []
        self.labelled: set[str] = set()
        self._label_depth = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "label":
            self._label_depth += 1
            if attrs.get("for"):
                self.labelled.add(attrs["for"])
        elif tag in ("input", "select", "textarea"):
            name = attrs.get("id") or attrs.get("name")
            self.controls.append(name)
            if self._label_depth:
                self.labelled.add(name)

    def handle_endtag(self, tag):
        if tag == "label":
            self._label_depth -= 1


@pytest.mark.parametrize("page", ["clinician.html", "auditor.html"])
def test_every_control_in_the_page_markup_has_a_label(page):
    """(The generated patient form is checked in the browser: tests/web/test_pages.py.)"""
    parser = _Controls()
    parser.feed((STATIC_DIR / page).read_text(encoding="utf-8"))
    assert parser.controls
    assert set(parser.controls) <= parser.labelled
