"""FHIR R4 → CONTRACT §2 profile (features/fhir.py, features/fhir_codes.yaml).

Real data: every Synthea R4 bundle in shared/data and the AHRQ test patient must map to a
profile that validates, or to a clear not-applicable / incomplete answer. Small hand-built
bundles pin each mapping rule.
"""

from __future__ import annotations

import json
import logging
from datetime import date
from pathlib import Path

import pandas as pd
import pytest
import yaml

from features import fhir_codes
from features.errors import ConfigError, ContractError
from features.fhir import (
    REQUIRED_FIELDS,
    bundle_to_profile,
    latest_record_date,
    resources_to_profile,
)
from features.fhir_codes import check_code_table, load_code_table
from features.schema import PRIOR_COLUMNS, RISK_FLAGS
from features.validate import validate

# ../shared sits beside the repository (CONTRACT, data), on developers' machines and in CI.
DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
SYNTHEA = sorted((DATA / "synthea").glob("*/*.json"))
AHRQ = DATA / "cds-test-patients/ahrq-pain-management-summary/brenda_jackson.r4.json"
BUNDLES = [*SYNTHEA, AHRQ]
needs_data = pytest.mark.skipif(not AHRQ.exists(), reason="shared/data is not mounted")

LOINC = "http://loinc.org"
SCT = "http://snomed.info/sct"
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
AS_OF = "2024-06-01"


# --------------------------------------------------------------------------- builders


def patient(pid="p1", birth="1970-05-01", gender="female", **extra):
    return {"resourceType": "Patient", "id": pid, "birthDate": birth, "gender": gender, **extra}


_counter = iter(range(1, 10_000))


