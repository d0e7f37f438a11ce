"""The Dask engines agree with the single-process ones (issue "Scale-out on Dask").

* scoring: ``--engine dask`` over a partitioned dataset gives *exactly* the ranked rows of
  ``--engine local`` (same plans and ranks; numbers to 1e-9), because both call
  ``training.batch.rank_block``;
* training: ``lightgbm.dask`` learners give a model of the same quality (held-out RMSE within
  2 %, normalized value against simulator truth within 0.05 — at this test size two *local*
  fits with different seeds differ by up to ~0.05, at 20k episodes the engines differ by < 0.01),
  and ``pipeline.run(engine="dask")`` evaluates, logs and registers like the local path;
* errors are one paragraph and leave nothing behind: a bad partition, an output that would be
  clobbered, ``--scheduler`` without ``--engine dask``, a malformed or unreachable scheduler
  address, a scheduler without workers, workers running other painplan code.

One module-scoped ``LocalCluster`` (2 worker processes, 1 thread each, no dashboard), as in
LightGBM's own Dask tests; always closed. Not on Windows (lightgbm.dask is not tested there).
"""

from __future__ import annotations

import logging
import pickle
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from features.errors import ConfigError, ContractError
from training.config import ModelParams, TrainConfig

pytest.importorskip("distributed")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.skipif(sys.platform == "win32", reason="lightgbm.dask is not tested on Windows"),
]

FAST = ModelParams(max_rounds=100, n_jobs=1)
NUMERIC = [
    "utility",
    "expected_improvement",
    "improvement_low",
    "improvement_high",
    "p_response",
    "p_adverse_event",
]


@pytest.fixture(scope="module")
def scheduler():
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        silence_logs=logging.CRITICAL,
    ) as cluster:
        assert len(cluster.workers) == 2
        yield cluster.scheduler_address


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    """6000 episodes (parquet), truth for 300 other patients, and the run's own split."""
    from training.data import load_episodes, split
    from training.simulate import simulate_episodes, simulate_truth

    base = tmp_path_factory.mktemp("dask-cohort")
    data = base / "episodes.parquet"
    simulate_episodes(6000, seed=21, progress=False).to_parquet(data, index=False)
    patients, truth = simulate_truth(300, seed=21, progress=False)
    truth.to_parquet(base / "truth.parquet", index=False)
    patients.to_parquet(base / "truth_patients.parquet", index=False)
    config = TrainConfig(data=str(data), truth=str(base / "truth.parquet"), seed=3, model=FAST)
    frame, _, _ = load_episodes(data)
    train_idx, test_idx = split(frame, config)
    return {
        "config": config,
        "train": frame.iloc[train_idx],
        "test": frame.iloc[test_idx],
        "base": base,
    }


@pytest.fixture(scope="module")
def local_bundle(cohort):
    from recommender.artifact import save_bundle
    from training.pipeline import fit_bundle

    bundle = fit_bundle(cohort["train"], cohort["config"], progress=lambda _: None)
    bundle.metadata = {"seed": 3}
    save_bundle(bundle, cohort["base"] / "bundle")
    return {"bundle": bundle, "dir": str(cohort["base"] / "bundle")}


@pytest.fixture(scope="module")
def patients_dir(tmp_path_factory) -> Path:
    """1100 contract patients as a dataset: two Parquet files with 250-row groups (so they
    split into several partitions) and one CSV file (read as text, like the local engine)."""
    from training.simulate import truth_cohort

    patients = truth_cohort(1100, seed=8).frame()
    root = tmp_path_factory.mktemp("patients")
    patients.iloc[:500].to_parquet(root / "a.parquet", index=False, row_group_size=250)
    (root / "nested").mkdir()
    patients.iloc[500:900].to_parquet(
        root / "nested" / "b.parquet", index=False, row_group_size=250
    )
    patients.iloc[900:].to_csv(root / "c.csv", index=False)
    (root / "_SUCCESS").write_text("")  # writer markers are skipped
    return root


def _quality(bundle, test: pd.DataFrame, truth) -> tuple[float, float]:
    """(normalized value of the top-1 plan on truth patients, held-out RMSE of improvement)."""
    from features.catalog import PLAN_INDEX
    from recommender.recommend import recommend
    from training.truth import normalized_value

    top1 = recommend(bundle.model, truth.patients, top_k=1).order[:, 0]
    value = normalized_value(truth, top1)["normalized_value"]
    est = bundle.model.predict_plans(test)
    logged = np.array([PLAN_INDEX[p] for p in test["plan"]])
    y = (test["peg"] - test["peg_12wk"]).to_numpy(dtype=float)
    fitted = est.expected_improvement[np.arange(len(test)), logged]
    return value, float(np.sqrt(np.mean((fitted - y) ** 2)))


