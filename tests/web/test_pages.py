"""The clinician and auditor pages in a real browser (Chromium via Playwright) against a
real ``bentoml serve`` (fixtures in conftest.py). Screenshots of each page go to
tests/artifacts/screenshots/ (git-ignored) for a human to look at."""

from __future__ import annotations

import json
import re

import pytest
from playwright.sync_api import expect

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# eGFR 20 and a GI bleed (NSAID floor), prior opioid intolerance and opioid use disorder
# (opioid floor): the answer must exclude both and say why.
PATIENT = {
    "patient_id": "MRN-web-0001",
    "age": 58,
    "sex": "female",
    "pain_condition": "osteoarthritis",
    "pain_duration_months": 30,
    "pain_intensity": 6.5,
    "peg": 6.2,
    "phq9": 12,
    "gad7": 8,
    "bmi": 29.5,
    "egfr": 20,
    "smoker": False,
    "gi_bleed_history": True,
    "opioid_use_disorder": True,
    "prior_opioid": "intolerant",
    "prior_nsaid": "partial",
}
NUMBER = re.compile(r"[−-]?\d+(?:\.\d+)?")


def sign_in(page, key: str) -> None:
    page.fill("#api-key", key)
    page.press("#api-key", "Enter")
    page.wait_for_selector("#signed-in:not([hidden])")


def fill_patient(page, profile: dict) -> None:
    """Fill the generated form through its controls, whatever kind each one is."""
    for name, value in profile.items():
        control = page.locator(f"#f-{name}")
        kind = control.evaluate("el => el.type")
        if kind == "checkbox":
            control.set_checked(bool(value))
        elif kind.startswith("select"):
            control.select_option(json.dumps(value) if isinstance(value, bool) else str(value))
        else:
            control.fill(str(value))


def recommend(page, top_k: int = 4) -> dict:
    """Submit the form; return the API's answer as the page received it."""
    page.fill("#top_k", str(top_k))
    with page.expect_response(lambda r: r.url.endswith("/recommend")) as response:
        page.click("#recommend-button")
    page.wait_for_selector("#results:not([hidden])")
    return response.value.json()


def as_number(text: str) -> float:
    return float(NUMBER.search(text).group().replace("−", "-"))


def assert_every_control_labelled(page) -> None:
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll('input, select, textarea')]
              .filter(el => el.type !== 'hidden' && el.labels.length === 0)
              .map(el => el.id || el.name)"""
    )
    assert unlabelled == []


def contributions_table(figure) -> list[float]:
    """The SHAP column of a figure's table: start, contributions…, end."""
    return [as_number(t) for t in figure.locator("table.contributions td.num").all_text_contents()]


