"""Register model versions and move the ``champion`` alias only when a candidate earns it.

Registry conventions (MLflow 3: aliases, not stages):

* every registered version carries tags naming what it is built from: ``run_id``,
  ``data_hash``, ``ruleset_version``, ``schema_fingerprint``, ``content_sha256``,
  ``code_version``, ``lambda_ae``;
* ``challenger`` — the version most recently put up for promotion;
* ``champion`` — the version ``painplan recommend`` and the service use by default. It moves
  only through :func:`promote`, which compares candidate and champion **on the same data**
  (the candidate run's logged validation set) and refuses a candidate that recommends
  anything the CONTRACT §5 safety floor excludes. Rolling back is moving the alias back
  (``MlflowClient().set_registered_model_alias(name, "champion", old_version)``).
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np
import pandas as pd

from features.errors import ConfigError, IncompatibleModel, ModelError, ModelNotFound
from features.schema import PATIENT_ID
from recommender.artifact import METADATA_FILE, ModelBundle, load_bundle
from recommender.recommend import recommend
from recommender.safety import RULESET_VERSION, floor_violations
from training.config import TrainConfig

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_ARTIFACT = "model"  # log_model(name=...)
VALIDATION_DIR = "validation"
VALIDATION_EPISODES = "episodes.parquet"
VALIDATION_TRUTH = "truth.parquet"  # its patients beside it as truth_patients.parquet
CONFIG_ARTIFACT = "config.json"
SAFETY_TOP_K = 5
# What the pyfunc needs at load and predict time (training.pyfunc → features, recommender);
# pinned to the versions the model was built with because the bundle is a pickle.
_RUNTIME_PACKAGES = ("mlflow", "numpy", "pandas", "pyarrow", "scipy", "scikit-learn", "lightgbm")


@dataclass(frozen=True)
class RegisteredVersion:
    """A logged and registered model version."""

    name: str
    version: str
    model_uri: str  # models:/<name>/<version>
    run_id: str
    model_id: str | None = None


@dataclass(frozen=True)
class PromotionDecision:
    """Outcome of :func:`promote`. ``reason`` is one sentence a reviewer can act on."""

    promoted: bool
    reason: str
    candidate_value: float | None
    champion_value: float | None
    candidate_version: str | None = None
    champion_version: str | None = None  # the champion before the decision
    floor_violations: int | None = None


def pip_requirements() -> list[str]:
    """Explicit, pinned requirements of the pyfunc (MLflow's inference can miss some)."""
    out = []
    for name in _RUNTIME_PACKAGES:
        try:
            out.append(f"{name}=={importlib_metadata.version(name)}")
        except importlib_metadata.PackageNotFoundError:
            out.append(name)
    return out


def synthetic_input_example(patients: pd.DataFrame, n: int = 3, seed: int = 0) -> pd.DataFrame:
    """A few §2 patient rows for the model's ``input_example`` that belong to nobody.

    Each column is drawn from a *different* random row, so no real patient's combination of
    quasi-identifiers (age, sex, condition, comorbidities …) is stored with the model; every
    single value is still one the contract accepts. Ids are ``example-1``, ``example-2`` ….
    """
    from features.schema import PATIENT_COLUMNS

    rng = np.random.default_rng(seed)
    n = max(1, min(n, len(patients)))
    out = {}
    for col in PATIENT_COLUMNS:
        if col.name == PATIENT_ID or col.name not in patients.columns:
            continue
        values = patients[col.name].to_numpy(dtype=object)[rng.choice(len(patients), n)]
        out[col.name] = [None if pd.isna(v) else _plain(v) for v in values]
    frame = pd.DataFrame(out, dtype=object)
    frame.insert(0, PATIENT_ID, [f"example-{i + 1}" for i in range(n)])
    return frame


def _plain(value):
    """numpy/pandas scalars → Python scalars, so the example serialises to JSON cleanly."""
    return value.item() if isinstance(value, np.generic) else value


# --------------------------------------------------------------------------- logging


def log_and_register(
    bundle_dir: str | os.PathLike,
    *,
    config: TrainConfig,
    input_example: pd.DataFrame,
    run_id: str,
) -> RegisteredVersion:
    """Log the bundle as an MLflow pyfunc model in the active run, register it under
    ``config.model_name`` and tag the new version. Call inside ``mlflow.start_run``."""
    import mlflow
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types.schema import ParamSchema, ParamSpec

    from training.pyfunc import BUNDLE_ARTIFACT, DEFAULT_TOP_K, PainplanModel, input_schema

    bundle = load_bundle(bundle_dir)
    # Output schema from a real prediction on the example, inputs from the contract.
    example_output = PainplanModel()
    example_output.bundle = bundle
    output = example_output.predict(None, input_example, {"top_k": DEFAULT_TOP_K})
    with warnings.catch_warnings():
        # MLflow hints that integer columns cannot hold missing values: true of `rank`, which
        # is never missing, so the hint is noise for this output.
        warnings.filterwarnings("ignore", message=".*[Ii]nteger column", category=UserWarning)
        outputs = infer_signature(input_example, output).outputs
    signature = ModelSignature(
        inputs=input_schema(),
        outputs=outputs,
        params=ParamSchema([ParamSpec("top_k", "long", DEFAULT_TOP_K)]),
    )
    info = mlflow.pyfunc.log_model(
        name=MODEL_ARTIFACT,
        python_model=PainplanModel(),
        artifacts={BUNDLE_ARTIFACT: str(bundle_dir)},
        signature=signature,
        input_example=(input_example, {"top_k": DEFAULT_TOP_K}),
        pip_requirements=pip_requirements(),
        registered_model_name=config.model_name,
    )
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    meta = bundle.metadata
    tags = {
        "run_id": run_id,
        "data_hash": meta.get("data_hash"),
        "ruleset_version": meta.get("ruleset_version"),
        "schema_fingerprint": meta.get("schema_fingerprint"),
        "content_sha256": meta.get("content_sha256"),
        "code_version": meta.get("code_version"),
        "lambda_ae": meta.get("lambda_ae"),
    }
    for key, value in tags.items():
        if value is not None:
            client.set_model_version_tag(config.model_name, version, key, str(value))
    log.info("registered %s version %s (run %s)", config.model_name, version, run_id)
    return RegisteredVersion(
        name=config.model_name,
        version=version,
        model_uri=f"models:/{config.model_name}/{version}",
        run_id=run_id,
        model_id=getattr(info, "model_id", None),
    )


# --------------------------------------------------------------------------- loading


def resolve_model_uri(uri_or_none: str | None, *, model_name: str = "painplan") -> str:
    """The model to use: ``None`` → ``models:/<model_name>@champion``; ``models:/…`` and
    ``runs:/…`` URIs pass through; anything else is a local bundle (or MLflow model)
    directory, returned as an absolute path."""
    if uri_or_none is None or not str(uri_or_none).strip():
        return f"models:/{model_name}@{CHAMPION}"
    uri = str(uri_or_none).strip()
    if uri.startswith(("models:/", "runs:/")):
        return uri
    if uri.startswith("file://"):
        uri = uri.removeprefix("file://")
    if "://" in uri:
        raise ConfigError(
            f"model {uri!r} is neither a registry URI (models:/painplan@champion, "
            "models:/painplan/3), a run URI (runs:/<run_id>/model) nor a local directory"
        )
    return str(Path(uri).expanduser().resolve())


def load_bundle_from_uri(
    uri: str, *, expected_ruleset: str | None = None, dst: str | os.PathLike | None = None
) -> ModelBundle:
    """Load the bundle behind a URI from :func:`resolve_model_uri`.

    Local directories may be a bundle (``metadata.json`` + ``model.pkl``) or a downloaded
    MLflow model (``MLmodel`` + ``artifacts/bundle``). Registry and run URIs are downloaded
    (to ``dst`` or a temporary directory removed after loading: the bundle is unpickled into
    memory) and need :func:`training.tracking.configure_tracking` to have run.
    """
    if not uri.startswith(("models:/", "runs:/")):
        return load_bundle(_bundle_dir(Path(uri)), expected_ruleset=expected_ruleset)
    import mlflow
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="painplan-model-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst or tmp)
        except MlflowException as err:
            raise _not_found(uri, err) from err
        bundle_dir = _bundle_dir(Path(local))
        try:
            return load_bundle(bundle_dir, expected_ruleset=expected_ruleset)
        except ModelError as err:
            if dst is not None:
                raise
            # Name the model the user asked for, not the temporary download directory.
            raise type(err)(str(err).replace(str(bundle_dir), uri)) from err


def _bundle_dir(path: Path) -> Path:
    if (path / METADATA_FILE).is_file():
        return path
    from training.pyfunc import BUNDLE_ARTIFACT

    nested = path / "artifacts" / BUNDLE_ARTIFACT
    if (path / "MLmodel").is_file() and nested.is_dir():
        return nested
    raise ModelNotFound(
        f"{path} is neither a painplan model bundle (metadata.json + model.pkl) nor an MLflow "
        "model directory with artifacts/bundle. Pass --model models:/painplan@champion, "
        "models:/painplan/<version>, or the directory written by 'painplan train'."
    )


def _not_found(uri: str, err: Exception) -> ModelError:
    text = " ".join(str(err).split())
    if "@" in uri and CHAMPION in uri:
        return ModelNotFound(
            f"no champion model at {uri} ({text[:200]}). Train and promote one with "
            "'painplan train --data FILE --promote', or promote a registered version with "
            "'painplan promote --version N'."
        )
    return ModelNotFound(
        f"cannot download model {uri} ({text[:200]}). Check the name and version (list them "
        "with 'mlflow models' or the MLflow UI) and that MLFLOW_TRACKING_URI / PAINPLAN_HOME "
        "point at the store it was registered in."
    )


def load_champion_bundle(model_name: str = "painplan") -> ModelBundle:
    """Download and load the registered champion of ``model_name``."""
    return load_bundle_from_uri(resolve_model_uri(None, model_name=model_name))


# --------------------------------------------------------------------------- promotion


def latest_version(model_name: str) -> str:
    """Highest registered version number of ``model_name``."""
    import mlflow

    versions = mlflow.MlflowClient().search_model_versions(f"name = '{_quote(model_name)}'")
    if not versions:
        raise ModelNotFound(
            f"no registered versions of model {model_name!r}; train one with "
            "'painplan train --data FILE'."
        )
    return str(max(int(v.version) for v in versions))


def _quote(name: str) -> str:
    return name.replace("'", "''")


def _run_config(client, run_id: str) -> TrainConfig:
    """The TrainConfig a run was trained with (logged as config.json)."""
    import json

    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, CONFIG_ARTIFACT, tmp)
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    model = raw.pop("model", {}) or {}
    from training.config import ModelParams

    try:
        return TrainConfig(model=ModelParams(**model), **raw)
    except TypeError as err:
        raise ConfigError(
            f"run {run_id} logged a configuration this code does not understand ({err}); "
            "promote it with the painplan version that trained it, or retrain it."
        ) from err


