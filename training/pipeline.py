"""``run(config)``: validate → split → fit → evaluate → log → register → (promote).

This is the only place that opens an MLflow run, and it opens exactly one, *after* the data
have been validated and the model fitted: a bad file fails with its ContractError and leaves
nothing behind in the tracking store.

Data protection: raw ``patient_id``/``episode_id`` never reach MLflow. The validation set,
truth files and any evaluation table with an id column are logged with ids replaced by
salted hashes (the salt lives in memory for the duration of the run only); the model's input
example is synthetic (:func:`training.register.synthetic_input_example`); logs name counts,
never rows.
"""

from __future__ import annotations

import logging
import re
import secrets
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from features.catalog import PLAN_INDEX, PLANS
from features.schema import ADVERSE_EVENT, PATIENT_ID, PEG, PEG_12WK, PLAN, START_DATE
from recommender.artifact import ModelBundle, package_versions, save_bundle
from recommender.model import PlanOutcomeModel
from recommender.propensity import LoggingPolicyModel
from recommender.safety import RULESET_VERSION
from training import batch as _batch
from training.config import TrainConfig
from training.data import load_episodes, pseudonymise, split
from training.register import (
    CONFIG_ARTIFACT,
    VALIDATION_DIR,
    VALIDATION_EPISODES,
    VALIDATION_TRUTH,
    PromotionDecision,
    log_and_register,
    promote,
    synthetic_input_example,
)

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
Engine = Literal["local", "dask"]  # where LightGBM fits and batch scoring run
_ID_COLUMNS = (PATIENT_ID, "episode_id")


@dataclass(frozen=True)
class RunResult:
    run_id: str
    model_uri: str
    version: str
    metrics: dict[str, float] = field(default_factory=dict)
    promotion: PromotionDecision | None = None


def code_version() -> str:
    """``git:<sha>[-dirty]`` of the checkout painplan runs from, else the package version."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        return f"git:{sha}{'-dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return f"painplan {package_versions().get('painplan')}"


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """Nested config dict → ``{"model.lambda_ae": "2.0", …}`` for MLflow params."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)
    return out


def _metric_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", str(name))[:250]


