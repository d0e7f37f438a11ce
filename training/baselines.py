"""Baseline policies every model is compared with, on the same patients in the same run.

* guideline rules — clinical-evidence §6 (:mod:`recommender.guideline`), through the same
  safety rules as the model;
* clinicians as logged — the logging policy itself (its realised utility);
* random allowed — uniform over the plans the safety rules allow;
* plain S-learner — one LightGBM regressor and one classifier on [patient features,
  12 component indicators], no propensity model and no prior: the textbook approach the
  model has to beat (Künzel et al. 2019).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import lightgbm as lgb
import numpy as np
import pandas as pd

from features.catalog import N_PLANS, PLAN_INDEX, plan_matrix
from features.encode import PatientEncoder
from recommender.guideline import guideline_scores
from recommender.ranking import rank_plans


def guideline_ranking(patients: pd.DataFrame, allowed: np.ndarray, top_k: int = 5,
                      profile: str = "US_ACP_CDC") -> np.ndarray:
    """Guideline top-k among safety-allowed plans; falls back to any allowed plan by catalog
    order when no guideline plan is allowed (so every patient gets a choice)."""
    scores = guideline_scores(patients, profile)
    usable = allowed & np.isfinite(scores)
    scores = np.where(usable, scores, -1e6)  # unusable-but-allowed plans rank last
    return rank_plans(scores, allowed, top_k)


@dataclass
class SLearner:
    """Plain LightGBM S-learner on patient features + component indicators."""

    n_estimators: int = 300
    learning_rate: float = 0.05
    num_leaves: int = 31
    lambda_ae: float = 2.0
    n_jobs: int = 2
    random_state: int = 0
    encoder_: PatientEncoder | None = field(default=None, repr=False)

    def _design(self, X: np.ndarray, plan_index: np.ndarray) -> np.ndarray:
        return np.hstack([X, plan_matrix()[plan_index].astype(float)])

    def fit(self, patients: pd.DataFrame, plans, improvement, adverse_event) -> SLearner:
        self.encoder_ = PatientEncoder().fit(patients)
        X = self.encoder_.transform(patients)
        Z = self._design(X, np.array([PLAN_INDEX[p] for p in plans]))
        kw = dict(n_estimators=self.n_estimators, learning_rate=self.learning_rate,
                  num_leaves=self.num_leaves, n_jobs=self.n_jobs,
                  random_state=self.random_state, verbose=-1)
        self.outcome_ = lgb.LGBMRegressor(**kw).fit(Z, np.asarray(improvement, float))
        self.ae_ = lgb.LGBMClassifier(**kw).fit(Z, np.asarray(adverse_event, int))
        return self

    def utility(self, patients: pd.DataFrame) -> np.ndarray:
        """(n, 839) estimated utility of every plan."""
        X = self.encoder_.transform(patients)
        n = len(X)
        Z = self._design(np.repeat(X, N_PLANS, axis=0), np.tile(np.arange(N_PLANS), n))
        ei = self.outcome_.predict(Z).reshape(n, N_PLANS)
        p_ae = self.ae_.predict_proba(Z)[:, 1].reshape(n, N_PLANS)
        return ei - self.lambda_ae * p_ae