# --------------------------------------------------------------------------- scoring


def test_dask_scoring_equals_local_scoring(scheduler, local_bundle, patients_dir, tmp_path):
    from training.dask_recommend import recommend_dataset
    from training.pipeline import recommend_file

    local_out = tmp_path / "local.parquet"
    n_local = recommend_file(patients_dir, local_out, model=local_bundle["dir"], top_k=5)
    out = tmp_path / "ranked"
    seen: list[str] = []
    n_dask = recommend_dataset(
        patients_dir,
        out,
        model=local_bundle["dir"],
        top_k=5,
        scheduler=scheduler,
        partition_rows=300,
        chunk_size=128,
        progress=seen.append,
    )
    parts = sorted(out.iterdir())
    assert [p.name for p in parts] == [f"part-{i:05d}.parquet" for i in range(5)]
    assert sum("ranked" in s and "partitions" in s for s in seen) == 5
    local, dask = pd.read_parquet(local_out), pd.read_parquet(out)  # parts in name order
    assert n_local == n_dask == len(local) == len(dask) == 1100 * 5
    for column in ("patient_id", "rank", "plan"):
        assert (local[column].to_numpy() == dask[column].to_numpy()).all(), column
    np.testing.assert_allclose(
        dask[NUMERIC].to_numpy(), local[NUMERIC].to_numpy(), rtol=0, atol=1e-9
    )
    assert dict(local.dtypes) == dict(dask.dtypes)

    # Scoring again replaces the previous output, and leaves no temporary directories.
    recommend_dataset(patients_dir, out, model=local_bundle["dir"], top_k=2, scheduler=scheduler)
    again = pd.read_parquet(out)
    assert len(again) == 1100 * 2 and again["rank"].max() == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_bad_partition_fails_in_one_paragraph_and_writes_nothing(
    scheduler, local_bundle, patients_dir, tmp_path
):
    from training.dask_recommend import recommend_dataset

    data = tmp_path / "patients"
    data.mkdir()
    good = pd.read_parquet(patients_dir / "a.parquet")
    good.to_parquet(data / "p0.parquet", index=False)
    bad = good.copy()
    bad.loc[7, "age"] = 7
    bad.to_parquet(data / "p1.parquet", index=False)
    with pytest.raises(ContractError) as caught:
        recommend_dataset(data, tmp_path / "out", model=local_bundle["dir"], scheduler=scheduler)
    message = str(caught.value)
    assert "p1.parquet" in message and "'age'" in message and "row(s) 8" in message
    assert "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["patients"]


def test_the_dask_engine_refuses_outputs_it_would_clobber(local_bundle, patients_dir, tmp_path):
    from training.dask_recommend import recommend_dataset

    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("do not delete")
    with pytest.raises(ConfigError, match="notes.txt"):
        recommend_dataset(patients_dir, keep, model=local_bundle["dir"])
    with pytest.raises(ConfigError, match="directory of Parquet partitions, not CSV"):
        recommend_dataset(patients_dir, tmp_path / "x.csv", model=local_bundle["dir"])
    assert (keep / "notes.txt").read_text() == "do not delete"


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--scheduler", "not-an-address"], 4, "is not a Dask scheduler address"),
        (["--scheduler", "tcp://127.0.0.1:9"], 4, "cannot reach the Dask scheduler at"),
        (["--patients", "no/such/dir"], 2, "no such file or directory"),
    ],
)
def test_cli_errors_are_one_paragraph(
    args, code, message, local_bundle, patients_dir, tmp_path, capsys
):
    from training.cli import main

    argv = [
        "recommend",
        "--engine",
        "dask",
        "--patients",
        str(patients_dir),
        "--out",
        str(tmp_path / "out"),
        "--model",
        local_bundle["dir"],
        *args,
    ]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("painplan recommend: error: ") and message in last
    assert not (tmp_path / "out").exists()


def test_scheduler_without_dask_engine_is_refused(local_bundle, patients_dir, tmp_path, capsys):
    from training.cli import main

    argv = [
        "recommend",
        "--patients",
        str(patients_dir),
        "--out",
        str(tmp_path / "o.csv"),
        "--model",
        local_bundle["dir"],
        "--scheduler",
        "tcp://127.0.0.1:8786",
    ]
    assert main(argv) == 4
    assert "only applies to the Dask engine" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scheduler", "tcp://127.0.0.1:8786"], "only applies to the Dask engine"),
        (["--engine", "dask", "--scheduler", "not-an-address"], "is not a Dask scheduler address"),
        (
            ["--engine", "dask", "--scheduler", "tcp://127.0.0.1:9"],
            "cannot reach the Dask scheduler",
        ),
    ],
)
def test_train_refuses_bad_engine_options_before_any_work(
    args, message, cohort, tmp_path, monkeypatch, capsys, helpers
):
    from training.cli import main

    home = tmp_path / "home"
    helpers.use_store(monkeypatch, home)
    assert main(["train", "--data", cohort["config"].data, *args]) == 4
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("painplan train: error: ") and message in last
    assert "validating" not in err  # refused before reading the data
    assert not (home / "mlflow.db").exists()  # and before any MLflow run


