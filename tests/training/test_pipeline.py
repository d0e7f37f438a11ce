"""training.pipeline / data / tracking: one end-to-end run, its artifacts, and what it refuses."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from features.errors import ConfigError, ContractError
from training.config import ModelParams, TrainConfig
from training.data import load_episodes, pseudonymise, split

# --------------------------------------------------------------------------- fast: data


@pytest.fixture(scope="module")
def episodes(tmp_path_factory, helpers) -> pd.DataFrame:
    cohort = helpers.write_cohort(tmp_path_factory.mktemp("cohort"), 600, seed=3)
    frame, warnings, data_hash = load_episodes(cohort["data"])
    assert warnings == [] and data_hash.startswith("sha256:") and len(data_hash) == 71
    return frame


def test_group_split_keeps_each_patient_on_one_side(episodes):
    config = TrainConfig(data="x", test_fraction=0.25, seed=5)
    train, test = split(episodes, config)
    assert len(train) + len(test) == len(episodes)
    assert not set(episodes.patient_id.iloc[train]) & set(episodes.patient_id.iloc[test])
    assert 0.15 < len(test) / len(episodes) < 0.35
    again = split(episodes, config)
    assert np.array_equal(again[1], test), "the split is seeded"


def test_temporal_split_puts_the_latest_patients_in_test(episodes):
    train, test = split(episodes, TrainConfig(data="x", split="temporal", test_fraction=0.2))
    first = episodes.groupby("patient_id").start_date.min()
    train_p = set(episodes.patient_id.iloc[train])
    test_p = set(episodes.patient_id.iloc[test])
    assert not train_p & test_p
    assert first[list(test_p)].min() >= first[list(train_p)].max()
    assert len(test) >= 0.2 * len(episodes)


def test_temporal_split_without_start_date_says_how_to_fix(episodes):
    config = TrainConfig(data="x", split="temporal")
    with pytest.raises(ConfigError, match="start_date.*split: group"):
        split(episodes.drop(columns=["start_date"]), config)
    partial = episodes.copy()
    partial.loc[:3, "start_date"] = pd.NaT
    with pytest.raises(ConfigError, match="4 episode"):
        split(partial, config)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: f.head(50), r"50 episode\(s\).*at least 100.*min_episodes"),
        (lambda f: f.assign(patient_id="p-1"), "one patient"),
        (lambda f: f.assign(plan="cbt+pt"), "same plan.*'cbt\\+pt'.*two distinct plans"),
    ],
)
def test_untrainable_data_is_refused_with_a_fix(episodes, change, message):
    with pytest.raises(ContractError, match=message):
        split(change(episodes), TrainConfig(data="x"))


def test_pseudonymise_is_consistent_and_hides_ids(episodes):
    out = pseudonymise(episodes, "salt-1")
    assert not set(out.patient_id) & set(episodes.patient_id)
    assert not set(out.episode_id) & set(episodes.episode_id)
    # same patient → same pseudonym; another salt → other pseudonyms
    assert out.groupby("patient_id").ngroups == episodes.patient_id.nunique()
    assert set(pseudonymise(episodes, "salt-2").patient_id).isdisjoint(out.patient_id)


# --------------------------------------------------------------------------- fast: tracking


def test_importing_tracking_has_no_side_effects(tmp_path):
    code = "import training.tracking, training.pipeline, training.register, training.report"
    env = {**os.environ, "PAINPLAN_HOME": str(tmp_path / "home")}
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True)
    assert list(tmp_path.iterdir()) == []


def test_default_store_lives_under_painplan_home(tmp_path, monkeypatch):
    import mlflow

    from training.tracking import configure_tracking, ensure_experiment

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("PAINPLAN_HOME", raising=False)
    monkeypatch.delenv("PAINPLAN_ARTIFACT_ROOT", raising=False)
    uri = configure_tracking()
    home = tmp_path / ".painplan"
    assert uri == f"sqlite:///{home.as_posix()}/mlflow.db"
    experiment = mlflow.get_experiment(ensure_experiment("defaults"))
    assert experiment.artifact_location.endswith(".painplan/mlartifacts/defaults")
    assert (home / "mlflow.db").is_file() and (home / "mlartifacts").is_dir()
    assert ensure_experiment("defaults") == experiment.experiment_id
    assert not (tmp_path / "mlruns").exists()
    monkeypatch.setenv("PAINPLAN_ARTIFACT_ROOT", str(tmp_path / "shared-artifacts"))
    configure_tracking()
    elsewhere = mlflow.get_experiment(ensure_experiment("other experiment"))
    assert elsewhere.artifact_location == f"{tmp_path.as_posix()}/shared-artifacts/other-experiment"


def test_mlflow_tracking_uri_wins_and_file_stores_are_refused(tmp_path, monkeypatch, helpers):
    from training.tracking import configure_tracking

    uri = helpers.use_store(monkeypatch, tmp_path / "elsewhere")
    (tmp_path / "elsewhere").mkdir()
    assert configure_tracking() == uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{tmp_path}/mlruns")
    with pytest.raises(ConfigError, match="file store.*sqlite:///"):
        configure_tracking()


# --------------------------------------------------------------------------- the end-to-end run


@pytest.fixture
def client(in_store):
    import mlflow

    return mlflow.MlflowClient()


@pytest.mark.slow
def test_run_registers_a_version_with_metrics_and_lineage(store, client):
    result = store.good_result
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert result.model_uri == f"models:/painplan/{result.version}"
    version = client.get_model_version("painplan", result.version)
    assert version.run_id == result.run_id
    for tag in (
        "run_id",
        "data_hash",
        "ruleset_version",
        "schema_fingerprint",
        "content_sha256",
        "code_version",
    ):
        assert version.tags.get(tag), tag
    assert version.tags["data_hash"] == run.data.tags["data_hash"]
    metrics = run.data.metrics
    assert metrics["value_for_promotion"] == pytest.approx(result.metrics["value_for_promotion"])
    assert {"truth_normalized_value", "interval_coverage", "ae_brier"} <= set(metrics)
    params = run.data.params
    assert params["model.max_rounds"] == "100" and params["rows.episodes"] == "3000"
    assert params["data"] == str(store.good["data"])


@pytest.mark.slow
def test_run_logs_model_card_shap_tables_and_validation_set(store, client):
    root = Path(client.download_artifacts(store.good_result.run_id, "", str(store.home / "dl")))
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    for expected in (
        "model_card.md",
        "config.json",
        "shap/shap_effect_bar.png",
        "shap/shap_effect_beeswarm.png",
        "shap/shap_values.parquet",
        "validation/episodes.parquet",
        "validation/truth.parquet",
        "validation/truth_patients.parquet",
    ):
        assert expected in files
    assert any(f.startswith("tables/subgroup") for f in files)
    card = (root / "model_card.md").read_text()
    for heading in (
        "## Intended use",
        "## Out-of-scope use",
        "## Data",
        "## Evaluation",
        "### Baselines",
        "## Limitations",
        "## Safety rules",
        "## Lineage",
    ):
        assert heading in card
    assert store.good_result.run_id in card and "sha256:" in card and "3,000" in card
    phi = pd.read_parquet(root / "shap/shap_values.parquet")
    assert {"model", "row", "output", "expected_value", "age"} <= set(phi.columns)
    assert json.loads((root / "config.json").read_text())["model"]["max_rounds"] == 100


def _tokens(blob: bytes, lengths: set[int]) -> set[str]:
    """Every substring of the given lengths inside runs of id-like characters."""
    out: set[str] = set()
    for match in re.finditer(rb"[A-Za-z0-9_.:-]{%d,}" % min(lengths), blob):
        token = match.group().decode("ascii")
        for n in lengths:
            out.update(token[i : i + n] for i in range(len(token) - n + 1))
    return out


@pytest.mark.slow
def test_no_raw_patient_or_episode_id_reaches_the_store(store):
    raw = store.raw_ids()
    assert len(raw) > 3000
    lengths = {len(i) for i in raw}
    offenders = []
    for path in sorted(store.home.rglob("*")):
        if not path.is_file():
            continue
        found = _tokens(path.read_bytes(), lengths) & raw
        # Parquet pages are compressed, so also read the values back.
        if path.suffix == ".parquet":
            table = pd.read_parquet(path)
            text = table.select_dtypes(include=["object", "string", "category"]).astype(str)
            found |= set(text.to_numpy().ravel()) & raw
        offenders += [f"{path.relative_to(store.home)}: {i}" for i in sorted(found)[:3]]
    assert not offenders, offenders


@pytest.mark.slow
def test_pyfunc_model_gives_the_same_ranking_as_the_bundle(store, client):
    import mlflow

    from features.validate import validate
    from recommender.recommend import ranked_rows, recommend
    from training.register import load_bundle_from_uri

    patients = store.good["truth_patients"].head(20)
    served = mlflow.pyfunc.load_model(store.good_result.model_uri).predict(
        patients, params={"top_k": 3}
    )
    bundle = load_bundle_from_uri(store.good_result.model_uri)
    frame = validate(patients, "patients").frame
    direct = ranked_rows(recommend(bundle.model, frame, 3), frame.patient_id)
    pd.testing.assert_frame_equal(served.reset_index(drop=True), direct, check_dtype=False)
    assert bundle.metadata["mlflow_run_id"] == store.good_result.run_id


def test_bad_data_fails_with_contract_error_and_creates_no_run(
    tmp_path, monkeypatch, episodes, helpers
):
    helpers.use_store(monkeypatch, tmp_path / "home")
    bad = episodes.head(200).astype(str)
    bad.loc[3, "age"] = "150"
    bad.loc[5, "plan"] = "snri+tca"
    path = tmp_path / "bad.csv"
    bad.to_csv(path, index=False)
    from training.pipeline import run

    with pytest.raises(ContractError) as err:
        run(TrainConfig(data=str(path), model=helpers.FAST_MODEL))
    assert "'age'" in str(err.value) and "snri + tca" in str(err.value)
    assert not (tmp_path / "home").exists(), "validation must fail before any store is touched"


# --------------------------------------------------------------------------- PostgreSQL


@pytest.mark.postgres
@pytest.mark.slow
def test_pipeline_runs_against_a_postgresql_store(tmp_path, monkeypatch, helpers):
    import mlflow
    import psycopg

    database = f"painplan_test_{secrets.token_hex(4)}"
    admin = "postgresql://postgres@127.0.0.1:5432/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    try:
        cohort = helpers.write_cohort(tmp_path / "data", 400, seed=21)
        uri = f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setenv("PAINPLAN_HOME", str(tmp_path / "home"))
        monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        helpers.fast_baselines(monkeypatch)
        from training.pipeline import run

        config = TrainConfig(
            data=str(cohort["data"]),
            experiment="pg",
            promote=True,
            model=ModelParams(max_rounds=20, n_jobs=1),
        )
        result = run(config)
        client = mlflow.MlflowClient()
        assert mlflow.get_tracking_uri() == uri
        assert client.get_run(result.run_id).info.status == "FINISHED"
        assert str(client.get_model_version_by_alias("painplan", "champion").version) == "1"
        experiment = client.get_experiment_by_name("pg")
        assert experiment.artifact_location.startswith(str(tmp_path / "home" / "mlartifacts"))
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{database}") as conn:
            n_runs = conn.execute("SELECT count(*) FROM runs").fetchone()[0]
        assert n_runs == 1
    finally:
        # FORCE: MLflow's connection pool still holds sessions to the database.
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
