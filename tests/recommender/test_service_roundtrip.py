"""Outcomes reported to the service come back as a training file: POST /recommend →
POST /outcomes → ``painplan export-outcomes`` → ``painplan train`` accepts it."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from features.io import profile_records, read_table
from features.validate import validate

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_EPISODES = 90


def test_outcomes_round_trip_into_training(asgi_client, tmp_path, monkeypatch, helpers):
    from training.cli import main
    from training.simulate import simulate_episodes

    audit_url = helpers.sqlite_url(tmp_path / "audit.db")
    cohort = validate(simulate_episodes(N_EPISODES, seed=5, progress=False), "episodes").frame
    shown_reported = 0
    profiles = profile_records(cohort)
    with asgi_client(audit_url) as client:
        for i, row in cohort.iterrows():
            answer = helpers.post(
                client, "/recommend", {"patient": profiles[i], "top_k": 5}, helpers.CLINICIAN
            ).json()
            # Half the time the clinician picks the top plan; otherwise the plan the
            # simulated cohort logged, which may or may not have been shown.
            plan = answer["plans"][0]["plan"] if i % 2 == 0 else row["plan"]
            shown_reported += plan in [p["plan"] for p in answer["plans"]]
            r = helpers.post(
                client,
                "/outcomes",
                {
                    "request_id": answer["request_id"],
                    "plan": plan,
                    "peg_12wk": float(row["peg_12wk"]),
                    "adverse_event": bool(row["adverse_event"]),
                },
                helpers.CLINICIAN,
            )
            assert r.status_code == 201, r.text

    out = tmp_path / "retrain.csv"
    assert main(["export-outcomes", "--out", str(out), "--audit-url", audit_url]) == 0
    episodes = validate(read_table(out), "episodes").frame
    assert len(episodes) == N_EPISODES
    assert int(episodes["propensity"].notna().sum()) == shown_reported
    assert np.allclose(episodes["propensity"].dropna(), 0.2)
    raw_ids = set(cohort["patient_id"])
    assert not raw_ids & set(episodes["patient_id"]), "raw patient ids left the service"

    # 'painplan train' takes the file as it is (a smoke-test configuration: tiny data).
    import training.evaluate as evaluation
    from training.baselines import SLearner

    monkeypatch.setattr(
        evaluation, "SLearner", functools.partial(SLearner, n_estimators=30, n_jobs=1)
    )
    home = tmp_path / "home"
    monkeypatch.setenv("PAINPLAN_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home}/mlflow.db")
    monkeypatch.setenv("BENTOML_HOME", str(home / "bentoml"))
    config = tmp_path / "smoke.yaml"
    config.write_text("min_episodes: 50\nmodel:\n  max_rounds: 20\n  n_jobs: 1\n", encoding="utf-8")
    assert (
        main(["train", "--data", str(out), "--config", str(config), "--experiment", "retrain"]) == 0
    )