def load_validation_set(run_id: str, dst: str | os.PathLike):
    """(episodes frame, TruthSet | None) logged by the candidate's run, ids pseudonymised."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from features.io import read_table
    from features.validate import validate

    try:
        local = Path(mlflow.MlflowClient().download_artifacts(run_id, VALIDATION_DIR, str(dst)))
    except (MlflowException, OSError) as err:
        raise ModelError(
            f"run {run_id} has no '{VALIDATION_DIR}/' artifact to compare models on; it was "
            "not trained by 'painplan train'. Retrain the candidate with 'painplan train'."
        ) from err
    episodes = validate(read_table(local / VALIDATION_EPISODES), "episodes").frame
    truth = None
    if (local / VALIDATION_TRUTH).is_file():
        from training.truth import load_truth

        truth = load_truth(local / VALIDATION_TRUTH)
    return episodes, truth


def safety_check(bundle: ModelBundle, patients: pd.DataFrame) -> tuple[bool, int, str]:
    """(passes, n_violations, reason): ruleset is current and no top-5 plan breaks §5."""
    ruleset = bundle.metadata.get("ruleset_version")
    if ruleset != RULESET_VERSION:
        return (
            False,
            0,
            f"it was evaluated under safety ruleset {ruleset}, not the current "
            f"{RULESET_VERSION}; retrain it with this code",
        )
    ranked = recommend(bundle.model, patients, top_k=SAFETY_TOP_K)
    n_bad = 0
    for r in range(ranked.order.shape[1]):
        plans = ranked.order[:, r]
        rows = np.flatnonzero(plans >= 0)
        if rows.size:
            n_bad += int(floor_violations(patients.iloc[rows], plans[rows]).sum())
    if n_bad:
        return (
            False,
            n_bad,
            f"{n_bad} of its top-{SAFETY_TOP_K} recommendations on the validation patients "
            "include a component the CONTRACT §5 safety floor excludes",
        )
    return True, 0, "safety floor respected"


def promote(
    candidate_version: str | int,
    *,
    config: TrainConfig | None = None,
    model_name: str | None = None,
) -> PromotionDecision:
    """Make ``candidate_version`` the champion if it is safe and at least as good.

    Sets alias ``challenger`` on the candidate, then moves ``champion`` to it when (1) its
    ruleset is the current one and none of its top-5 recommendations for the validation
    patients breaks the CONTRACT §5 floor, and (2) there is no champion, or the candidate's
    ``value_for_promotion`` is ≥ the champion's, both evaluated with
    :func:`training.evaluate.evaluate` on the candidate run's logged validation set. A
    champion this code cannot load (other schema, damaged) is replaced by a safe candidate.
    ``config`` defaults to the configuration the candidate's run logged. Records the decision
    as tags on the candidate version.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from training import evaluate as evaluation

    client = mlflow.MlflowClient()
    name = model_name or (config.model_name if config else "painplan")
    version = str(candidate_version)
    try:
        mv = client.get_model_version(name, version)
    except MlflowException as err:
        raise ModelNotFound(
            f"model {name!r} has no version {version}; list versions in the MLflow UI or "
            "promote the latest with 'painplan promote' (no --version)."
        ) from err
    config = config or _run_config(client, mv.run_id)
    client.set_registered_model_alias(name, CHALLENGER, version)

    champion_version = None
    try:
        champion_version = str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        champion_version = None

    def decide(promoted: bool, reason: str, cand=None, champ=None, n_bad=None):
        decision = PromotionDecision(
            promoted, reason, cand, champ, version, champion_version, n_bad
        )
        if promoted and champion_version != version:
            client.set_registered_model_alias(name, CHAMPION, version)
        client.set_model_version_tag(
            name, version, "promotion", "promoted" if promoted else "rejected"
        )
        client.set_model_version_tag(name, version, "promotion_reason", reason[:4000])
        log.info("promotion of %s v%s: %s", name, version, reason)
        if promoted:
            # The service serves from BentoML's model store, so every champion is put there
            # (by subprocess: training never imports the service or bentoml, DESIGN.md).
            from training.serving import import_into_serving_store

            import_into_serving_store(name, version, mv.run_id)
        return decision

    if champion_version == version:
        return decide(True, f"version {version} is already the champion")

    candidate = load_bundle_from_uri(f"models:/{name}/{version}")
    with tempfile.TemporaryDirectory(prefix="painplan-validation-") as tmp:
        episodes, truth = load_validation_set(mv.run_id, tmp)

    safe, n_bad, why = safety_check(candidate, episodes)
    if not safe:
        return decide(False, f"version {version} was not promoted: {why}", n_bad=n_bad)

    cand_eval = evaluation.evaluate(candidate, episodes, truth=truth, config=config)
    cand_value = _value(cand_eval)
    if cand_value is None:
        return decide(
            False,
            f"version {version} was not promoted: its evaluation gave no value_for_promotion "
            "(no truth and no usable off-policy estimate); provide --truth or propensities",
            n_bad=0,
        )
    if champion_version is None:
        return decide(
            True,
            f"version {version} became champion: there was no champion and it passed the "
            f"safety check (value {cand_value:.4f})",
            cand_value,
            None,
            0,
        )
    try:
        champion = load_bundle_from_uri(f"models:/{name}/{champion_version}")
    except (IncompatibleModel, ModelNotFound) as err:
        return decide(
            True,
            f"version {version} replaced champion {champion_version}, which this code cannot "
            f"load ({type(err).__name__}); the candidate passed the safety check",
            cand_value,
            None,
            0,
        )
    champ_value = _value(evaluation.evaluate(champion, episodes, truth=truth, config=config))
    if champ_value is None or cand_value >= champ_value:
        return decide(
            True,
            f"version {version} became champion: value {cand_value:.4f} ≥ champion "
            f"{champion_version}'s {_fmt(champ_value)} on the same validation set, and it "
            "passed the safety check",
            cand_value,
            champ_value,
            0,
        )
    return decide(
        False,
        f"version {version} was not promoted: value {cand_value:.4f} < champion "
        f"{champion_version}'s {champ_value:.4f} on the same validation set; the champion "
        "stays",
        cand_value,
        champ_value,
        0,
    )


def _value(evaluation) -> float | None:
    value = getattr(evaluation, "value_for_promotion", None)
    if value is None or not np.isfinite(value):
        return None
    return float(value)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
