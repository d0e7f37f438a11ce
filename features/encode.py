"""One encoder from (patient frame, plans) to the model's inputs, fitted in training and
shipped inside the model, so serving never re-implements preprocessing.

The model is *factorised* (see :mod:`recommender.model`): patient features go through the
trees once per patient, and plans enter only through small, fixed **plan bases** — one row
per plan. Scoring all 839 plans for a patient is then one tree pass plus a matrix product,
which is what makes batch scoring and the HTTP path fast.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from features.catalog import COMPONENT_CODES, DRUG, PLANS, plan_matrix
from features.priors import combination_factor
from features.schema import COLUMNS_BY_NAME, FEATURE_COLUMNS

# Drug classes that depress the CNS, for the class-interaction terms of the adverse-event
# basis (clinical-evidence §5.3: TCA/gabapentinoid/muscle relaxant/opioid pairs are WARN or
# REVIEW for CNS depression and falls).
CNS_DRUGS = ("tca", "gabapentinoid", "muscle_relaxant", "opioid")
# NSAID + SNRI raises bleeding risk (evidence §5.3, SNRI-10).
BLEEDING_PAIR = ("nsaid", "snri")


def schema_fingerprint() -> str:
    """Hash of the declared feature columns; a model trained under another schema is refused."""
    spec = [(c, COLUMNS_BY_NAME[c].dtype, COLUMNS_BY_NAME[c].levels) for c in FEATURE_COLUMNS]
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:12]


@dataclass
class PatientEncoder:
    """Patient frame -> float matrix for LightGBM.

    Numeric columns pass through (NaN = missing, which LightGBM routes on its own);
    booleans become 0/1 (NaN when unknown); categoricals become their integer level code
    and are declared categorical to LightGBM, so a SHAP value belongs to "pain_condition",
    not to a one-hot column. Levels are fixed by the schema, so fitting only records the
    schema fingerprint it was fitted under.
    """

    feature_names_: tuple[str, ...] | None = None
    categorical_: tuple[str, ...] | None = None
    schema_: str | None = None

    def fit(self, patients: pd.DataFrame) -> PatientEncoder:
        required = [c for c in FEATURE_COLUMNS if COLUMNS_BY_NAME[c].required]
        missing = [c for c in required if c not in patients.columns]
        if missing:
            raise ValueError(
                f"patient frame lacks required columns {missing}; validate it "
                "first with features.validate.validate(df, 'patients')"
            )
        self.feature_names_ = FEATURE_COLUMNS
        self.categorical_ = tuple(
            c for c in FEATURE_COLUMNS if COLUMNS_BY_NAME[c].dtype == "category"
        )
        self.schema_ = schema_fingerprint()
        return self

    def transform(self, patients: pd.DataFrame) -> np.ndarray:
        if self.feature_names_ is None:
            raise ValueError("PatientEncoder is not fitted; call fit() first")
        cols = []
        n = len(patients)
        for name in self.feature_names_:
            col = COLUMNS_BY_NAME[name]
            if name not in patients.columns:  # an absent optional column is all-missing
                cols.append(np.full(n, np.nan))
                continue
            s = patients[name]
            if col.dtype == "category":
                if isinstance(s.dtype, pd.CategoricalDtype) and tuple(s.cat.categories) == tuple(
                    col.levels
                ):  # already coded in the schema's levels (a validated frame): ~6x cheaper
                    codes = s.cat.codes.to_numpy().astype(float)
                else:
                    codes = pd.Categorical(s, categories=list(col.levels)).codes.astype(float)
                codes[codes < 0] = np.nan
                cols.append(codes)
            elif col.dtype == "bool":
                cols.append(pd.array(s, dtype="boolean").to_numpy(dtype=float, na_value=np.nan))
            else:
                cols.append(pd.to_numeric(s, errors="coerce").to_numpy(dtype=float))
        return np.column_stack(cols) if cols else np.empty((len(patients), 0))

    def transform_values(self, values: Sequence[Mapping[str, object]]) -> np.ndarray:
        """:meth:`transform` of the frame that ``features.validate.validate_records`` builds
        from these typed values (its ``values``: level names, Python booleans and numbers,
        None = missing), without building it: the same matrix bit for bit. On one HTTP
        request this is ~50 µs where reading the one-row frame's ~45 columns costs ~2 ms."""
        if self.feature_names_ is None:
            raise ValueError("PatientEncoder is not fitted; call fit() first")
        spec = _value_codes(self.feature_names_)
        out = np.empty((len(values), len(spec)))
        for i, record in enumerate(values):
            row = out[i]
            for j, (name, codes) in enumerate(spec):
                value = record.get(name)
                if value is None:
                    row[j] = np.nan
                elif codes is None:
                    row[j] = value  # numbers, and booleans as 1.0 / 0.0
                elif value in codes:
                    row[j] = codes[value]
                else:
                    raise ValueError(
                        f"patient {i}: {name} = {value!r} is not one of its levels "
                        f"({', '.join(codes)}); pass values as validate_records returns them"
                    )
        return out

    @property
    def categorical_indices(self) -> list[int]:
        return [self.feature_names_.index(c) for c in self.categorical_]


