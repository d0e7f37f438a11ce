"""The model artefact: one directory the service, the batch CLI and MLflow all carry around.

    <dir>/model.pkl       pickle of {"model": PlanOutcomeModel, "policy": LoggingPolicyModel | None}
    <dir>/metadata.json   what the model was built from and under (see :func:`save_bundle`)

It is deliberately plain (pickle + JSON, no MLflow): the service loads it without
``training/`` or an MLflow installation, and the MLflow pyfunc only wraps this directory.

On load, three things are checked before the pickle is trusted to produce numbers:

* **integrity** — ``model.pkl`` must hash to the ``content_sha256`` recorded next to it, so a
  truncated download or an edited file is refused instead of half-working;
* **schema** — the encoder must have been fitted under the feature schema of the running code
  (``features.encode.schema_fingerprint``): otherwise columns would be read in the wrong
  order or with the wrong levels, silently;
* **safety ruleset** — when the caller names the ruleset it expects (promotion and the service
  do), a model evaluated under another ruleset is refused.

The hash detects accidents, not attackers (whoever can rewrite the pickle can rewrite the
JSON): only load bundles from the project's own registry or directories you trust, since
unpickling runs code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import platform
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np

from features.encode import schema_fingerprint
from features.errors import IncompatibleModel, ModelError, ModelNotFound
from recommender.model import PlanOutcomeModel
from recommender.propensity import LoggingPolicyModel
from recommender.safety import RULESET_VERSION

log = logging.getLogger(__name__)

MODEL_FILE = "model.pkl"
METADATA_FILE = "metadata.json"
FORMAT_VERSION = 1
# Recorded with every bundle so a failure to unpickle can be traced to a library upgrade.
_PACKAGES = ("painplan", "numpy", "pandas", "scipy", "scikit-learn", "lightgbm")


@dataclass
class ModelBundle:
    """A fitted outcome model, the logging-policy model it was evaluated with, and metadata.

    ``metadata`` is free-form on the way in (the pipeline puts ``data_hash``, ``row_counts``,
    ``code_version``, ``mlflow_run_id`` … there); :func:`save_bundle` adds the fields it
    derives, and :func:`load_bundle` returns what was saved.
    """

    model: PlanOutcomeModel
    policy: LoggingPolicyModel | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def schema_fingerprint(self) -> str | None:
        return self.metadata.get("schema_fingerprint")

    @property
    def ruleset_version(self) -> str | None:
        return self.metadata.get("ruleset_version")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    """Versions of Python and the libraries whose pickles the bundle contains."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _atomic_write(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same directory, so a crash never leaves half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)  # only left over when the write or replace failed


def save_bundle(bundle: ModelBundle, directory: str | os.PathLike) -> str:
    """Write ``model.pkl`` and ``metadata.json`` into ``directory`` (created if needed).

    The metadata written is ``bundle.metadata`` plus: ``format_version``,
    ``schema_fingerprint``, ``ruleset_version``, ``lambda_ae``, ``created_at`` (UTC, ISO 8601),
    ``package_versions``, ``has_policy``, ``content_sha256`` (of model.pkl) and, when the caller
    did not supply them, ``data_hash``/``row_counts``/``code_version`` as ``None``/``{}``/the
    installed painplan version. ``bundle.metadata`` is updated in place to match the file.
    Returns the directory as a string.
    """
    model = bundle.model
    if not hasattr(model, "effect_model_"):
        raise ModelError("cannot save an unfitted PlanOutcomeModel; call fit() first")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = pickle.dumps(
        {"model": model, "policy": bundle.policy}, protocol=pickle.HIGHEST_PROTOCOL
    )
    model_path = directory / MODEL_FILE
    _atomic_write(model_path, payload)

    versions = package_versions()
    meta = {
        "data_hash": None,
        "row_counts": {},
        "code_version": versions.get("painplan"),
        **bundle.metadata,
        "format_version": FORMAT_VERSION,
        "schema_fingerprint": getattr(model, "schema_", None) or schema_fingerprint(),
        "ruleset_version": bundle.metadata.get("ruleset_version", RULESET_VERSION),
        "lambda_ae": float(model.lambda_ae),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "package_versions": versions,
        "has_policy": bundle.policy is not None,
        "content_sha256": hashlib.sha256(payload).hexdigest(),
    }
    _atomic_write(
        directory / METADATA_FILE,
        json.dumps(meta, indent=2, sort_keys=True, default=str).encode("utf-8"),
    )
    bundle.metadata = meta
    log.info("saved model bundle to %s (sha256 %s…)", directory, meta["content_sha256"][:12])
    return str(directory)


