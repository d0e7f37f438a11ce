"""Shared set-up for the training tests: simulated data, tracking stores, one trained store.

Fixtures: ``helpers`` (the functions below, as a namespace: tests run with
``--import-mode=importlib``, so they cannot import a sibling helper module) and ``store``.

Training is the slow part of these tests, so ``store`` is built once per session and reused
(read-only, apart from the promotion tests that add a rejected version and move aliases):

    v1  "bad": 150 episodes with shuffled outcomes and no evidence prior → champion (no
        champion existed yet, and it is safe)
    v2  "good": ~3000 episodes with simulator truth → promoted over v1

Fast settings: max_rounds 100 and one thread everywhere — on a shared 2-core machine LightGBM
with 2 OpenMP threads was measured 8x slower than with 1 (thread oversubscription).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from training.config import ModelParams, TrainConfig

FAST_MODEL = ModelParams(max_rounds=100, n_jobs=1)
N_GOOD = 3000
N_TRUTH = 150


def use_store(mp: pytest.MonkeyPatch, home: Path) -> str:
    """Point painplan/MLflow at a store under ``home`` (SQLite); returns the URI."""
    uri = f"sqlite:///{(home / 'mlflow.db').as_posix()}"
    mp.setenv("PAINPLAN_HOME", str(home))
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.delenv("PAINPLAN_ARTIFACT_ROOT", raising=False)
    mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return uri


def fast_baselines(mp: pytest.MonkeyPatch) -> None:
    """The evaluation's S-learner baseline with one thread and fewer trees (test speed only)."""
    import training.evaluate as evaluation
    from training.baselines import SLearner

    mp.setattr(evaluation, "SLearner", functools.partial(SLearner, n_estimators=100, n_jobs=1))


def write_cohort(directory: Path, n: int, *, seed: int, truth_n: int | None = None) -> dict:
    """Simulated episodes (CSV) and optionally truth (parquet + its patients)."""
    from training.simulate import simulate_episodes, simulate_truth

    directory.mkdir(parents=True, exist_ok=True)
    episodes = simulate_episodes(n, seed=seed, progress=False)
    data = directory / f"episodes_{seed}.csv"
    episodes.to_csv(data, index=False)
    out = {"data": data, "episodes": episodes, "truth": None, "truth_patients": None}
    if truth_n:
        patients, truth = simulate_truth(truth_n, seed=seed, progress=False)
        out["truth"] = directory / f"truth_{seed}.parquet"
        truth.to_parquet(out["truth"], index=False)
        patients.to_parquet(directory / f"truth_{seed}_patients.parquet", index=False)
        out["truth_patients"] = patients
    return out


def write_bad_cohort(directory: Path, *, seed: int, n: int = 150) -> dict:
    """A deliberately poor training set: few episodes, outcomes shuffled across episodes."""
    cohort = write_cohort(directory, n, seed=seed)
    rng = np.random.default_rng(seed)
    bad = cohort["episodes"].copy()
    bad["peg_12wk"] = rng.permutation(bad["peg_12wk"].to_numpy())
    bad["adverse_event"] = rng.permutation(bad["adverse_event"].to_numpy())
    path = directory / f"bad_{seed}.csv"
    bad.to_csv(path, index=False)
    return {**cohort, "data": path, "episodes": bad}


def bad_config(data: Path, truth: Path | None, *, seed: int) -> TrainConfig:
    # No prior either: with the evidence prior even 150 shuffled episodes rank reasonably.
    return TrainConfig(
        data=str(data),
        truth=str(truth) if truth else None,
        seed=seed,
        min_episodes=100,
        promote=True,
        model=ModelParams(max_rounds=100, n_jobs=1, use_prior=False),
    )


@dataclass
class Store:
    home: Path
    data_dir: Path
    good: dict
    bad: dict
    good_result: object
    bad_result: object
    good_config: TrainConfig

    def raw_ids(self) -> set[str]:
        ids: set[str] = set()
        for cohort in (self.good, self.bad):
            ids |= set(cohort["episodes"]["patient_id"].astype(str))
            ids |= set(cohort["episodes"]["episode_id"].astype(str))
            if cohort["truth_patients"] is not None:
                ids |= set(cohort["truth_patients"]["patient_id"].astype(str))
        return ids


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """The store described in the module docstring, built once per session."""
    from training.pipeline import run

    base = tmp_path_factory.mktemp("store")
    home, data_dir = base / "home", base / "data"
    good = write_cohort(data_dir, N_GOOD, seed=11, truth_n=N_TRUTH)
    bad = write_bad_cohort(data_dir, seed=12)
    with pytest.MonkeyPatch.context() as mp:
        use_store(mp, home)
        fast_baselines(mp)
        bad_result = run(bad_config(bad["data"], good["truth"], seed=1))
        good_config = TrainConfig(
            data=str(good["data"]), truth=str(good["truth"]), seed=0, promote=True, model=FAST_MODEL
        )
        good_result = run(good_config)
    return Store(home, data_dir, good, bad, good_result, bad_result, good_config)


@pytest.fixture
def in_store(store: Store, monkeypatch: pytest.MonkeyPatch) -> Store:
    """``store`` with painplan/MLflow pointed at it (and fast baselines) for this test."""
    from training.tracking import configure_tracking

    use_store(monkeypatch, store.home)
    fast_baselines(monkeypatch)
    configure_tracking()
    return store


def read_patients(episodes: pd.DataFrame, n: int) -> pd.DataFrame:
    """The first ``n`` distinct patients of an episode frame, as a §2 patient table."""
    from features.schema import PATIENT_COLUMNS

    cols = [c.name for c in PATIENT_COLUMNS if c.name in episodes.columns]
    return episodes.drop_duplicates("patient_id").head(n)[cols].reset_index(drop=True)


@pytest.fixture(scope="session")
def helpers() -> SimpleNamespace:
    return SimpleNamespace(
        FAST_MODEL=FAST_MODEL,
        use_store=use_store,
        fast_baselines=fast_baselines,
        write_cohort=write_cohort,
        write_bad_cohort=write_bad_cohort,
        bad_config=bad_config,
        read_patients=read_patients,
    )