@functools.cache
def _value_codes(feature_names: tuple[str, ...]) -> tuple:
    """(name, level → code or None) per feature, for :meth:`PatientEncoder.transform_values`."""
    return tuple(
        (name, {level: float(k) for k, level in enumerate(COLUMNS_BY_NAME[name].levels)}
         if COLUMNS_BY_NAME[name].dtype == "category" else None)
        for name in feature_names
    )


def _plan_counts() -> tuple[np.ndarray, np.ndarray]:
    m = plan_matrix()
    drug = np.array([c in DRUG for c in COMPONENT_CODES])
    return m.sum(1), m[:, drug].sum(1)


def effect_basis() -> tuple[np.ndarray, tuple[str, ...]]:
    """(839, K) basis through which a plan changes expected improvement.

    Columns: each component scaled by the evidence combination factor (so a component's
    coefficient is its single-use effect; §3.3 sub-additivity), plus plan-size terms whose
    patient-dependent coefficients absorb adherence loss and any departure from that rule.
    The empty plan would be all zeros: coefficients are effects versus usual care.
    """
    m = plan_matrix().astype(float)
    k, n_drug = _plan_counts()
    scaled = m * combination_factor(k)[:, None]
    size = np.column_stack([k >= 2, k >= 3, k >= 4, n_drug >= 2]).astype(float)
    names = tuple(COMPONENT_CODES) + ("size>=2", "size>=3", "size>=4", "two_drugs")
    return np.hstack([scaled, size]), names


def burden_basis(component_effects: np.ndarray) -> np.ndarray:
    """(n, 839) patient-dependent basis column: (plan size − 1) × the plan's expected effect.

    Adherence falls as plans grow (clinical-evidence §4, Cherkin 2016 attendance) and what is
    lost is a share of the benefit, so the loss is proportional to the effect itself: a
    patient who responds strongly to one component loses more by diluting it. An additive
    size term cannot express that; this column's coefficient can (its value is learned).
    """
    m = plan_matrix().astype(float)
    k = m.sum(1)
    weights = m * combination_factor(k)[:, None]  # (839, 12)
    return (k - 1)[None, :] * (np.asarray(component_effects, float) @ weights.T)


def ae_basis() -> tuple[np.ndarray, tuple[str, ...]]:
    """(839, K) basis of the adverse-event log-odds: intercept, components, class pairs."""
    m = plan_matrix().astype(float)
    idx = {c: i for i, c in enumerate(COMPONENT_CODES)}
    cns = m[:, [idx[c] for c in CNS_DRUGS]].sum(1)
    bleeding = m[:, idx[BLEEDING_PAIR[0]]] * m[:, idx[BLEEDING_PAIR[1]]]
    _, n_drug = _plan_counts()
    extra = np.column_stack([cns >= 2, bleeding, n_drug >= 2]).astype(float)
    names = ("baseline",) + tuple(COMPONENT_CODES) + ("two_cns_drugs", "nsaid+snri", "two_drugs")
    return np.hstack([np.ones((len(PLANS), 1)), m, extra]), names