def test_a_scheduler_without_workers_fails_in_one_paragraph(
    local_bundle, patients_dir, tmp_path, monkeypatch
):
    from distributed import LocalCluster

    import training.dask_cluster as dask_cluster
    from training.dask_recommend import recommend_dataset

    monkeypatch.setattr(dask_cluster, "WORKER_WAIT_S", 1)
    with LocalCluster(n_workers=0, dashboard_address=None, silence_logs=logging.CRITICAL) as empty:
        with pytest.raises(ConfigError, match="has had no workers") as caught:
            recommend_dataset(
                patients_dir,
                tmp_path / "out",
                model=local_bundle["dir"],
                scheduler=empty.scheduler_address,
            )
    assert "dask worker" in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()


def _set_ruleset(version: str) -> str:
    import recommender.safety as safety

    before, safety.RULESET_VERSION = safety.RULESET_VERSION, version
    return before


def test_workers_with_other_painplan_code_are_refused(
    scheduler, local_bundle, patients_dir, tmp_path
):
    from distributed import Client

    from training.dask_recommend import recommend_dataset

    with Client(scheduler, set_as_default=False) as client:
        worker = sorted(client.scheduler_info()["workers"])[0]
        before = client.run(_set_ruleset, "other-ruleset", workers=[worker])[worker]
        try:
            with pytest.raises(ConfigError, match="run other painplan code") as caught:
                recommend_dataset(
                    patients_dir, tmp_path / "out", model=local_bundle["dir"], scheduler=scheduler
                )
        finally:
            client.run(_set_ruleset, before, workers=[worker])
    assert "1 of 2 Dask worker(s)" in str(caught.value)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- training


def test_dask_training_runs_the_pipeline_and_matches_local_quality(
    scheduler, cohort, local_bundle, tmp_path, monkeypatch, helpers
):
    import mlflow

    from training.pipeline import run
    from training.register import load_bundle_from_uri
    from training.truth import load_truth

    helpers.use_store(monkeypatch, tmp_path / "home")
    helpers.fast_baselines(monkeypatch)
    seen: list[str] = []
    result = run(cohort["config"], progress=seen.append, engine="dask", scheduler=scheduler)
    assert any("Dask cluster at" in s for s in seen)

    # Logged and registered like any run, with the engine recorded.
    run_info = mlflow.get_run(result.run_id)
    assert run_info.data.tags["engine"] == "dask"
    assert "value_for_promotion" in result.metrics
    bundle = load_bundle_from_uri(result.model_uri)

    # The bundle is plain LightGBM: no cluster, engine or Dask estimator inside.
    import lightgbm as lgb

    model = bundle.model
    assert model.engine is None and bundle.policy.engine is None
    assert all(type(m) is lgb.LGBMRegressor for m in model.m_models_)
    assert type(model.scale_model_) is lgb.LGBMRegressor
    assert type(bundle.policy.model_) is lgb.LGBMClassifier
    for booster in [*model.e_models_, model.effect_model_, model.ae_model_]:
        assert booster.trainer is None
    raw = pickle.dumps({"model": model, "policy": bundle.policy})
    assert b"dask" not in raw and b"training." not in raw

    # Early stopping ran on the cluster with the local rule: history recorded up to the stop.
    # A booster may afterwards drop its trees when their held-out gain is within noise
    # (``tree_gain_``, best_iteration_ 0); the round early stopping chose is then kept there.
    effect = model.effect_model_
    curve = effect.history_["valid_0"]["loss"]
    gain = getattr(effect, "tree_gain_", None)
    stopped = gain["rounds"] if gain else effect.best_iteration_
    assert 1 <= stopped <= len(curve) <= effect.max_rounds
    assert np.argmin(curve) + 1 == stopped
    assert effect.best_iteration_ in (0, stopped)

    # Same quality as the single-process fit on the same split.
    truth = load_truth(cohort["config"].truth)
    value_local, rmse_local = _quality(local_bundle["bundle"], cohort["test"], truth)
    value_dask, rmse_dask = _quality(bundle, cohort["test"], truth)
    assert abs(rmse_dask / rmse_local - 1) < 0.02, (rmse_local, rmse_dask)
    assert abs(value_dask - value_local) < 0.05, (value_local, value_dask)