def test_clinician_ranks_explains_and_compares(open_page, ui_server, screenshot):
    page = open_page("/ui/clinician")
    # The form is generated from the schema: one control per contract column, in sections.
    legends = page.locator("#form-fields legend").all_inner_texts()
    assert legends == [
        "Patient",
        "Pain",
        "Mood",
        "Lifestyle and labs",
        "Risk flags",
        "Prior responses",
    ]
    assert page.locator("#f-age").get_attribute("max") == "110"
    assert "18–110 years" in page.inner_text("[data-field=age]")
    assert_every_control_labelled(page)
    sign_in(page, ui_server.clinician_key)
    fill_patient(page, PATIENT)
    screenshot(page, "clinician-form", full_page=True)

    answer = recommend(page, top_k=4)
    rows = page.locator("table.plans tbody tr")
    assert rows.count() == len(answer["plans"]) == 4
    assert [rows.nth(i).get_attribute("data-plan") for i in range(4)] == [
        p["plan"] for p in answer["plans"]
    ]
    shown = {c for p in answer["plans"] for c in p["plan"].split("+")}
    assert not {"nsaid", "opioid"} & shown
    first = rows.first
    assert first.locator("svg.improvement[role=img]").count() == 1
    assert first.locator("svg.risk[role=img]").count() == 1
    ei = answer["plans"][0]["expected_improvement"]
    assert f"{ei:.2f}".replace("-", "−") in first.inner_text()
    excluded = page.locator("#excluded")
    for code in ("nsaid", "opioid"):
        item = excluded.locator(f"li[data-excluded={code}]")
        assert item.count() == 1
        assert "safety floor" in item.inner_text()
    assert "eGFR below 30" in excluded.inner_text()
    assert page.evaluate("document.activeElement.id") == "results-heading"
    screenshot(page, "clinician-results")

    # A plan's explanation: base value + contributions = plan effect, drawn as a waterfall.
    second = answer["plans"][1]
    rows.nth(1).get_by_role("button", name="Explain").click()
    figure = page.locator("#explanation figure.explanation")
    chart = figure.locator("svg.waterfall")
    assert chart.get_attribute("role") == "img"
    assert chart.locator("g.row").count() == len(second["explanation"]["contributions"]) + 2
    values = contributions_table(figure)
    assert values[0] == pytest.approx(second["explanation"]["base_value"], abs=1e-3)
    assert values[-1] == pytest.approx(second["explanation"]["plan_effect"], abs=1e-3)
    assert sum(values[1:-1]) + values[0] == pytest.approx(values[-1], abs=1e-3)
    screenshot(page.locator("#explanation"), "clinician-explanation")

    # Two plans side by side; the contrast contributions sum to the utility gap.
    a, c = answer["plans"][0]["plan"], answer["plans"][2]["plan"]
    page.select_option("#plan_a", a)
    page.select_option("#plan_b", c)
    with page.expect_response(lambda r: r.url.endswith("/explain")) as response:
        page.click("#compare-button")
    contrast = response.value.json()
    result = page.locator("#compare-result")
    result.locator("svg.waterfall").wait_for()
    cards = result.locator("article.plan-card")
    assert [cards.nth(i).get_attribute("data-plan") for i in range(2)] == [a, c]
    values = contributions_table(result.locator("figure"))
    assert values[0] == pytest.approx(contrast["average_patient_gap"], abs=1e-3)
    assert values[0] + sum(values[1:-1]) == pytest.approx(contrast["utility_gap"], abs=1e-3)
    gap = contrast["plans"][0]["utility"] - contrast["plans"][1]["utility"]
    assert contrast["utility_gap"] == pytest.approx(gap, abs=1e-3)
    screenshot(page.locator("#compare"), "clinician-compare")


def test_an_invalid_value_is_shown_next_to_its_field(open_page, ui_server, screenshot):
    page = open_page("/ui/clinician")
    sign_in(page, ui_server.clinician_key)
    fill_patient(page, {**PATIENT, "age": 150})
    with page.expect_response(lambda r: r.url.endswith("/recommend")) as response:
        page.click("#recommend-button")
    assert response.value.status == 400
    error = page.locator("[data-field=age] .field-error")
    error.wait_for()
    assert "18–110" in error.inner_text() and "150" in error.inner_text()
    assert page.get_attribute("#f-age", "aria-invalid") == "true"
    assert "err-age" in page.get_attribute("#f-age", "aria-describedby")
    # Only the offending field is marked; the summary links to it.
    assert page.locator(".field-error:not([hidden])").count() == 1
    assert page.locator("#results").is_hidden()
    page.locator("#form-errors a", has_text="Age").click()
    assert page.evaluate("document.activeElement.id") == "f-age"
    screenshot(page, "clinician-field-error")


def test_keyboard_only_sign_in_and_submit(open_page, ui_server):
    page = open_page("/ui/clinician")
    page.keyboard.press("Tab")  # the skip link comes first
    assert page.evaluate("document.activeElement.className") == "skip-link"
    page.focus("#api-key")
    page.keyboard.type(ui_server.clinician_key)
    page.keyboard.press("Enter")
    page.wait_for_selector("#signed-in:not([hidden])")
    fill_patient(page, PATIENT)
    # From the last generated control, Tab reaches "plans to show" and then the button.
    page.focus("#f-prior_opioid")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "top_k"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "recommend-button"
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline not in ("none", "")  # focus is visible
    page.keyboard.press("Enter")
    page.wait_for_selector("#results:not([hidden])")
    assert page.evaluate("document.activeElement.id") == "results-heading"
    # The plan actions are real buttons, reachable with Tab, opened with Enter.
    page.focus("table.plans tbody tr:first-child button")
    page.keyboard.press("Enter")
    page.wait_for_selector("#explanation:not([hidden]) svg.waterfall")
    assert page.evaluate("document.activeElement.id") == "explanation-heading"


