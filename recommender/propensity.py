"""A model of the clinicians' logging policy over all 839 plans.

A plan is a set of twelve yes/no choices, so its probability factorises exactly by the chain
rule: π(a | x) = Π_c P(a_c | x, a_1..a_{c-1}). One LightGBM classifier learns every factor
from a stacked table (one row per episode and component, with the earlier decisions and the
position as features). Nothing is assumed independent, and the probability of *any* plan —
logged, recommended or never seen — can be evaluated, which is what off-policy evaluation
(IPS, SNIPS, DR) and overlap diagnostics need.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import lightgbm as lgb
import numpy as np

from features.catalog import plan_matrix

_UNDECIDED = -1.0


def _stack(X: np.ndarray, plan_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One row per (episode, component position): [x, position, decisions so far]."""
    n, n_comp = plan_rows.shape
    pos = np.repeat(np.arange(n_comp)[None, :], n, axis=0).reshape(-1)
    decided = np.repeat(plan_rows[:, None, :].astype(float), n_comp, axis=1)  # (n, c, 12)
    mask = np.arange(n_comp)[None, :] >= np.arange(n_comp)[:, None]  # position c sees < c only
    decided = np.where(mask[None, :, :], _UNDECIDED, decided).reshape(n * n_comp, n_comp)
    Xs = np.hstack([np.repeat(X, n_comp, axis=0), pos[:, None].astype(float), decided])
    return Xs, plan_rows.reshape(-1).astype(float)


@dataclass
class LoggingPolicyModel:
    """Chain-rule classifier of the logging policy π_b(a | x)."""

    n_estimators: int = 150
    learning_rate: float = 0.1
    num_leaves: int = 31
    max_episodes: int = 40_000  # subsample above this: the chain table is 12 rows per episode
    clip: float = 1e-4
    n_jobs: int = 2
    random_state: int = 0
    # Where the classifier is fitted: None here, or an engine with ``classifier(**params)``
    # (training.dask_learners.DaskLearners). Fit-time only: training clears it before saving.
    engine: Any = field(default=None, repr=False, compare=False)
    model_: lgb.LGBMClassifier | None = field(default=None, repr=False)

    def fit(self, X: np.ndarray, plan_index: np.ndarray) -> LoggingPolicyModel:
        rng = np.random.default_rng(self.random_state)
        rows = np.arange(len(X))
        if len(rows) > self.max_episodes:
            rows = rng.choice(rows, self.max_episodes, replace=False)
        Xs, ys = _stack(X[rows], plan_matrix()[plan_index[rows]])
        make = lgb.LGBMClassifier if self.engine is None else self.engine.classifier
        self.model_ = make(
            n_estimators=self.n_estimators,
            learning_rate=self.learning_rate,
            num_leaves=self.num_leaves,
            min_child_samples=20,
            n_jobs=self.n_jobs,
            random_state=self.random_state,
            verbose=-1,
        ).fit(Xs, ys)
        return self

    def probability(self, X: np.ndarray, plan_index: np.ndarray) -> np.ndarray:
        """π̂_b(plan_index[i] | X[i]) for each row, clipped below at ``clip``."""
        if self.model_ is None:
            raise ValueError("LoggingPolicyModel is not fitted; call fit() first")
        rows = plan_matrix()[np.asarray(plan_index)]
        Xs, ys = _stack(X, rows)
        p1 = self.model_.predict_proba(Xs)[:, 1]
        p = np.where(ys == 1, p1, 1 - p1).reshape(len(X), rows.shape[1])
        return np.maximum(np.exp(np.log(np.maximum(p, 1e-12)).sum(1)), self.clip)
