"""training.register: versions, aliases and the promotion gate (both ways)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from features.errors import ConfigError, ModelNotFound
from training.register import (
    load_bundle_from_uri,
    load_champion_bundle,
    resolve_model_uri,
    synthetic_input_example,
)


@pytest.fixture
def client(in_store):
    import mlflow

    return mlflow.MlflowClient()


# --------------------------------------------------------------------------- fast units


def test_resolve_model_uri_forms(tmp_path):
    assert resolve_model_uri(None) == "models:/painplan@champion"
    assert resolve_model_uri(None, model_name="x") == "models:/x@champion"
    assert resolve_model_uri("models:/painplan/3") == "models:/painplan/3"
    assert resolve_model_uri("models:/painplan@champion") == "models:/painplan@champion"
    assert resolve_model_uri(str(tmp_path)) == str(tmp_path.resolve())
    assert resolve_model_uri(f"file://{tmp_path}") == str(tmp_path.resolve())
    with pytest.raises(ConfigError, match="registry URI"):
        resolve_model_uri("s3://bucket/model")


def test_local_directory_without_a_bundle_is_model_not_found(tmp_path):
    with pytest.raises(ModelNotFound, match="neither a painplan model bundle"):
        load_bundle_from_uri(str(tmp_path))


@pytest.mark.slow
def test_no_champion_is_model_not_found_with_a_fix(client):
    with pytest.raises(ModelNotFound, match="no champion.*painplan train --data FILE --promote"):
        load_champion_bundle("never-registered")


def test_input_example_is_synthetic_and_valid():
    from features.validate import validate
    from training.simulate import simulate_episodes

    episodes = simulate_episodes(200, seed=4, progress=False)
    frame = validate(episodes, "episodes").frame
    example = synthetic_input_example(frame, n=3, seed=0)
    assert list(example.patient_id) == ["example-1", "example-2", "example-3"]
    validate(example, "patients")  # every value is a contract value
    # no example row is a real patient's row (columns come from different patients)
    cols = ["age", "sex", "pain_condition", "peg", "phq9", "gad7", "pain_duration_months"]
    real = set(map(tuple, frame[cols].astype(str).to_numpy()))
    assert not real & set(map(tuple, example[cols].astype(str).to_numpy()))


# --------------------------------------------------------------------------- promotion


@pytest.mark.slow
def test_first_safe_candidate_becomes_champion(store):
    decision = store.bad_result.promotion
    assert decision.promoted and decision.champion_version is None
    assert "no champion" in decision.reason and decision.floor_violations == 0


@pytest.mark.slow
def test_better_candidate_is_promoted_over_the_champion(store, client):
    decision = store.good_result.promotion
    assert decision.promoted, decision.reason
    assert decision.champion_version == store.bad_result.version
    assert decision.candidate_value >= decision.champion_value
    assert "≥" in decision.reason and "same validation set" in decision.reason
    champion = client.get_model_version_by_alias("painplan", "champion")
    assert str(champion.version) == store.good_result.version
    assert champion.tags["promotion"] == "promoted"


@pytest.mark.slow
def test_worse_candidate_is_not_promoted_and_the_champion_stays(store, client, tmp_path, helpers):
    from training.pipeline import run

    bad = helpers.write_bad_cohort(tmp_path, seed=13)
    result = run(helpers.bad_config(bad["data"], store.good["truth"], seed=2))
    decision = result.promotion
    assert not decision.promoted
    assert decision.candidate_value < decision.champion_value
    assert "not promoted" in decision.reason and "champion stays" in decision.reason
    assert str(client.get_model_version_by_alias("painplan", "champion").version) == (
        store.good_result.version
    )
    assert (
        str(client.get_model_version_by_alias("painplan", "challenger").version) == result.version
    )
    version = client.get_model_version("painplan", result.version)
    assert version.tags["promotion"] == "rejected"
    assert client.get_run(result.run_id).data.tags["promotion"] == "rejected"


@pytest.mark.slow
def test_unsafe_candidate_is_refused_before_any_comparison(store, client, monkeypatch):
    import training.register as register

    calls = []
    monkeypatch.setattr(
        register, "floor_violations", lambda patients, plans: np.ones(len(patients), bool)
    )
    monkeypatch.setattr("training.evaluate.evaluate", lambda *a, **k: calls.append(1))
    decision = register.promote(store.bad_result.version, model_name="painplan")
    assert not decision.promoted and decision.floor_violations > 0
    assert "safety floor" in decision.reason and calls == []
    assert str(client.get_model_version_by_alias("painplan", "champion").version) == (
        store.good_result.version
    )


@pytest.mark.slow
def test_candidate_from_another_ruleset_is_refused(store, client, monkeypatch):
    import training.register as register

    monkeypatch.setattr(register, "RULESET_VERSION", "2099.1-1+deadbeef")
    decision = register.promote(store.bad_result.version)
    assert not decision.promoted and "ruleset" in decision.reason


@pytest.mark.slow
def test_champion_bundle_matches_the_registry_tags(store, client):
    bundle = load_champion_bundle("painplan")
    version = client.get_model_version_by_alias("painplan", "champion")
    assert bundle.metadata["content_sha256"] == version.tags["content_sha256"]
    assert bundle.metadata["mlflow_run_id"] == version.run_id
    assert bundle.policy is not None
    same = load_bundle_from_uri(f"models:/painplan/{version.version}")
    assert same.metadata["content_sha256"] == bundle.metadata["content_sha256"]


@pytest.mark.slow
def test_validation_artifact_round_trips_without_raw_ids(store, client, tmp_path):
    from training.register import load_validation_set

    episodes, truth = load_validation_set(store.good_result.run_id, tmp_path)
    assert len(episodes) == store.good_result.metrics["test_episodes"]
    assert episodes.patient_id.str.startswith("pid-").all()
    assert episodes.episode_id.str.startswith("epi-").all()
    assert truth is not None and truth.expected_improvement.shape[1] == 839
    assert not set(truth.patients.patient_id) & set(store.good["truth_patients"].patient_id)
    raw = pd.read_csv(store.good["data"], dtype=str)
    assert not set(episodes.patient_id) & set(raw.patient_id)
    assert Path(tmp_path).exists()