def test_auditor_finds_the_record_just_created(open_page, ui_server, screenshot):
    clinician = open_page("/ui/clinician")
    sign_in(clinician, ui_server.clinician_key)
    fill_patient(clinician, PATIENT)
    answer = recommend(clinician, top_k=3)
    request_id = answer["request_id"]

    page = open_page("/ui/auditor")
    assert page.locator("#signin-needed").is_visible()
    sign_in(page, ui_server.auditor_key)
    # Signing in lists today's records (UTC); the new one is among them.
    row = page.locator(f"table.records tr[data-request-id='{request_id}']")
    row.wait_for()
    assert "recommendation" in row.inner_text()
    screenshot(page, "auditor-search")
    page.fill("#model_version", "999")  # no such version: nothing matches
    page.press("#model_version", "Enter")
    # Locator assertions poll without evaluating strings, which the pages' CSP forbids.
    expect(page.locator("#results-heading")).to_have_text("Records (0)")
    page.fill("#model_version", "7")
    page.press("#model_version", "Enter")
    row.wait_for()

    page.fill("#request_id", request_id)
    page.press("#request_id", "Enter")
    record = page.locator("#record")
    expect(page.locator("#record-heading")).to_contain_text(request_id)
    assert page.evaluate("document.activeElement.id") == "record-heading"
    text = record.inner_text()
    assert PATIENT["patient_id"] not in page.content()  # pseudonymised: never the raw id
    assert re.search(r"Age\s+58", text) and re.search(r"eGFR\s+20", text)
    assert [r.get_attribute("data-plan") for r in record.locator("table.plans tbody tr").all()] == [
        p["plan"] for p in answer["plans"]
    ]
    assert record.locator("li[data-excluded=nsaid]").count() == 1
    assert record.locator("svg.waterfall").count() == 1
    assert ui_server.tag in text and ui_server.run_id in text
    assert "sha256:web-test-cohort" in text  # lineage from GET /model
    record.locator("details.model-card summary").click()
    assert "browser-test model" in record.locator("details.model-card pre").inner_text()
    assert_every_control_labelled(page)
    screenshot(page, "auditor-record", full_page=True)

    page.fill("#request_id", "no-such-request")
    page.press("#request_id", "Enter")
    page.locator("#err-request_id").wait_for()
    assert "No audit record" in page.inner_text("#err-request_id")


def test_a_clinician_key_is_refused_the_auditor_page(open_page, ui_server, screenshot):
    page = open_page("/ui/auditor")
    sign_in(page, ui_server.clinician_key)
    refusal = page.locator("#refusal")
    refusal.wait_for()
    assert "auditors only" in refusal.inner_text() and "403" in refusal.inner_text()
    assert page.locator("#audit-area").is_hidden()
    assert page.locator("table.records").count() == 0
    screenshot(page, "auditor-refused")


def test_pages_fit_a_narrow_screen(open_page, ui_server, screenshot):
    def overflow(page) -> int:
        return page.evaluate("document.documentElement.scrollWidth - window.innerWidth")

    page = open_page("/ui/clinician", width=390, height=844)
    assert overflow(page) <= 0
    screenshot(page, "clinician-narrow")
    sign_in(page, ui_server.clinician_key)
    fill_patient(page, PATIENT)
    recommend(page, top_k=3)
    page.locator("table.plans tbody tr").first.get_by_role("button", name="Explain").click()
    page.locator("#explanation svg.waterfall").wait_for()
    assert overflow(page) <= 0  # tables turn into cards; the chart scrolls in its own box
    # Column headers are repeated inside each card on a narrow screen.
    label = page.evaluate(
        """() => getComputedStyle(document.querySelector('table.plans td[data-label="Plan"]'),
                                  '::before').content"""
    )
    assert label == '"Plan"'
    screenshot(page.locator("#results"), "clinician-narrow-results")

    auditor = open_page("/ui/auditor", width=390, height=844)
    sign_in(auditor, ui_server.auditor_key)
    auditor.locator("table.records").wait_for()
    assert overflow(auditor) <= 0
    screenshot(auditor, "auditor-narrow", full_page=True)
