"""Corrupt and adversarial episode files (docs/reliability.md §6): ``painplan train`` exits
non-zero with one paragraph naming what is wrong — and leaves no MLflow run and no registered
version behind — or, for files it accepts, says what it ignored or could not learn from, and
records that with the run. Never a silently registered model.

Decision on label leakage: a column that copies or derives the outcome (``peg_12wk_copy``,
``improvement``) is not in the contract, so it is an *extra column*: ignored with a warning
that names it (CONTRACT §2), recorded in the run's ``data_warnings`` tag, and never seen by
the model, whose features come from the contract's declared columns only.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import reliability_harness as H

from training.cli import EXIT_CONTRACT, main

N = 240


@pytest.fixture(scope="module")
def base() -> pd.DataFrame:
    from training.simulate import simulate_episodes

    return simulate_episodes(N, seed=21, progress=False)


def _csv(df: pd.DataFrame, path: Path, **kw) -> Path:
    df.to_csv(path, index=False, **kw)
    return path


def _latin1(df, d):
    df = df.copy()
    df.loc[3, "patient_id"] = "pat-Müller"
    return _csv(df, d / "latin1.csv", encoding="latin-1")


def _nan_inf_text(df, d):
    df = df.astype(str)
    df.loc[2, "peg_12wk"] = "NaN"
    df.loc[5, "age"] = "inf"
    df.loc[7, "bmi"] = "-Infinity"
    return _csv(df, d / "nan_inf.csv")


def _nan_inf_parquet(df, d):
    df = df.copy()
    df["peg_12wk"] = df["peg_12wk"].astype(float)
    df.loc[2, "peg_12wk"] = np.nan
    df["bmi"] = df["bmi"].astype(float)
    df.loc[4, "bmi"] = np.inf
    path = d / "nan_inf.parquet"
    df.to_parquet(path, index=False)
    return path


def _one_plan(df, d):
    return _csv(df.assign(plan="cbt+pt"), d / "one_plan.csv")


def _one_patient(df, d):
    return _csv(df.assign(patient_id="p-1"), d / "one_patient.csv")


def _two_patients(df, d):
    return _csv(df.assign(patient_id=["p-1", "p-2"] * (len(df) // 2)), d / "two_patients.csv")


def _zero_rows(df, d):
    return _csv(df.iloc[:0], d / "zero_rows.csv")


def _zero_bytes(_df, d):
    (d / "zero_bytes.csv").write_bytes(b"")
    return d / "zero_bytes.csv"


def _duplicate_ids(df, d):
    df = df.copy()
    df.loc[11, "episode_id"] = df.loc[10, "episode_id"]
    return _csv(df, d / "duplicate_ids.csv")


def _absurd(df, d):
    df = df.astype(str)
    df.loc[0, "age"] = "500"
    df.loc[1, "peg"] = "-3"
    df.loc[2, "bmi"] = "1e308"
    df.loc[3, "pain_duration_months"] = "1e12"
    df.loc[4, "phq9"] = "99"
    df.loc[5, "peg_12wk"] = "11"
    return _csv(df, d / "absurd.csv")


def _truncated_parquet(df, d):
    buffer = io.BytesIO()
    df.to_parquet(buffer, index=False)
    path = d / "truncated.parquet"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def _parquet_named_csv(df, d):
    buffer = io.BytesIO()
    df.to_parquet(buffer, index=False)
    (d / "really_parquet.csv").write_bytes(buffer.getvalue())
    return d / "really_parquet.csv"


def _csv_named_parquet(df, d):
    return _csv(df, d / "really_csv.parquet")


def _ragged(df, d):
    path = _csv(df, d / "ragged.csv")
    lines = path.read_text().splitlines()
    lines[6] += ",surplus"
    path.write_text("\n".join(lines) + "\n")
    return path


def _duplicate_column(df, d):
    path = _csv(df, d / "duplicate_column.csv")
    lines = path.read_text().splitlines()
    lines[0] = lines[0].replace("bmi", "age", 1)
    path.write_text("\n".join(lines) + "\n")
    return path


def _patients_only(df, d):
    return _csv(df.drop(columns=["episode_id", "plan", "peg_12wk", "adverse_event"]),
                d / "patients.csv")


def _too_few(df, d):
    return _csv(df.iloc[:50], d / "too_few.csv")


def _bad_plans(df, d):
    df = df.copy()
    df.loc[1, "plan"] = "snri+tca"
    df.loc[2, "plan"] = "aspirin"
    df.loc[3, "plan"] = "pt+cbt+mbsr+yoga"
    return _csv(df, d / "bad_plans.csv")


def _bad_booleans_dates_propensity(df, d):
    df = df.astype(str)
    df.loc[1, "adverse_event"] = "maybe"
    df.loc[2, "start_date"] = "2026-02-30"
    df.loc[3, "propensity"] = "0"
    df.loc[4, "propensity"] = "1.5"
    return _csv(df, d / "bad_values.csv")


def _binary_garbage(_df, d):
    rng = random.Random(4)
    (d / "garbage.csv").write_bytes(bytes(rng.randrange(256) for _ in range(4096)))
    return d / "garbage.csv"


def _wrong_extension(df, d):
    return _csv(df, d / "episodes.txt")


CASES: list[tuple[str, Callable, list[str]]] = [
    ("latin-1 bytes", _latin1, ["not UTF-8", "0xfc", "line 5"]),
    ("NaN and inf as text", _nan_inf_text, ["'peg_12wk': not a number", "'age': not a number",
                                            "'bmi': not a number", "row(s) 3"]),
    ("NaN and inf in parquet", _nan_inf_parquet, ["'peg_12wk': required value is empty",
                                                  "'bmi': not a number"]),
    ("every episode one plan", _one_plan, ["every episode has the same plan ('cbt+pt')"]),
    ("a single patient", _one_patient, ["belong to one patient"]),
    ("two patients", _two_patients, ["leaves 1 patient(s) for training"]),
    ("header, no rows", _zero_rows, ["no data rows"]),
    ("0 bytes", _zero_bytes, ["the file is empty (0 bytes)"]),
    ("duplicated episode ids", _duplicate_ids, ["duplicate episode_id", "row(s) 11, 12"]),
    ("absurd values", _absurd, ["'age': out of range", "'peg': out of range",
                                "'bmi': out of range", "'pain_duration_months': out of range",
                                "'phq9': out of range", "'peg_12wk': out of range"]),
    ("truncated parquet", _truncated_parquet, ["cannot be read as parquet"]),
    ("parquet bytes named .csv", _parquet_named_csv, ["really_parquet.csv"]),
    ("CSV text named .parquet", _csv_named_parquet, ["cannot be read as parquet"]),
    ("ragged row", _ragged, ["cannot be read as csv"]),
    ("column named twice", _duplicate_column, ["'age': column name appears more than once"]),
    ("patients file, no outcomes", _patients_only, ["'episode_id': required column is missing",
                                                    "'peg_12wk': required column is missing"]),
    ("too few episodes", _too_few, ["50 episode(s)", "at least 100"]),
    ("plans breaking the rules", _bad_plans, ["'plan'", "snri", "aspirin"]),
    ("bad boolean, date, propensity", _bad_booleans_dates_propensity,
     ["'adverse_event': not a boolean", "'start_date': not an ISO date",
      "'propensity': out of range"]),
    ("binary garbage", _binary_garbage, ["garbage.csv"]),
    ("unsupported extension", _wrong_extension, ["unsupported file type '.txt'"]),
]


def _no_run(home: Path) -> None:
    """Nothing was logged or registered: the store was not even opened, or holds no run and
    no model version."""
    if not (home / "mlflow.db").exists():
        return
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(home / 'mlflow.db').as_posix()}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert not client.search_runs(experiments), "a run was logged"
    assert not client.search_model_versions(), "a model version was registered"


@pytest.mark.parametrize(("name", "build", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_episode_files_fail_with_one_paragraph_and_leave_no_run(
    name, build, expected, base, tmp_path, monkeypatch, capsys
):
    home = tmp_path / "home"
    monkeypatch.setenv("PAINPLAN_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{(home / 'mlflow.db').as_posix()}")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    path = build(base, data_dir)
    config = tmp_path / "fast.yaml"
    config.write_text("model:\n  max_rounds: 30\n  n_jobs: 1\n")

    code = main(["train", "--data", str(path), "--config", str(config)])

    err = capsys.readouterr().err
    assert code == EXIT_CONTRACT, err
    assert "Traceback" not in err
    last = err.rstrip("\n").rsplit("\n", 1)[-1]
    assert last.startswith("painplan train: error: "), err
    for text in expected:
        assert text in last, f"{text!r} not in: {last}"
    _no_run(home)


def test_outcomes_a_model_cannot_learn_from_are_warned_about(base, tmp_path):
    """Valid but degenerate: no adverse event at all, one improvement everywhere. Accepted
    (a small clinic may really have none) with warnings the run records (data_warnings)."""
    from training.data import load_episodes

    df = base.assign(adverse_event=False, peg=5.0, peg_12wk=3.5)
    _, warnings, _ = load_episodes(_csv(df, tmp_path / "flat.csv"))
    assert any("adverse_event is false in all 240 episodes" in w for w in warnings)
    assert any("same improvement (peg - peg_12wk = 1.5)" in w for w in warnings)
    _, warnings, _ = load_episodes(_csv(base.assign(adverse_event=True), tmp_path / "all.csv"))
    assert any("adverse_event is true in all 240 episodes" in w for w in warnings)
    _, warnings, _ = load_episodes(_csv(base, tmp_path / "fine.csv"))
    assert warnings == []


@pytest.mark.slow
def test_bom_and_label_leakage_columns_train_with_the_leak_dropped_and_recorded(tiny_run):
    from mlflow import MlflowClient

    from training.register import load_bundle_from_uri

    result = tiny_run["result"]
    client = MlflowClient(tracking_uri=f"sqlite:///{(tiny_run['home'] / 'mlflow.db').as_posix()}")
    run = client.get_run(result.run_id)
    recorded = run.data.tags["data_warnings"]
    for column in ("'name'", "'peg_12wk_copy'", "'improvement'"):
        assert column in recorded, recorded
    # the BOM did not leak into the first column's name: patient_id was read as patient_id
    assert run.data.params["rows.patients"] == str(tiny_run["episodes"]["patient_id"].nunique())

    import mlflow

    mlflow.set_tracking_uri(client.tracking_uri)
    bundle = load_bundle_from_uri(result.model_uri)
    features = set(bundle.model.encoder_.feature_names_)
    assert not features & {"name", "peg_12wk_copy", "improvement", "peg_12wk"}, features
    from features.encode import schema_fingerprint

    assert bundle.model.schema_ == schema_fingerprint()
    assert H.SENTINEL_ID not in repr(sorted(features))
