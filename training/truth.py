"""Ground truth from the simulator (``painplan simulate --truth``) and the metrics it allows.

The truth file is long (patient_id, plan, expected_improvement, p_adverse_event, utility,
floor_allowed); its patients sit beside it in ``<stem>_patients<suffix>``. Oracle and random
baselines are taken over the plans the *contract floor* allows, so normalized value is
comparable across models whatever stricter rules a model adds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from features.catalog import COMPONENT_CODES, N_PLANS, PLAN_INDEX
from features.errors import ContractError
from features.io import read_table
from features.validate import validate

LAMBDA_AE = 2.0


@dataclass
class TruthSet:
    patients: pd.DataFrame  # validated patient frame, row i ↔ matrices row i
    expected_improvement: np.ndarray  # (n, 839)
    p_adverse_event: np.ndarray  # (n, 839)
    floor_allowed: np.ndarray  # (n, 839) bool

    def utility(self, lambda_ae: float = LAMBDA_AE) -> np.ndarray:
        return self.expected_improvement - lambda_ae * self.p_adverse_event


def truth_patients_path(truth_path: str | Path) -> Path:
    p = Path(truth_path)
    return p.with_name(f"{p.stem}_patients{p.suffix}")


def load_truth(path: str | Path) -> TruthSet:
    """Read a truth file and its patients into dense (patients × 839) matrices."""
    long = read_table(path)
    needed = {"patient_id", "plan", "expected_improvement", "p_adverse_event", "floor_allowed"}
    missing = needed - set(long.columns)
    if missing:
        raise ContractError(f"{path}: truth file lacks column(s) {', '.join(sorted(missing))}; "
                            "write it with 'painplan simulate --truth FILE'")
    patients = validate(read_table(truth_patients_path(path)), "patients").frame
    row = pd.Index(patients["patient_id"]).get_indexer(long["patient_id"].astype(str))
    col = long["plan"].astype(str).map(PLAN_INDEX).to_numpy()
    if (row < 0).any() or pd.isna(col).any():
        raise ContractError(f"{path}: truth rows name patients or plans not in its patients file "
                            "or the catalog; regenerate both files together")
    col = col.astype(int)
    n = len(patients)
    if len(long) != n * N_PLANS:
        raise ContractError(f"{path}: expected {n} × {N_PLANS} truth rows, found {len(long)}")

    def dense(name, dtype=float):
        m = np.zeros((n, N_PLANS), dtype=dtype)
        values = long[name]
        if dtype is bool:
            values = values.astype(str).str.lower().isin(["true", "1", "yes"])
        m[row, col] = pd.to_numeric(values).to_numpy() if dtype is not bool else values.to_numpy()
        return m

    return TruthSet(patients, dense("expected_improvement"), dense("p_adverse_event"),
                    dense("floor_allowed", bool))


def policy_value(truth_utility: np.ndarray, choice: np.ndarray) -> np.ndarray:
    """Per-patient true utility of the chosen plan (catalog index per patient)."""
    return truth_utility[np.arange(len(choice)), choice]


def normalized_value(truth: TruthSet, choice: np.ndarray, lambda_ae: float = LAMBDA_AE) -> dict:
    """Value, oracle, random-allowed, normalized value and regret of a top-1 policy."""
    u = truth.utility(lambda_ae)
    allowed = truth.floor_allowed
    v = policy_value(u, choice).mean()
    oracle = np.where(allowed, u, -np.inf).max(1).mean()
    rand = (np.where(allowed, u, 0).sum(1) / np.maximum(allowed.sum(1), 1)).mean()
    return {"value": float(v), "oracle_value": float(oracle), "random_allowed_value": float(rand),
            "normalized_value": float((v - rand) / (oracle - rand)), "regret": float(oracle - v)}


def ndcg_at_k(truth_utility: np.ndarray, allowed: np.ndarray, ranking: np.ndarray, k: int = 5) -> float:
    """Mean NDCG@k of a ranking against true utilities (gains rescaled to [0, 1] per patient
    over the allowed plans, so the metric is insensitive to each patient's utility offset)."""
    u = np.where(allowed, truth_utility, np.nan)
    lo, hi = np.nanmin(u, 1, keepdims=True), np.nanmax(u, 1, keepdims=True)
    gain = np.nan_to_num((u - lo) / np.maximum(hi - lo, 1e-9), nan=0.0)
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    top = ranking[:, :k]
    got = np.where(top >= 0, np.take_along_axis(gain, np.maximum(top, 0), 1), 0.0) @ disc[: top.shape[1]]
    ideal = -np.sort(-gain, axis=1)[:, :k] @ disc
    return float(np.mean(np.where(ideal > 0, got / np.maximum(ideal, 1e-12), 1.0)))


def component_pehe(truth: TruthSet, estimated_effects: np.ndarray) -> float:
    """√PEHE of single-component effects, compared as within-patient contrasts.

    The truth only gives plans, not "no treatment", so each side is centred per patient over
    the twelve single-component plans: the error measures how well the model orders and
    spaces the components for that patient, independent of the patient's baseline.
    """
    single = [PLAN_INDEX[c] for c in COMPONENT_CODES]
    true = truth.expected_improvement[:, single]
    true = true - true.mean(1, keepdims=True)
    est = estimated_effects - estimated_effects.mean(1, keepdims=True)
    return float(np.sqrt(np.mean((true - est) ** 2)))


def plan_pehe(truth: TruthSet, estimated_improvement: np.ndarray) -> float:
    """√PEHE over all 839 plans, centred per patient (error of plan-vs-plan contrasts)."""
    t = truth.expected_improvement - truth.expected_improvement.mean(1, keepdims=True)
    e = estimated_improvement - estimated_improvement.mean(1, keepdims=True)
    return float(np.sqrt(np.mean((t - e) ** 2)))
