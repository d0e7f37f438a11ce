"""Gradient-boosted *varying-coefficient* models on LightGBM.

A varying-coefficient model writes the target as ``offset + Σ_j B[i, j] · θ_j(x_i)``: a known
basis ``B`` (here: which components a plan contains) times coefficient functions ``θ_j`` of
the patient's features, each a sum of trees. LightGBM grows one tree per output per round
when given ``num_class = K`` and a custom objective, so one booster learns all K coefficient
functions jointly from the gradient of the *plan-level* loss. Two things follow:

* scoring a patient against every plan is one tree pass for θ(x) and a (K × plans) product;
* ``pred_contrib`` gives exact TreeSHAP values per coefficient, and a plan's SHAP values are
  the same linear combination ``B[plan] @ φ`` — explanations and contrasts add up exactly.

Boosting starts from ``theta0`` (the evidence prior), and L2 leaf regularisation plus early
stopping on held-out loss keep the coefficients there unless the data say otherwise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import lightgbm as lgb
import numpy as np

log = logging.getLogger(__name__)

Loss = Literal["l2", "logistic", "multi_l2"]
_EPS = 1e-6


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))


@dataclass
class _Design:
    B: np.ndarray | None  # (n, K) basis, None for multi_l2
    y: np.ndarray  # (n,) or (n, K) for multi_l2
    offset: np.ndarray  # (n,)
    weight: np.ndarray  # (n,)


def _link(design: _Design, theta: np.ndarray) -> np.ndarray:
    return design.offset + (design.B * theta).sum(1)


def _grad_hess(loss: Loss, design: _Design, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w = design.weight[:, None]
    if loss == "multi_l2":
        return w * (theta - design.y), np.broadcast_to(w, theta.shape).copy()
    eta = _link(design, theta)
    # The true Hessian of a plan-level loss in θ is rank one (b bᵀ · curvature); LightGBM only
    # takes a diagonal. Using b_j² alone lets every correlated output take a full Newton step
    # at once and overshoot. The Gershgorin majoriser |b_j| Σ_k |b_k| bounds b bᵀ from above,
    # so the joint step never overshoots (a Jacobi-preconditioned, monotone update).
    absB = np.abs(design.B)
    major = absB * absB.sum(1, keepdims=True) + _EPS
    if loss == "l2":
        r = eta - design.y
        return w * design.B * r[:, None], w * major
    p = _sigmoid(eta)
    return w * design.B * (p - design.y)[:, None], w * major * (p * (1 - p))[:, None] + _EPS


def _loss_value(loss: Loss, design: _Design, theta: np.ndarray) -> float:
    w = design.weight
    if loss == "multi_l2":
        return float(np.average(((theta - design.y) ** 2).mean(1), weights=w))
    eta = _link(design, theta)
    if loss == "l2":
        return float(np.average((eta - design.y) ** 2, weights=w))
    p = np.clip(_sigmoid(eta), 1e-9, 1 - 1e-9)
    return float(np.average(-(design.y * np.log(p) + (1 - design.y) * np.log(1 - p)), weights=w))


def constant_shift(loss: Loss, design: _Design, theta0: np.ndarray, prior_rows: float,
                   n_iter: int = 8) -> np.ndarray:
    """Population-average correction δ (K,) to θ0, by ridge-penalised Newton steps.

    Boosting with a diagonal Hessian moves correlated outputs slowly and jointly; the average
    part of each coefficient (e.g. "plans of four components lose adherence") is a small
    dense problem, so it is solved exactly first and the trees only learn how coefficients
    vary between patients. The ridge pulls δ toward 0 (= the prior) with the weight of
    ``prior_rows`` typical episodes per coefficient.
    """
    B, w = design.B, design.weight
    K = B.shape[1]
    scale = np.maximum(np.average(B**2, axis=0, weights=w), 1e-6)
    delta = np.zeros(K)
    for _ in range(1 if loss == "l2" else n_iter):
        eta = _link(design, theta0 + delta)
        if loss == "l2":
            g, h = B.T @ (w * (eta - design.y)), np.ones(len(w))
        else:
            p = _sigmoid(eta)
            g, h = B.T @ (w * (p - design.y)), p * (1 - p)
        penalty = prior_rows * np.mean(h * w) * scale
        H = (B * (w * h)[:, None]).T @ B + np.diag(penalty)
        step = np.linalg.solve(H, g + penalty * delta)
        delta = delta - step
        if np.max(np.abs(step)) < 1e-6:
            break
    return delta


@dataclass
class VaryingCoefficientBooster:
    """Fit θ(x) in ``target ≈ offset + B·θ(x)`` (or θ(x) ≈ Y for ``multi_l2``).

    Parameters mirror LightGBM's; ``early_stopping_rounds`` uses the validation set given to
    :meth:`fit`. With fewer than ``min_rows`` training rows no trees are grown and θ = θ0.
    """

    loss: Loss = "l2"
    learning_rate: float = 0.05
    num_leaves: int = 15
    min_data_in_leaf: int = 40
    lambda_l2: float = 10.0
    feature_fraction: float = 0.9
    max_rounds: int = 400
    early_stopping_rounds: int = 30
    min_rows: int = 50
    prior_rows: float = 50.0
    n_jobs: int = 2
    random_state: int = 0
    booster_: lgb.Booster | None = field(default=None, repr=False)
    n_outputs_: int | None = None
    best_iteration_: int = 0
    history_: dict = field(default_factory=dict, repr=False)

    def fit(
        self,
        X: np.ndarray,
        y: np.ndarray,
        *,
        B: np.ndarray | None = None,
        theta0: np.ndarray | None = None,
        offset: np.ndarray | None = None,
        weight: np.ndarray | None = None,
        validation: dict | None = None,
        categorical: list[int] | None = None,
    ) -> VaryingCoefficientBooster:
        n = X.shape[0]
        K = y.shape[1] if self.loss == "multi_l2" else B.shape[1]
        self.n_outputs_ = K
        theta0 = np.zeros((n, K)) if theta0 is None else theta0
        train = _Design(
            B,
            y,
            np.zeros(n) if offset is None else offset,
            np.ones(n) if weight is None else weight,
        )
        self.shift_ = np.zeros(K)
        if self.loss != "multi_l2" and n >= K:
            self.shift_ = constant_shift(self.loss, train, theta0, self.prior_rows)
        theta0 = theta0 + self.shift_
        if n < self.min_rows:
            log.info("only %d rows: keeping the prior coefficients (no trees grown)", n)
            self.booster_ = None
            return self

        def fobj(preds, _data):
            theta = preds.reshape(n, K)
            return _grad_hess(self.loss, train, theta)

        params = {
            "objective": fobj,
            "num_class": K,
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "min_data_in_leaf": self.min_data_in_leaf,
            "min_sum_hessian_in_leaf": 1e-3,
            "lambda_l2": self.lambda_l2,
            "feature_fraction": self.feature_fraction,
            "num_threads": self.n_jobs,
            "seed": self.random_state,
            "deterministic": True,
            "force_row_wise": True,
            "verbose": -1,
            "max_cat_to_onehot": 8,
            "min_data_per_group": 50,
            "cat_smooth": 20,
        }
        ds = lgb.Dataset(
            X,
            label=np.zeros(n),
            init_score=theta0,
            free_raw_data=True,
            categorical_feature=categorical or "auto",
            params={"verbose": -1},
        )
        valid_sets, feval, callbacks = [], None, []
        if validation is not None:
            Xv = validation["X"]
            nv = Xv.shape[0]
            vdesign = _Design(
                validation.get("B"),
                validation["y"],
                validation.get("offset", np.zeros(nv)),
                validation.get("weight", np.ones(nv)),
            )
            dv = lgb.Dataset(
                Xv,
                label=np.zeros(nv),
                init_score=validation.get("theta0", np.zeros((nv, K))) + self.shift_,
                reference=ds,
                categorical_feature=categorical or "auto",
            )
            valid_sets = [dv]

            def feval(preds, _data):
                return "loss", _loss_value(self.loss, vdesign, preds.reshape(nv, K)), False

            callbacks = [
                lgb.early_stopping(self.early_stopping_rounds, verbose=False),
                lgb.record_evaluation(self.history_),
            ]
        self.booster_ = lgb.train(
            params,
            ds,
            num_boost_round=self.max_rounds,
            valid_sets=valid_sets,
            feval=feval,
            callbacks=callbacks,
        )
        self.best_iteration_ = self.booster_.best_iteration or self.booster_.current_iteration()
        return self

    def predict_raw(self, X: np.ndarray) -> np.ndarray:
        """(n, K) learned correction to θ0 (add the caller's θ0 to get θ): the constant
        shift plus the trees."""
        shift = np.broadcast_to(self.shift_, (X.shape[0], self.n_outputs_))
        if self.booster_ is None or self.best_iteration_ == 0:
            return shift.copy()
        out = self.booster_.predict(X, raw_score=True, num_iteration=self.best_iteration_)
        return shift + np.asarray(out).reshape(X.shape[0], self.n_outputs_)

    def contributions(self, X: np.ndarray) -> np.ndarray:
        """(n, K, d + 1) TreeSHAP values of the correction; the last slot is the expected
        value (including the constant shift, which belongs to no feature)."""
        n, d = X.shape
        out = np.zeros((n, self.n_outputs_, d + 1))
        if self.booster_ is not None and self.best_iteration_ > 0:
            c = self.booster_.predict(X, pred_contrib=True, num_iteration=self.best_iteration_)
            out = np.asarray(c).reshape(n, self.n_outputs_, d + 1).copy()
        out[:, :, d] += self.shift_
        return out