def read_metadata(directory: str | os.PathLike) -> dict:
    """``metadata.json`` of a bundle directory, without unpickling anything."""
    directory = Path(directory)
    path = directory / METADATA_FILE
    if not directory.is_dir() or not path.is_file() or not (directory / MODEL_FILE).is_file():
        raise ModelNotFound(
            f"no model bundle at {directory}: expected {MODEL_FILE} and {METADATA_FILE} there. "
            "Check the path, or train a model with 'painplan train --data FILE' and pass "
            "'--model models:/painplan@champion' (or a model version URI) instead."
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(
            f"{path} is not valid JSON ({err}); the bundle is damaged. Download the model "
            "again from the registry or retrain it with 'painplan train'."
        ) from err
    if not isinstance(meta, dict):
        raise ModelError(
            f"{path} does not hold a JSON object; the bundle is damaged. Download the model "
            "again from the registry or retrain it with 'painplan train'."
        )
    return meta


def load_bundle(
    directory: str | os.PathLike,
    *,
    expected_schema: str | None = None,
    expected_ruleset: str | None = None,
) -> ModelBundle:
    """Load a bundle written by :func:`save_bundle`, refusing damaged or incompatible ones.

    Parameters
    ----------
    directory : path
        The bundle directory.
    expected_schema : str, optional
        Feature-schema fingerprint the caller needs; default: this code's
        ``features.encode.schema_fingerprint()`` (a model encoded under another schema can
        never be scored correctly, so this check is always on).
    expected_ruleset : str, optional
        Safety ruleset version the caller needs (e.g. ``recommender.safety.RULESET_VERSION``).
        Default: not enforced, because ranking applies the *running* code's safety rules
        whatever the model was trained under; a difference is logged as a warning.

    Raises
    ------
    ModelNotFound
        No bundle at ``directory``.
    ModelError
        ``model.pkl`` does not match its recorded hash, or cannot be unpickled.
    IncompatibleModel
        Schema or ruleset differ from what is expected.
    """
    directory = Path(directory)
    meta = read_metadata(directory)
    model_path = directory / MODEL_FILE

    recorded = meta.get("content_sha256")
    actual = _sha256(model_path)
    if recorded != actual:
        raise ModelError(
            f"{model_path} does not match the content_sha256 recorded in {METADATA_FILE} "
            f"(recorded {str(recorded)[:12]}…, file {actual[:12]}…): the file was modified, "
            "truncated or mixed with another bundle after it was saved, so it is not loaded. "
            "Download the model again from the registry (e.g. models:/painplan@champion) or "
            "retrain it with 'painplan train'; do not edit bundle files by hand."
        )

    want_schema = expected_schema or schema_fingerprint()
    got_schema = meta.get("schema_fingerprint")
    if got_schema != want_schema:
        raise IncompatibleModel(
            f"the model in {directory} was trained under feature schema {got_schema}, but "
            f"this code uses schema {want_schema}: its encoder would read patient columns "
            "differently. Retrain the model with this version of painplan ('painplan train "
            "--data FILE'), or run the painplan version the model was built with "
            f"(code version {meta.get('code_version')})."
        )
    got_ruleset = meta.get("ruleset_version")
    if expected_ruleset is not None and got_ruleset != expected_ruleset:
        raise IncompatibleModel(
            f"the model in {directory} was evaluated under safety ruleset {got_ruleset}, but "
            f"ruleset {expected_ruleset} is required: its safety checks no longer describe "
            "what this code would recommend. Retrain and re-evaluate it with 'painplan train' "
            "so the safety gate runs against the current rules."
        )
    if got_ruleset != RULESET_VERSION:
        log.warning(
            "model bundle %s was built under safety ruleset %s; ranking uses the current "
            "ruleset %s",
            directory,
            got_ruleset,
            RULESET_VERSION,
        )

    try:
        with model_path.open("rb") as fh:
            payload = pickle.load(fh)  # noqa: S301 - integrity checked above; see module doc
    except (pickle.UnpicklingError, AttributeError, ImportError, EOFError, TypeError) as err:
        raise ModelError(
            f"{model_path} could not be unpickled ({type(err).__name__}: {err}); it was "
            f"probably written by other library versions ({meta.get('package_versions')}). "
            "Install those versions, or retrain the model with 'painplan train'."
        ) from err
    model, policy = payload.get("model"), payload.get("policy")
    if not isinstance(model, PlanOutcomeModel):
        raise ModelError(
            f"{model_path} does not contain a PlanOutcomeModel (found "
            f"{type(model).__name__}); point at a bundle written by painplan's save_bundle."
        )
    if getattr(model, "schema_", want_schema) != want_schema:
        raise IncompatibleModel(
            f"the encoder inside {model_path} was fitted under schema {model.schema_}, not "
            f"{want_schema} as its metadata says; the bundle is inconsistent. Retrain it with "
            "'painplan train'."
        )
    _smoke_test(model, directory, meta)
    return ModelBundle(model=model, policy=policy, metadata=meta)


# A minimal contract patient (CONTRACT §2 required columns only), scored once on load.
_SMOKE_PATIENT = {
    "patient_id": "smoke-test",
    "age": 50,
    "sex": "female",
    "pain_condition": "low_back",
    "pain_duration_months": 12.0,
    "pain_intensity": 5.0,
    "peg": 5.0,
    "phq9": 5,
    "gad7": 5,
}


def _smoke_test(model: PlanOutcomeModel, directory: Path, meta: dict) -> None:
    """Score one synthetic patient, so a pickle that unpickles but no longer runs under this
    code (a fitted attribute renamed in recommender/ since it was saved) is refused at load
    time with a clear message instead of failing on the first real request."""
    import pandas as pd

    from features.validate import validate

    patient = validate(pd.DataFrame([_SMOKE_PATIENT]), "patients").frame
    try:
        estimates = model.predict_plans(patient)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as err:
        raise IncompatibleModel(
            f"the model in {directory} was saved by code version {meta.get('code_version')} "
            f"and cannot run under this version ({type(err).__name__}: {err}). Retrain it with "
            "'painplan train', or run the painplan version it was built with."
        ) from err
    if not np.isfinite(estimates.utility).all():
        raise ModelError(
            f"the model in {directory} produces non-finite utilities for a plain test patient; "
            "it is damaged or was trained on broken data. Retrain it with 'painplan train'."
        )


__all__ = [
    "FORMAT_VERSION",
    "METADATA_FILE",
    "MODEL_FILE",
    "ModelBundle",
    "load_bundle",
    "package_versions",
    "read_metadata",
    "save_bundle",
]