def _artifact_name(name: str, suffix: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_") or "item"
    return stem if stem.lower().endswith(suffix) else f"{stem}{suffix}"


def truth_long(truth) -> pd.DataFrame:
    """A :class:`training.truth.TruthSet` back in the long file format of ``simulate``."""
    n, k = truth.expected_improvement.shape
    ei = truth.expected_improvement.reshape(-1)
    pae = truth.p_adverse_event.reshape(-1)
    return pd.DataFrame(
        {
            PATIENT_ID: np.repeat(truth.patients[PATIENT_ID].astype(str).to_numpy(), k),
            PLAN: np.tile(np.asarray(PLANS, dtype=object), n),
            "expected_improvement": ei,
            "p_adverse_event": pae,
            "utility": ei - 2.0 * pae,  # the file's column at the contract's default λ
            "floor_allowed": truth.floor_allowed.reshape(-1),
        }
    )


def fit_bundle(
    train: pd.DataFrame,
    config: TrainConfig,
    *,
    progress: Progress | None = None,
    engine: Engine = "local",
    scheduler: str | None = None,
) -> ModelBundle:
    """Fit the outcome model and the logging-policy model on training episodes.

    ``engine="dask"`` fits their LightGBM learners with ``lightgbm.dask`` on a Dask cluster
    (``scheduler`` address, else a local cluster for the call; see
    :mod:`training.dask_learners`); everything else runs here, and the bundle is the same kind
    of object as with ``engine="local"`` (no reference to the cluster is kept).
    """
    say = progress or log.info
    _check_engine(engine, scheduler)
    if engine == "local":
        return _fit_bundle(train, config, say, engine=None)
    from training.dask_cluster import cluster
    from training.dask_learners import DaskLearners, detach

    with cluster(scheduler, progress=say) as client:
        bundle = _fit_bundle(train, config, say, engine=DaskLearners(client, progress=say))
    detach(bundle.model, bundle.policy)
    return bundle


def _check_engine(engine: str, scheduler: str | None) -> None:
    from features.errors import ConfigError

    if engine not in ("local", "dask"):
        raise ConfigError(f"engine must be 'local' or 'dask', got {engine!r}")
    if engine == "local" and scheduler is not None:
        raise ConfigError(f"a scheduler address ({scheduler}) only applies to the Dask engine; "
                          "add --engine dask, or drop --scheduler to run in this process")


def _fit_bundle(train: pd.DataFrame, config: TrainConfig, say: Progress, *, engine) -> ModelBundle:
    params = vars(config.model)
    model = PlanOutcomeModel(**params, random_state=config.seed, engine=engine)
    model.fit(
        train,
        plans=train[PLAN].to_numpy(),
        improvement=(train[PEG] - train[PEG_12WK]).to_numpy(dtype=float),
        adverse_event=train[ADVERSE_EVENT].astype(int).to_numpy(),
        groups=train[PATIENT_ID].to_numpy(),
        progress=say,
    )
    say("fitting the logging-policy model (for off-policy evaluation)")
    policy = LoggingPolicyModel(n_jobs=config.model.n_jobs, random_state=config.seed,
                                engine=engine).fit(
        model.encoder_.transform(train), np.array([PLAN_INDEX[p] for p in train[PLAN]])
    )
    return ModelBundle(model=model, policy=policy, metadata={})


def run(
    config: TrainConfig,
    *,
    progress: Progress | None = None,
    engine: Engine = "local",
    scheduler: str | None = None,
) -> RunResult:
    """Train, evaluate, log and register one model; promote it when ``config.promote``.

    ``engine``/``scheduler`` choose where the LightGBM learners are fitted (see
    :func:`fit_bundle`); validation, evaluation, logging and registration are the same.
    """
    import mlflow

    from training import evaluate as evaluation
    from training.report import model_card, write_shap_summary
    from training.tracking import configure_tracking, ensure_experiment

    say = progress or log.info
    _check_engine(engine, scheduler)
    if engine == "dask":
        from training.dask_cluster import check_dask

        check_dask(scheduler)  # a typo fails now, not after validating and splitting

    # 1. Everything that can be wrong with the inputs fails here, before any run exists.
    say(f"validating {config.data}")
    frame, warnings, data_hash = load_episodes(config.data)
    train_idx, test_idx = split(frame, config)
    truth = None
    if config.truth:
        from training.truth import load_truth

        say(f"loading simulator truth {config.truth}")
        truth = load_truth(config.truth)
    configure_tracking()
    experiment_id = ensure_experiment(config.experiment)

    train, test = frame.iloc[train_idx], frame.iloc[test_idx]
    counts = {
        "episodes": len(frame),
        "patients": int(frame[PATIENT_ID].nunique()),
        "train_episodes": len(train),
        "train_patients": int(train[PATIENT_ID].nunique()),
        "test_episodes": len(test),
        "test_patients": int(test[PATIENT_ID].nunique()),
    }
    say(
        f"{counts['episodes']} episodes of {counts['patients']} patients: "
        f"{counts['train_episodes']} for training, {counts['test_episodes']} for testing"
    )

    # 2. Fit and evaluate.
    bundle = fit_bundle(train, config, progress=say, engine=engine, scheduler=scheduler)
    version_of_code = code_version()
    bundle.metadata = {
        "data_hash": data_hash,
        "row_counts": counts,
        "code_version": version_of_code,
        "ruleset_version": RULESET_VERSION,
        "model_name": config.model_name,
        "seed": config.seed,
    }
    say("evaluating on the held-out patients")
    result = evaluation.evaluate(
        bundle, test, train=train, truth=truth, config=config, progress=say
    )

    # 3. One run: log everything, register the model.
    salt = secrets.token_hex(16)
    dates = frame[START_DATE].dropna() if START_DATE in frame.columns else pd.Series([])
    data_summary = {
        **counts,
        "data_hash": data_hash,
        "date_min": str(dates.min().date()) if len(dates) else None,
        "date_max": str(dates.max().date()) if len(dates) else None,
    }
    say("logging the run to MLflow")
    with (
        mlflow.start_run(experiment_id=experiment_id) as active,
        tempfile.TemporaryDirectory(prefix="painplan-run-") as tmp,
    ):
        run_id = active.info.run_id
        tmp = Path(tmp)
        mlflow.log_params(flatten(config.to_dict()))
        mlflow.log_params({f"rows.{k}": v for k, v in counts.items()})
        mlflow.log_dict(config.to_dict(), CONFIG_ARTIFACT)
        mlflow.set_tags(
            {
                "data_hash": data_hash,
                "code_version": version_of_code,
                "ruleset_version": RULESET_VERSION,
                "schema_fingerprint": bundle.model.schema_,
                "data_warnings": "; ".join(warnings)[:4000] or "none",
                "engine": engine,
            }
        )
        metrics = _log_evaluation(result, salt)

        say("computing SHAP summaries")
        shap_dir = tmp / "shap"
        write_shap_summary(bundle.model, test, shap_dir, seed=config.seed)
        mlflow.log_artifacts(str(shap_dir), "shap")

        say("logging the validation set (ids pseudonymised)")
        val_dir = tmp / VALIDATION_DIR
        val_dir.mkdir()
        pseudonymise(test, salt).to_parquet(val_dir / VALIDATION_EPISODES, index=False)
        if truth is not None:
            long = pseudonymise(truth_long(truth), salt, (PATIENT_ID,))
            long.to_parquet(val_dir / VALIDATION_TRUTH, index=False)
            pseudonymise(truth.patients, salt, (PATIENT_ID,)).to_parquet(
                val_dir / f"{Path(VALIDATION_TRUTH).stem}_patients.parquet", index=False
            )
        mlflow.log_artifacts(str(val_dir), VALIDATION_DIR)

        say("saving and registering the model")
        bundle.metadata["mlflow_run_id"] = run_id
        bundle_dir = tmp / "bundle"
        save_bundle(bundle, bundle_dir)
        (bundle_dir / "model_card.md").write_text(
            model_card(
                config=config,
                evaluation=result,
                metadata=bundle.metadata,
                data_summary=data_summary,
                registered={"run_id": run_id},
            ),
            encoding="utf-8",
        )
        registered = log_and_register(
            bundle_dir,
            config=config,
            input_example=synthetic_input_example(train, n=3, seed=config.seed),
            run_id=run_id,
        )
        mlflow.log_text(
            model_card(
                config=config,
                evaluation=result,
                metadata=bundle.metadata,
                data_summary=data_summary,
                registered={
                    "name": registered.name,
                    "version": registered.version,
                    "model_uri": registered.model_uri,
                    "run_id": run_id,
                },
            ),
            "model_card.md",
        )
        mlflow.set_tags(
            {"registered_model": registered.name, "registered_version": registered.version}
        )

    decision = None
    if config.promote:
        say(f"deciding promotion of version {registered.version}")
        decision = promote(registered.version, config=config)
        mlflow.MlflowClient().set_tag(
            run_id, "promotion", "promoted" if decision.promoted else "rejected"
        )
        say(decision.reason)
    return RunResult(run_id, registered.model_uri, registered.version, metrics, decision)


def _log_evaluation(result, salt: str) -> dict[str, float]:
    """Log metrics, tables (ids pseudonymised) and figures of an Evaluation; return metrics."""
    import matplotlib.pyplot as plt
    import mlflow

    metrics: dict[str, float] = {}
    for name, value in (getattr(result, "metrics", {}) or {}).items():
        if isinstance(value, bool | int | float | np.integer | np.floating) and np.isfinite(value):
            metrics[_metric_name(name)] = float(value)
    value = getattr(result, "value_for_promotion", None)
    if value is not None and np.isfinite(value):
        metrics["value_for_promotion"] = float(value)
    if metrics:
        mlflow.log_metrics(metrics)
    for name, table in (getattr(result, "tables", {}) or {}).items():
        if not isinstance(table, pd.DataFrame):
            continue
        if any(c in table.columns for c in _ID_COLUMNS):
            table = pseudonymise(table, salt)  # a per-patient table must not carry raw ids
        mlflow.log_text(table.to_csv(index=False), f"tables/{_artifact_name(name, '.csv')}")
    for name, fig in (getattr(result, "figures", {}) or {}).items():
        mlflow.log_figure(fig, f"figures/{_artifact_name(name, '.png')}")
        plt.close(fig)
    return metrics


# --------------------------------------------------------------------------- batch scoring

CHUNK_SIZE = _batch.CHUNK_SIZE  # patients per scoring block (memory formula in training.batch)


def load_scoring_model(model: str | None, *, model_name: str = "painplan",
                       progress: Progress | None = None,
                       use_model_cache: bool = True) -> ModelBundle:
    """The bundle ``painplan recommend`` scores with (both engines): a registry/run URI or a
    local bundle directory; the registered champion by default.

    Registered versions (``models:/<name>/<N>``, and aliases once the registry has resolved
    them) go through the local, verified model cache (:mod:`training.model_cache`) unless
    ``use_model_cache`` is false or ``PAINPLAN_MODEL_CACHE=off``; a cached version is loaded
    without importing MLflow.
    """
    from training.register import load_bundle_from_uri, resolve_model_uri

    uri = resolve_model_uri(model, model_name=model_name)
    if use_model_cache:
        from training.model_cache import cache_dir, load_registered, parse_models_uri

        ref, root = parse_models_uri(uri), cache_dir()
        if ref is not None and root is not None:
            return load_registered(uri, ref, root, progress=progress)
    if uri.startswith(("models:/", "runs:/")):
        from training.tracking import configure_tracking

        configure_tracking()
    (progress or log.info)(f"loading model {uri}")
    return load_bundle_from_uri(uri)


def recommend_file(
    patients_path: str | Path,
    out_path: str | Path,
    *,
    model: str | None = None,
    top_k: int = 5,
    model_name: str = "painplan",
    chunk_size: int = CHUNK_SIZE,
    progress: Progress | None = None,
    engine: Engine = "local",
    scheduler: str | None = None,
    use_model_cache: bool = True,
) -> int:
    """Rank plans for every patient in a §2 file (or directory of files) and write §7 rows;
    returns rows written.

    ``engine="local"``: the whole input is validated first (so every violation is reported
    before anything is written); scoring then runs in blocks of ``chunk_size`` patients,
    appending to a temporary file that replaces ``out_path`` (.csv or .parquet) only when
    complete. ``engine="dask"`` scores a Parquet dataset partition by partition on a Dask
    cluster (``scheduler`` address, else a local one) and writes a Parquet dataset directory:
    see :func:`training.dask_recommend.recommend_dataset`. Both engines rank every block with
    :func:`training.batch.rank_block`.
    """
    from features.errors import ConfigError
    from features.validate import validate
    from recommender.recommend import MAX_TOP_K

    if engine == "dask":  # (its own checks; the same per-chunk scoring)
        from training.dask_recommend import recommend_dataset

        return recommend_dataset(patients_path, out_path, model=model, top_k=top_k,
                                 model_name=model_name, chunk_size=chunk_size,
                                 scheduler=scheduler, progress=progress,
                                 use_model_cache=use_model_cache)
    _check_engine(engine, scheduler)
    say = progress or log.info
    if not 1 <= int(top_k) <= MAX_TOP_K:
        raise ConfigError(f"top_k must be between 1 and {MAX_TOP_K}, got {top_k}")
    out_path = Path(out_path)
    suffix = out_path.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise ConfigError(
            f"--out {out_path.name}: unsupported file type {suffix or '(none)'!r}; write "
            ".csv or .parquet (or use --engine dask to write a directory of Parquet partitions)"
        )
    threads = _batch.scoring_threads()  # a bad PAINPLAN_SCORING_THREADS fails before any work
    say(f"validating {patients_path}")
    patients = validate(_batch.read_dataset(patients_path), "patients").frame
    bundle = load_scoring_model(model, model_name=model_name, progress=say,
                                use_model_cache=use_model_cache)
    n = len(patients)
    say(f"scoring {n} patients in blocks of {chunk_size}"
        + (f", {threads} threads per block" if threads > 1 else ""))

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.partial")
    writer = None
    written = 0
    try:
        for done, rows in _batch.iter_ranked(bundle.model, patients, top_k=top_k,
                                             chunk_size=chunk_size, threads=threads):
            if suffix == ".csv":
                first = done <= chunk_size
                rows.to_csv(tmp, mode="w" if first else "a", header=first, index=False)
            else:
                import pyarrow.parquet as pq

                writer = writer or pq.ParquetWriter(tmp, _batch.ranked_schema())
                writer.write_table(_batch.ranked_table(rows))
            written += len(rows)
            say(f"ranked {done}/{n} patients")
        if writer is not None:
            writer.close()
            writer = None
        tmp.replace(out_path)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    return written