def obs(code, value, when, *, pid="p1", system=LOINC, **extra):
    r = {
        "resourceType": "Observation",
        "id": f"o{next(_counter)}",
        "status": "final",
        "code": {"coding": [{"system": system, "code": code}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": when,
        **extra,
    }
    if value is not None and "valueCodeableConcept" not in extra and "component" not in extra:
        r["valueQuantity"] = {"value": value}
    return r


def cond(code, onset="2015-01-01", *, system=SCT, display=None, pid="p1", status="active", **extra):
    coding = {"system": system, "code": code}
    if display:
        coding["display"] = display
    return {
        "resourceType": "Condition",
        "id": f"c{next(_counter)}",
        "clinicalStatus": {"coding": [{"code": status}]},
        "code": {"coding": [coding], "text": display},
        "subject": {"reference": f"Patient/{pid}"},
        "onsetDateTime": onset,
        **extra,
    }


def med(
    display,
    *,
    status="active",
    authored="2024-05-01",
    code=None,
    pid="p1",
    kind="MedicationRequest",
    **extra,
):
    coding = {"system": RXNORM, "display": display}
    if code:
        coding["code"] = code
    r = {
        "resourceType": kind,
        "id": f"m{next(_counter)}",
        "status": status,
        "medicationCodeableConcept": {"coding": [coding], "text": display},
        "subject": {"reference": f"Patient/{pid}"},
        **extra,
    }
    if kind == "MedicationRequest":
        r["intent"] = "order"
        r["authoredOn"] = authored
    else:
        r["effectiveDateTime"] = authored
    return r


def bundle(*resources, pat=None):
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": r} for r in (pat or patient(), *resources)],
    }


def complete(*extra):
    """A rankable chronic-low-back-pain record plus ``extra`` resources."""
    return bundle(
        cond("278860009", "2020-01-01", display="Chronic low back pain"),
        obs("72514-3", 6, "2024-05-20"),
        obs("44261-6", 9, "2024-05-20"),
        obs("70274-6", 4, "2024-05-20"),
        *extra,
    )


def profile_of(b, **kw):
    kw.setdefault("as_of", AS_OF)
    return bundle_to_profile(b, **kw)


# --------------------------------------------------------------------------- code table


def test_code_table_loads_versioned_and_keeps_unverified_rows_out():
    table = load_code_table()
    assert table.version == "2026.11-1"
    unverified = {(r["section"], r.get("code") or r.get("prefix")) for r in table.unverified}
    # rows interop.md marks "(verify)" are listed but never used
    for section, code in [
        ("medication_codes", "72625"),
        ("observations", "44260-8"),
        ("conditions", "13746004"),
        ("conditions", "433146000"),
    ]:
        assert (section, code) in unverified
    assert (table.systems["rxnorm"], "72625") not in table.medication_codes
    assert (table.systems["loinc"], "44260-8") not in table.observations
    assert (table.systems["snomed"], "13746004") not in table.conditions
    # verified rows are used
    assert table.observations[(LOINC, "72514-3")].measure == "pain_intensity"
    assert table.medication_codes[(RXNORM, "905505")] == "chlordiazepoxide"


def test_code_table_rows_are_all_checked(tmp_path):
    raw = yaml.safe_load(Path(fhir_codes.__file__).with_name("fhir_codes.yaml").read_text())
    assert check_code_table(raw) == []
    raw["observations"].append(
        {"system": "loinc", "code": "1-1", "maps_to": "nonsense", "tier": 3, "status": "verified"}
    )
    raw["conditions"].append(
        {"system": "snomed", "code": "1", "maps_to": {"flag": "not_a_flag"}, "status": "unverified"}
    )
    raw["ingredients"]["mystery"] = ["antacid"]
    problems = check_code_table(raw)
    text = " ".join(problems)
    assert "not a known measure" in text and "tier must be 1 or 2" in text
    assert "needs a 'source'" in text and "needs a 'reason'" in text
    assert "not_a_flag" in text and "mystery" in text
    bad = tmp_path / "codes.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="problem"):
        load_code_table(bad)


# --------------------------------------------------------------------------- real data


@needs_data
@pytest.mark.parametrize("path", BUNDLES, ids=lambda p: p.name[:24])
def test_every_shared_bundle_maps_to_a_valid_profile_or_a_clear_answer(path):
    raw = json.loads(path.read_text())
    as_of = latest_record_date(raw)
    assert as_of is not None
    for assume in (False, True):
        fp = bundle_to_profile(raw, as_of=as_of, assume_missing_scores=assume)
        assert fp.code_table_version and fp.as_of == as_of
        if fp.ready:
            checked = validate(pd.DataFrame([fp.profile]), "request")
            assert checked.warnings == []  # no extra or unknown columns
            assert set(fp.profile) <= set(checked.frame.columns)
            for name in fp.profile:
                assert name in fp.sources, f"{name} has no source"
        elif not fp.applicable:
            assert fp.not_applicable_reason
            with pytest.raises(ContractError, match="cannot be ranked"):
                fp.require_ready()
        else:
            assert fp.incomplete and set(fp.incomplete) <= set(REQUIRED_FIELDS)
            listed = {m["field"]: m for m in fp.missing}
            for name in fp.incomplete:
                assert listed[name]["required"] and listed[name]["impact"]
            with pytest.raises(ContractError) as err:
                fp.require_ready()
            assert {v["column"] for v in err.value.violations} == set(fp.incomplete)
        if assume and fp.applicable:
            assert fp.ready, f"provisional mode should complete the profile: {fp.incomplete}"


@needs_data
def test_ahrq_patient_despite_its_invalid_bundle_id():
    from fhir.resources.R4B import get_fhir_model_class
    from pydantic import ValidationError

    raw = json.loads(AHRQ.read_text())
    with pytest.raises(ValidationError):  # strict parsing fails on the 'brenda_jackson' id
        get_fhir_model_class("Bundle").model_validate(raw)
    fp = bundle_to_profile(raw, as_of=latest_record_date(raw))
    p = fp.profile
    # hand-built chronic pain patient: fibromyalgia + low back pain, PEG 5, PHQ-9 8, no GAD-7
    assert p["pain_condition"] == "fibromyalgia" and p["peg"] == 5.0 and p["phq9"] == 8
    assert p["pain_intensity"] == 7.0  # the PEG pain item beats the later Wong-Baker 10
    assert p["benzodiazepine"] is True and "opioid" in fp.current_classes
    assert fp.incomplete == ["gad7"]
    assert any("low_back" in n for n in fp.notes)


@needs_data
def test_synthea_records_without_phq9_are_incomplete_unless_provisional():
    for path in SYNTHEA:
        raw = json.loads(path.read_text())
        fp = bundle_to_profile(raw, as_of=latest_record_date(raw))
        if fp.applicable:
            assert {"phq9", "gad7"} <= set(fp.incomplete)
            prov = bundle_to_profile(raw, as_of=latest_record_date(raw), assume_missing_scores=True)
            assert prov.assumed.keys() == {"phq9", "gad7"}
            assert {m["field"] for m in prov.missing if m["status"] == "assumed"} == {
                "phq9",
                "gad7",
            }


def test_no_patient_data_in_logs(caplog):
    b = complete(obs("39156-5", 31.5, "2024-05-20"))
    b["entry"][0]["resource"]["name"] = [{"family": "Zyxwvut", "given": ["Qwerty"]}]
    with caplog.at_level(logging.DEBUG, logger="features"):
        profile_of(b)
    text = caplog.text
    assert "Zyxwvut" not in text and "1970-05-01" not in text and "31.5" not in text


# --------------------------------------------------------------------------- demographics & applicability


def test_age_at_as_of_and_sex():
    fp = profile_of(complete(), as_of="2024-04-30")
    assert fp.profile["age"] == 53 and fp.profile["sex"] == "female"
    assert profile_of(complete(), as_of="2024-05-01").profile["age"] == 54


def test_missing_gender_is_unknown_with_a_warning():
    b = complete()
    del b["entry"][0]["resource"]["gender"]
    fp = profile_of(b)
    assert fp.profile["sex"] == "unknown" and any("gender" in w for w in fp.warnings)


@pytest.mark.parametrize(
    ("pat", "resources", "reason"),
    [
        (patient(birth="2010-01-01"), [cond("82423001")], "under 18"),
        (patient(deceasedDateTime="2024-01-01T00:00:00Z"), [cond("82423001")], "deceased"),
        (
            patient(),
            [
                cond("370143000", display="Major depression disorder"),
                obs("72514-3", 5, "2024-05-01"),
            ],
            "no active chronic-pain",
        ),
    ],
)
def test_not_applicable(pat, resources, reason):
    fp = profile_of(bundle(*resources, pat=pat))
    assert not fp.applicable and reason in fp.not_applicable_reason and not fp.ready


def test_bundle_shape_errors():
    with pytest.raises(ContractError, match="Bundle"):
        bundle_to_profile({"resourceType": "Patient"})
    with pytest.raises(ContractError, match="exactly one Patient"):
        bundle_to_profile(bundle(patient("p2")), as_of=AS_OF)
    with pytest.raises(ContractError, match="as_of"):
        bundle_to_profile(complete(), as_of="next tuesday")
    with pytest.raises(ContractError, match="lookback_days"):
        bundle_to_profile(complete(), lookback_days=0)


# --------------------------------------------------------------------------- conditions


def test_pain_condition_priority_duration_and_neuropathic_component():
    b = bundle(
        cond("82423001", "2001-06-01", display="Chronic pain"),
        cond("124171000119105", "2010-01-01"),
        cond("368581000119106", "2012-01-01"),
        obs("72514-3", 4, "2024-05-01"),
    )
    fp = profile_of(b)
    assert fp.profile["pain_condition"] == "neuropathic"
    assert fp.profile["neuropathic_component"] is True
    # earliest chronic-pain onset (2001-06-01) to 2024-06-01: 23 years
    assert fp.profile["pain_duration_months"] == pytest.approx(276, abs=0.5)
    assert any("headache" in n for n in fp.notes)


def test_icd10_prefixes_and_text_fallback():
    b = bundle(cond("M17.11", system=ICD10), obs("72514-3", 4, "2024-05-01"))
    assert profile_of(b).profile["pain_condition"] == "osteoarthritis"
    b = bundle(
        cond("999", display="Chronic neck pain (finding)"),
        cond("998", display="Chronic congestive heart failure (disorder)"),
        obs("72514-3", 4, "2024-05-01"),
    )
    fp = profile_of(b)
    assert fp.profile["pain_condition"] == "neck" and fp.profile["heart_failure"] is True
    assert "display text" in fp.sources["heart_failure"]
    b = bundle(cond("997", display="Acute low back pain"), obs("72514-3", 4, "2024-05-01"))
    assert not profile_of(b).applicable  # acute pain is not chronic pain
    b = complete(cond("996", display="Family history of heart failure"))
    assert "heart_failure" not in profile_of(b).profile


def test_condition_status_is_read_as_of_the_evaluation_date():
    refuted = cond("5602001", verificationStatus={"coding": [{"code": "refuted"}]})
    assert "opioid_use_disorder" not in profile_of(complete(refuted)).profile
    resolved_later = cond(
        "5602001", "2010-01-01", status="resolved", abatementDateTime="2025-01-01"
    )
    assert profile_of(complete(resolved_later)).profile["opioid_use_disorder"] is True
    resolved_before = cond(
        "5602001", "2010-01-01", status="resolved", abatementDateTime="2020-01-01"
    )
    assert "opioid_use_disorder" not in profile_of(complete(resolved_before)).profile
    future = cond("5602001", "2025-01-01")
    assert "opioid_use_disorder" not in profile_of(complete(future)).profile


def test_pregnancy_counts_only_when_recent():
    recent = cond("1", "2024-02-01", display="Normal pregnancy")
    stale = cond("2", "2013-02-01", display="Normal pregnancy")
    assert profile_of(complete(recent)).profile["pregnant"] is True
    assert "pregnant" not in profile_of(complete(stale)).profile


def test_ckd_stage_without_egfr_warns_and_never_invents_a_value():
    fp = profile_of(
        complete(cond("431857002", display="Chronic kidney disease stage 4 (disorder)"))
    )
    assert "egfr" not in fp.profile
    assert any("CKD stage 4" in w and "eGFR" in w for w in fp.warnings)


# --------------------------------------------------------------------------- observations


def test_most_recent_reading_in_the_window_wins_and_stale_is_reported():
    b = bundle(
        cond("278860009", "2020-01-01"),
        obs("72514-3", 3, "2024-01-01"),
        obs("72514-3", 7, "2024-05-01"),
        obs("72514-3", 9, "2024-07-01"),  # after as_of: ignored
        obs("44261-6", 12, "2022-01-01"),  # stale
        obs("70274-6", 6, "2024-05-01"),
    )
    fp = profile_of(b)
    assert fp.profile["pain_intensity"] == 7
    assert "phq9" in fp.incomplete
    phq = next(m for m in fp.missing if m["field"] == "phq9")
    assert phq["status"] == "stale" and phq["last_seen"] == "2022-01-01"
    assert profile_of(b, lookback_days=1000).profile["phq9"] == 12


def test_nrs_beats_a_more_recent_wong_baker_which_is_only_a_fallback():
    b = complete(obs("38221-8", 10, "2024-05-30"))
    assert profile_of(b).profile["pain_intensity"] == 6
    b = bundle(cond("278860009"), obs("38221-8", 8, "2024-05-30"))
    fp = profile_of(b)
    assert fp.profile["pain_intensity"] == 8 and any("Wong-Baker" in w for w in fp.warnings)


def test_peg_from_components_and_nrs_stand_in():
    comps = [
        {"code": {"coding": [{"system": LOINC, "code": c}]}, "valueQuantity": {"value": v}}
        for c, v in (("75893-8", 6), ("91145-3", 3), ("91146-1", 3))
    ]
    b = complete(obs("91147-9", None, "2024-05-25", component=comps))
    fp = profile_of(b)
    assert fp.profile["peg"] == 4.0
    assert fp.profile["pain_intensity"] == 6  # the PEG pain item (most recent tier-1 reading)
    fp = profile_of(complete())
    assert fp.profile["peg"] == 6 and "approximated" in fp.sources["peg"]
    assert next(m for m in fp.missing if m["field"] == "peg")["status"] == "approximated"


def test_optional_measures_smoking_activity_and_range_check():
    smoke = obs(
        "72166-2",
        None,
        "2024-05-01",
        valueCodeableConcept={
            "coding": [{"system": SCT, "code": "0", "display": "Current every day smoker"}]
        },
    )
    never = obs(
        "72166-2",
        None,
        "2024-04-01",
        valueCodeableConcept={
            "coding": [{"system": SCT, "code": "266919005", "display": "Never smoker"}]
        },
    )
    b = complete(
        smoke,
        never,
        obs("89555-7", 3, "2024-05-01"),
        obs("68516-4", 40, "2024-05-01"),
        obs("39156-5", 95, "2024-05-01"),
        obs("33914-3", 55, "2024-05-01"),
    )
    fp = profile_of(b)
    assert fp.profile["smoker"] is True and fp.profile["activity_min_week"] == 120
    assert fp.profile["egfr"] == 55
    assert "bmi" not in fp.profile and any("bmi 95" in w for w in fp.warnings)
    validate(pd.DataFrame([fp.profile]), "request")


def test_creatinine_is_reported_never_converted():
    fp = profile_of(complete(obs("38483-4", 2.3, "2024-05-01")))
    assert "egfr" not in fp.profile
    assert "creatinine" in next(m for m in fp.missing if m["field"] == "egfr")["impact"]


# --------------------------------------------------------------------------- medications and priors


def test_current_medications_set_risk_flags_and_current_classes():
    b = complete(
        med("Alprazolam 0.5 MG Oral Tablet"),
        med("Warfarin Sodium 5 MG Oral Tablet", code="855332"),
        med("Sertraline 50 MG Oral Tablet", kind="MedicationStatement"),
        med("Phenelzine 15 MG Oral Tablet", status="on-hold"),
        med("Tramadol Hydrochloride 50 MG Oral Tablet"),
        med("Ibuprofen 200 MG Oral Tablet", status="completed", authored="2024-04-15"),
    )
    p = profile_of(b).profile
    for flag in ("benzodiazepine", "anticoagulant", "serotonergic_drug", "maoi"):
        assert p[flag] is True, flag
    fp = profile_of(b)
    assert fp.current_classes == ["nsaid", "opioid"]


def test_past_medications_are_tried_not_evidence_of_response():
    b = complete(
        med("Naproxen sodium 220 MG Oral Tablet", status="stopped", authored="2019-01-01"),
        med("Alprazolam 0.5 MG Oral Tablet", status="stopped", authored="2019-01-01"),
        med("Diazepam 5 MG", status="entered-in-error"),
        med("Lorazepam 1 MG", doNotPerform=True),
        med("Clonazepam 1 MG", authored="2025-01-01"),  # written after as_of
    )
    fp = profile_of(b)
    assert not set(RISK_FLAGS) & set(fp.profile)
    assert not set(PRIOR_COLUMNS) & set(fp.profile)  # prior_nsaid stays 'none'
    assert fp.tried["nsaid"][0]["ingredients"] == ["naproxen"]
    assert any("prior_nsaid stays 'none'" in n for n in fp.notes)


def test_status_reason_and_allergies_give_documented_priors():
    stopped_ae = med(
        "Duloxetine 30 MG",
        status="stopped",
        authored="2023-01-01",
        statusReason={"text": "Stopped: intolerable nausea (adverse effect)"},
    )
    stopped_fail = med(
        "Pregabalin 75 MG",
        status="stopped",
        authored="2023-01-01",
        statusReason={"text": "ineffective"},
    )
    allergy = {
        "resourceType": "AllergyIntolerance",
        "id": "a1",
        "clinicalStatus": {"coding": [{"code": "active"}]},
        "code": {"text": "Aspirin"},
        "patient": {"reference": "Patient/p1"},
    }
    codeine = {**allergy, "id": "a2", "code": {"coding": [{"system": RXNORM, "code": "2670"}]}}
    refuted = {
        **allergy,
        "id": "a3",
        "code": {"text": "Cyclobenzaprine"},
        "verificationStatus": {"coding": [{"code": "refuted"}]},
    }
    p = profile_of(complete(stopped_ae, stopped_fail, allergy, codeine, refuted)).profile
    assert p["prior_snri"] == "intolerant"
    assert p["prior_gabapentinoid"] == "no_response"
    assert p["prior_nsaid"] == "intolerant"  # aspirin hypersensitivity, evidence NSAID-8
    assert p["prior_opioid"] == "intolerant"
    assert "prior_muscle_relaxant" not in p
    validate(pd.DataFrame([p]), "request")


def test_medication_references_are_resolved_contained_and_in_bundle():
    contained = {
        "resourceType": "MedicationRequest",
        "id": "mr1",
        "status": "active",
        "intent": "order",
        "subject": {"reference": "Patient/p1"},
        "authoredOn": "2024-05-01",
        "contained": [
            {
                "resourceType": "Medication",
                "id": "benzo",
                "code": {"coding": [{"system": RXNORM, "code": "905505"}]},
            }
        ],
        "medicationReference": {"reference": "#benzo"},
    }
    in_bundle = {
        **contained,
        "id": "mr2",
        "contained": None,
        "medicationReference": {"reference": "Medication/opi"},
    }
    del in_bundle["contained"]
    medication = {
        "resourceType": "Medication",
        "id": "opi",
        "code": {"text": "Morphine sulfate 10 MG"},
    }
    dangling = {**in_bundle, "id": "mr3", "medicationReference": {"reference": "Medication/gone"}}
    fp = profile_of(complete(contained, in_bundle, medication, dangling))
    assert fp.profile["benzodiazepine"] is True
    assert fp.current_classes == ["opioid"]
    assert any("could not be resolved" in w for w in fp.warnings)


# --------------------------------------------------------------------------- leniency


def test_invalid_ids_unknown_elements_and_broken_resources_are_survivable():
    odd = obs("39156-5", 27.5, "2024-05-01", id="bmi_obs#1", vendorField={"x": 1})
    broken = obs("33914-3", None, "2024-05-01", valueQuantity={"value": "not a number"})
    other = obs("70274-6", 20, "2024-05-21", pid="someone-else")
    fp = profile_of(complete(odd, broken, other))
    assert fp.profile["bmi"] == 27.5
    assert fp.sources["bmi"] == "Observation/bmi-obs-1"
    assert "egfr" not in fp.profile and fp.profile["gad7"] == 4
    text = " ".join(fp.warnings)
    assert "rewritten" in text and "vendorField" in text
    assert "skipped" in text and "another patient" in text
    assert "not a number" not in text  # warnings never echo values


def test_resources_to_profile_unpacks_searchsets_and_urn_subjects():
    pat = patient("abc")
    searchset = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            {
                "resource": {
                    **obs("72514-3", 5, "2024-05-01"),
                    "subject": {"reference": "urn:uuid:abc"},
                }
            },
            {"resource": cond("278860009", pid="abc")},
        ],
    }
    fp = resources_to_profile(
        pat, [searchset, obs("44261-6", 3, "2024-05-01", pid="abc")], as_of=AS_OF
    )
    assert fp.profile["pain_intensity"] == 5 and fp.profile["phq9"] == 3
    with pytest.raises(ContractError):
        resources_to_profile({"resourceType": "Observation"}, [])


def test_latest_record_date():
    b = complete(obs("72514-3", 1, "2024-05-30T10:00:00Z"))
    assert latest_record_date(b) == date(2024, 5, 30)
    assert latest_record_date({"resourceType": "Bundle"}) is None


def test_report_is_json_ready():
    fp = profile_of(complete(), assume_missing_scores=True)
    report = fp.report()
    json.dumps(report)
    assert report["as_of"] == AS_OF and report["code_table_version"] == "2026.11-1"
