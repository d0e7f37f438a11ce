"""The MLflow ``python_function`` flavour of a painplan model, for ``mlflow models serve``,
``mlflow.pyfunc.load_model`` and ``bentoml.mlflow.import_model``.

It wraps the model bundle directory (:mod:`recommender.artifact`), logged as the artifact
``bundle``; ``predict`` runs exactly the path the batch CLI runs (validate → recommend →
CONTRACT §7 rows), so every way of serving the model gives the same answer.

The input signature is derived from the contract, not inferred from an example: each §2
column is declared with type ``Any`` and the contract's required flag. MLflow then only
checks that required columns are present, and :func:`features.validate.validate` does the
typing and names every offending value, as the contract asks (MLflow's own type enforcement
would reject ``"yes"`` for a boolean, which the contract accepts).

Loading needs the painplan package importable (the pickled class refers to it by module):
serve with ``mlflow models serve --env-manager local`` from an environment where painplan is
installed.
"""

from __future__ import annotations

import logging

import mlflow.pyfunc
import pandas as pd

from features.schema import PATIENT_COLUMNS, PATIENT_ID
from features.validate import validate
from recommender.artifact import ModelBundle, load_bundle
from recommender.recommend import MAX_TOP_K, RANKED_COLUMNS, ranked_rows, recommend

log = logging.getLogger(__name__)

BUNDLE_ARTIFACT = "bundle"
DEFAULT_TOP_K = 5


def input_schema():
    """MLflow input schema: every CONTRACT §2 column, type ``Any``, contract requiredness."""
    from mlflow.types.schema import AnyType, ColSpec, Schema

    return Schema([ColSpec(AnyType(), c.name, required=c.required) for c in PATIENT_COLUMNS])


def top_k_from(params: dict | None) -> int:
    """``params["top_k"]`` checked to be an integer in 1..MAX_TOP_K (default 5)."""
    value = (params or {}).get("top_k", DEFAULT_TOP_K)
    try:
        top_k = int(value)
    except (TypeError, ValueError):
        top_k = None
    if top_k is None or top_k != value or not 1 <= top_k <= MAX_TOP_K:
        from features.errors import ContractError

        raise ContractError(
            f"top_k must be a whole number between 1 and {MAX_TOP_K}, got {value!r}"
        )
    return top_k


def rank_patients(bundle: ModelBundle, model_input: pd.DataFrame, top_k: int) -> pd.DataFrame:
    """Validate a §2 patient frame and return its §7 ranked rows."""
    patients = validate(model_input, "patients").frame
    ranked = recommend(bundle.model, patients, top_k=top_k)
    return ranked_rows(ranked, patients[PATIENT_ID].to_numpy())


class PainplanModel(mlflow.pyfunc.PythonModel):
    """``predict(patients, params={"top_k": 5})`` → CONTRACT §7 rows."""

    def __init__(self):
        self.bundle: ModelBundle | None = None

    def load_context(self, context) -> None:
        self.bundle = load_bundle(context.artifacts[BUNDLE_ARTIFACT])
        log.info(
            "loaded painplan bundle (run %s, sha256 %s…)",
            self.bundle.metadata.get("mlflow_run_id"),
            str(self.bundle.metadata.get("content_sha256"))[:12],
        )

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        if self.bundle is None:  # predict without load_context (e.g. in-process use)
            self.load_context(context)
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        rows = rank_patients(self.bundle, model_input, top_k_from(params))
        return rows[list(RANKED_COLUMNS)]
