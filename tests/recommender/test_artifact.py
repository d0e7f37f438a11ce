"""recommender.artifact: a bundle round-trips, and damaged or incompatible bundles are refused."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from features.catalog import PLAN_INDEX
from features.encode import schema_fingerprint
from features.errors import IncompatibleModel, ModelError, ModelNotFound
from features.validate import validate
from recommender.artifact import ModelBundle, load_bundle, read_metadata, save_bundle
from recommender.model import PlanOutcomeModel
from recommender.propensity import LoggingPolicyModel
from recommender.safety import RULESET_VERSION


@pytest.fixture(scope="module")
def fitted():
    from training.simulate import simulate_episodes

    episodes = validate(simulate_episodes(400, seed=2, progress=False), "episodes").frame
    model = PlanOutcomeModel(max_rounds=20, n_jobs=1, random_state=0).fit(
        episodes,
        plans=episodes.plan,
        improvement=episodes.peg - episodes.peg_12wk,
        adverse_event=episodes.adverse_event.astype(int),
        groups=episodes.patient_id,
    )
    policy = LoggingPolicyModel(n_estimators=10, n_jobs=1).fit(
        model.encoder_.transform(episodes), np.array([PLAN_INDEX[p] for p in episodes.plan])
    )
    return model, policy, episodes


@pytest.fixture
def saved(fitted, tmp_path):
    model, policy, _ = fitted
    bundle = ModelBundle(
        model,
        policy,
        {
            "data_hash": "sha256:abc",
            "row_counts": {"episodes": 400},
            "code_version": "git:test",
            "mlflow_run_id": "r1",
        },
    )
    return save_bundle(bundle, tmp_path / "bundle")


def test_round_trip_gives_the_same_estimates_and_full_metadata(fitted, saved):
    model, _, episodes = fitted
    bundle = load_bundle(saved)
    head = episodes.head(5)
    np.testing.assert_array_equal(
        bundle.model.predict_plans(head).utility, model.predict_plans(head).utility
    )
    assert bundle.policy is not None
    meta = bundle.metadata
    assert meta["schema_fingerprint"] == schema_fingerprint()
    assert meta["ruleset_version"] == RULESET_VERSION
    assert meta["lambda_ae"] == 2.0
    assert meta["data_hash"] == "sha256:abc" and meta["row_counts"] == {"episodes": 400}
    assert meta["code_version"] == "git:test" and meta["mlflow_run_id"] == "r1"
    assert {"python", "lightgbm", "scikit-learn"} <= set(meta["package_versions"])
    assert meta["created_at"].endswith("+00:00")
    digest = hashlib.sha256(Path(saved, "model.pkl").read_bytes()).hexdigest()
    assert meta["content_sha256"] == digest


def test_tampered_model_file_is_refused(saved):
    path = f"{saved}/model.pkl"
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(ModelError) as err:
        load_bundle(saved)
    message = str(err.value)
    assert "model.pkl" in message and "content_sha256" in message and "painplan train" in message
    assert "\n" not in message
    assert not isinstance(err.value, IncompatibleModel)


def test_missing_bundle_is_model_not_found(tmp_path, saved):
    with pytest.raises(ModelNotFound, match="no model bundle"):
        load_bundle(tmp_path / "nothing")
    (tmp_path / "bundle" / "model.pkl").unlink()
    with pytest.raises(ModelNotFound):
        load_bundle(saved)


def test_corrupt_metadata_is_a_model_error(saved):
    open(f"{saved}/metadata.json", "w").write("{not json")
    with pytest.raises(ModelError, match="metadata.json is not valid JSON"):
        load_bundle(saved)


def test_schema_mismatch_is_incompatible(saved):
    with pytest.raises(IncompatibleModel, match="feature schema"):
        load_bundle(saved, expected_schema="0123456789ab")
    meta = read_metadata(saved)
    meta["schema_fingerprint"] = "0123456789ab"
    open(f"{saved}/metadata.json", "w").write(json.dumps(meta))
    with pytest.raises(IncompatibleModel, match="Retrain"):
        load_bundle(saved)


def test_ruleset_mismatch_is_incompatible_when_a_ruleset_is_required(saved):
    assert load_bundle(saved, expected_ruleset=RULESET_VERSION).ruleset_version == RULESET_VERSION
    with pytest.raises(IncompatibleModel, match="safety ruleset"):
        load_bundle(saved, expected_ruleset="2099.1-1+deadbeef")


def test_model_that_no_longer_runs_under_this_code_is_incompatible(fitted, tmp_path):
    import copy

    model = copy.deepcopy(fitted[0])
    del model.ae_model_  # as if a fitted attribute had been renamed since the bundle was saved
    directory = save_bundle(ModelBundle(model, None, {"code_version": "git:old"}), tmp_path / "b")
    with pytest.raises(IncompatibleModel, match="code version git:old.*cannot run"):
        load_bundle(directory)


def test_unfitted_model_cannot_be_saved(tmp_path):
    with pytest.raises(ModelError, match="unfitted"):
        save_bundle(ModelBundle(PlanOutcomeModel()), tmp_path)


def test_artifact_module_needs_neither_training_nor_mlflow():
    code = (
        "import sys, recommender.artifact; "
        "bad = [m for m in ('mlflow', 'training') if m in sys.modules]; "
        "sys.exit(1 if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    from recommender import artifact

    target = tmp_path / "metadata.json"
    target.write_bytes(b"old")

    def refuse(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(artifact.os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        artifact._atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["metadata.json"]
    monkeypatch.undo()
    artifact._atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["metadata.json"]
