"""The plan-outcome model: for any patients × plans, expected improvement (PEG points at 12
weeks), an 80 % interval, P(response), P(adverse event) and utility (CONTRACT §4).

Method (why it looks like this)
-------------------------------
*Plans share strength through their components.* Improvement is modelled as

    E[Y | x, a] = m(x) + (ψ(a) − e(x)) · τ(x)

where ψ(a) is the fixed plan basis of :func:`features.encode.effect_basis` (components with the
evidence combination factor, plus plan-size terms), τ(x) are per-patient coefficient functions
learned by a gradient-boosted varying-coefficient model, m(x) = E[Y | x] and
e(x) = E[ψ(A) | x] under the clinicians' logging policy. This is the Robinson / R-learner
decomposition with a vector treatment (Nie & Wager 2021; Chernozhukov et al. 2018):

* **Confounding.** Clinicians give sicker patients more aggressive plans. Fitting τ on
  ``Y − m̂(x)`` against ``ψ(a) − ê(x)`` with cross-fitted nuisances makes the loss
  Neyman-orthogonal, so the treatment coefficients are not absorbed by (or biased through)
  the patient features that drove the choice. ê(x) is the component-level propensity model
  of the logging policy; :mod:`recommender.propensity` models the full plan propensity for
  off-policy evaluation and overlap diagnostics. ``orthogonalize=False`` fits the naive joint
  model instead, which the evaluation reports side by side.
* **Thin data lean on the evidence.** τ starts from the evidence prior
  (:mod:`features.priors`, clinical-evidence §3.3) and trees only add corrections that survive
  L2 leaf shrinkage and early stopping on held-out loss. Where ψ(a) is nearly determined by x
  (no overlap) the orthogonalised basis is ~0, so the data carry no information and τ stays at
  the prior rather than extrapolating noise.
* **Pooled effect modifiers.** Besides the static plan basis, ψ(x, a) has columns for the
  clinical-evidence §4 modifiers whose direction the sheet gives but not the size (the
  patient's own history with a component, history with the other components of its kind,
  PHQ-9 band for CBT/MBSR, neuropathic features for gabapentinoids/SNRIs;
  :mod:`features.modifiers`). Each has *one* coefficient shared by all components, estimated
  from every episode — per-component trees cannot find heterogeneity this size in noisy
  outcomes, a pooled term can (30k simulated episodes: normalized value 0.77 → 0.91).
* **Trees must earn their place.** Trees are kept only when their held-out gain exceeds one
  standard error of the paired loss difference (:class:`recommender.boosting.
  VaryingCoefficientBooster`); otherwise τ is the prior plus the exactly solved linear part.
* **Adverse events** use the same machinery with a logistic loss: logit P(AE) = ψ_AE(a) · β(x),
  starting from the §5.1 rates.
* **Intervals** are split-conformal (normalised by a learned residual scale) on a held-out,
  patient-grouped calibration split; ``p_response`` comes from the same predictive distribution,
  so interval, response probability and expectation never disagree.

Scoring 839 plans for one patient costs one tree pass per booster plus small matrix products.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import lightgbm as lgb
import numpy as np
import pandas as pd
from scipy.special import ndtr
from scipy.stats import norm
from sklearn.base import BaseEstimator
from sklearn.model_selection import GroupKFold, GroupShuffleSplit

from features.catalog import COMPONENT_CODES, N_PLANS, PLAN_INDEX, plan_matrix
from features.encode import (
    PatientEncoder,
    ae_basis,
    burden_basis,
    effect_basis,
    schema_fingerprint,
)
from features.modifiers import MODIFIERS, modifier_terms
from features.priors import AE_PRIOR, prior_effects, prior_effects_encoded
from features.schema import PEG, RESPONDER_FRACTION
from recommender.boosting import VaryingCoefficientBooster

log = logging.getLogger(__name__)

# Background probability of a treatment-limiting adverse event under usual care (A); the
# baseline coefficient starts here and the data correct it.
_BACKGROUND_AE = 0.02
_N_COMPONENTS = len(COMPONENT_CODES)
_NUISANCE_MAX_ROWS = 50_000


def _predict(regressor, X: np.ndarray) -> np.ndarray:
    """``LGBMRegressor.predict`` straight from its booster: the same trees and numbers, without
    the sklearn wrapper's per-call parameter handling (get_params, deepcopy), which cost
    1.5–4 ms per call — more than scoring a patient's 839 plans (bench/results/servers.md)."""
    booster = getattr(regressor, "booster_", None)
    return regressor.predict(X) if booster is None else booster.predict(X)


def _logit(p):
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


@dataclass
class PlanEstimates:
    """Estimates for n patients × P plans (``plan_index`` says which plans, catalog order)."""

    plan_index: np.ndarray
    expected_improvement: np.ndarray
    improvement_low: np.ndarray
    improvement_high: np.ndarray
    p_response: np.ndarray
    p_adverse_event: np.ndarray
    utility: np.ndarray


class PlanOutcomeModel(BaseEstimator):
    """Estimate outcomes of every plan for every patient from logged episodes.

    Parameters
    ----------
    lambda_ae : float, default=2.0
        Utility weight of P(adverse event), in PEG points (CONTRACT §4).
    interval_level : float, default=0.8
        Coverage of ``improvement_low``/``improvement_high``.
    use_prior : bool, default=True
        Start the coefficients from the evidence prior (else from zero).
    orthogonalize : bool, default=True
        Residualise outcome and plan basis on the logging policy (R-learner). False fits the
        naive joint model — kept for the evaluation's ablation, not for production.
    n_folds : int, default=2
        Cross-fitting folds for the nuisance models m(x) and e(x).
    validation_fraction : float, default=0.2
        Patient-grouped share held out for early stopping and conformal calibration.
    learning_rate, num_leaves, min_data_in_leaf, lambda_l2, max_rounds : boosting settings.
    tree_gain_se : float, default=1.0
        The effect and adverse-event trees are kept only if their held-out loss gain exceeds
        this many standard errors (see ``VaryingCoefficientBooster.tree_gain_se``); 0 keeps
        whatever early stopping keeps.
    n_jobs : int, default=2
    random_state : int, default=0
    engine : object, optional
        Where the LightGBM learners are fitted; None (default) fits them in this process. An
        engine provides ``regressor(**params)`` (an unfitted estimator whose ``fit`` returns a
        fitted ``LGBMRegressor``) and ``train_booster`` (see ``VaryingCoefficientBooster.
        trainer``), e.g. ``training.dask_learners.DaskLearners``. Fit-time only: training
        clears it before the model is saved.
    """

    def __init__(
        self,
        *,
        lambda_ae: float = 2.0,
        interval_level: float = 0.8,
        use_prior: bool = True,
        orthogonalize: bool = True,
        n_folds: int = 2,
        validation_fraction: float = 0.2,
        learning_rate: float = 0.1,
        num_leaves: int = 7,
        min_data_in_leaf: int = 40,
        lambda_l2: float = 10.0,
        max_rounds: int = 400,
        tree_gain_se: float = 1.0,
        n_jobs: int = 2,
        random_state: int = 0,
        engine=None,
    ):
        self.lambda_ae = lambda_ae
        self.interval_level = interval_level
        self.use_prior = use_prior
        self.orthogonalize = orthogonalize
        self.n_folds = n_folds
        self.validation_fraction = validation_fraction
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.min_data_in_leaf = min_data_in_leaf
        self.lambda_l2 = lambda_l2
        self.max_rounds = max_rounds
        self.tree_gain_se = tree_gain_se
        self.n_jobs = n_jobs
        self.random_state = random_state
        self.engine = engine

    # ------------------------------------------------------------------ fitting

    def _booster(self, loss: str, **overrides) -> VaryingCoefficientBooster:
        kw = dict(
            loss=loss,
            learning_rate=self.learning_rate,
            num_leaves=self.num_leaves,
            min_data_in_leaf=self.min_data_in_leaf,
            lambda_l2=self.lambda_l2,
            max_rounds=self.max_rounds,
            tree_gain_se=self.tree_gain_se,
            n_jobs=self.n_jobs,
            random_state=self.random_state,
        )
        if self.engine is not None:
            kw["trainer"] = self.engine.train_booster
        kw.update(overrides)
        return VaryingCoefficientBooster(**kw)

    def _regressor(self) -> lgb.LGBMRegressor:
        make = lgb.LGBMRegressor if self.engine is None else self.engine.regressor
        return make(
            n_estimators=200,
            learning_rate=0.05,
            num_leaves=self.num_leaves,
            min_child_samples=self.min_data_in_leaf,
            reg_lambda=1.0,
            subsample=0.8,
            subsample_freq=1,
            n_jobs=self.n_jobs,
            random_state=self.random_state,
            verbose=-1,
        )

    def _burden(self, patients: pd.DataFrame, plan_index: np.ndarray | None = None, *,
                prior: np.ndarray | None = None) -> np.ndarray:
        """(n, P) burden column of the effect basis for the given plans (all by default)."""
        plans = np.arange(N_PLANS) if plan_index is None else np.asarray(plan_index)
        prior = prior_effects(patients) if prior is None else prior
        return burden_basis(prior)[:, plans]

    @property
    def n_modifiers_(self) -> int:
        """Number of pooled-modifier outputs (:mod:`features.modifiers`; 0 for models fitted
        before they existed)."""
        return len(self.effect_names_) - self.effect_basis_.shape[1] - 1

    def _modifiers(self, X: np.ndarray, prior: np.ndarray) -> np.ndarray | None:
        if not self.n_modifiers_:
            return None
        return modifier_terms(X, self.encoder_.feature_names_, prior)

    def _logged_basis(self, X: np.ndarray, prior: np.ndarray, plan_idx: np.ndarray) -> np.ndarray:
        """(n, K) effect basis of each row's own plan (``prior``: the rows' evidence prior):
        the static columns, the burden and the pooled-modifier columns (see
        :meth:`plan_basis`)."""
        static = self.effect_basis_[plan_idx]
        weights = static[:, :_N_COMPONENTS]
        size = plan_matrix()[plan_idx].sum(1)
        columns = [static, ((size - 1) * (weights * prior).sum(1))[:, None]]
        modifiers = self._modifiers(X, prior)
        if modifiers is not None:
            columns.append(np.einsum("njc,nc->nj", modifiers, weights))
        return np.hstack(columns)

    def plan_basis(self, patients: pd.DataFrame, plan_index: np.ndarray,
                   prior: np.ndarray | None = None, X: np.ndarray | None = None) -> np.ndarray:
        """(n, P, K) the effect basis ψ(x, a) of the given plans for each patient, columns as
        ``effect_names_``: plan ψ(x, a)·τ(x) is the plan's effect versus usual care."""
        prior = prior_effects(patients) if prior is None else prior
        static = self.effect_basis_[np.asarray(plan_index)]
        n = len(prior)
        parts = [np.broadcast_to(static, (n, *static.shape)),
                 self._burden(patients, plan_index, prior=prior)[:, :, None]]
        X = self.encoder_.transform(patients) if X is None else X
        modifiers = self._modifiers(X, prior)
        if modifiers is not None:
            parts.append(np.einsum("njc,pc->npj", modifiers, static[:, :_N_COMPONENTS]))
        return np.concatenate(parts, axis=2)

    def _plan_effects(self, coef: dict, patients: pd.DataFrame, plan_index: np.ndarray) -> np.ndarray:
        """(n, P) ψ(x, a)·τ(x): each plan's effect versus usual care, without materialising
        the (n, P, K) basis: the pooled-modifier columns are component terms (their
        coefficient times each component's term), so they fold into the component coefficients
        before the one product with the plans."""
        tau, k = coef["tau"], self.effect_basis_.shape[1]
        prior = coef.get("prior")
        prior = prior_effects(patients) if prior is None else prior
        basis = self.effect_basis_[plan_index]
        components = tau[:, :_N_COMPONENTS]
        if self.n_modifiers_:
            modifiers = coef.get("modifiers")
            if modifiers is None:
                X = coef.get("X")
                X = self.encoder_.transform(patients) if X is None else X
                modifiers = self._modifiers(X, prior)
            components = components + np.einsum("nj,njc->nc", tau[:, k + 1:], modifiers)
        burden = self._burden(patients, plan_index, prior=prior)
        return (components @ basis[:, :_N_COMPONENTS].T
                + tau[:, _N_COMPONENTS:k] @ basis[:, _N_COMPONENTS:].T
                + tau[:, k:k + 1] * burden)

    def _prior_theta(self, patients: pd.DataFrame | None, prior: np.ndarray | None = None
                     ) -> np.ndarray:
        n = len(patients) if prior is None else len(prior)
        theta = np.zeros((n, len(self.effect_names_)))
        if self.use_prior:
            theta[:, :_N_COMPONENTS] = prior_effects(patients) if prior is None else prior
        return theta

    def _effect_design(self, n: int) -> np.ndarray:
        """Design of the coefficients' linear part: one constant per output (the average
        correction to the prior, solved exactly before the trees; see
        :func:`recommender.boosting.linear_shift`)."""
        k = len(self.effect_names_) + (0 if self.orthogonalize else 1)
        return np.ones((n, k, 1), dtype=np.float32)

    def _ae_design(self, n: int) -> np.ndarray:
        return np.ones((n, len(self.ae_names_), 1), dtype=np.float32)

    def _prior_ae(self, n: int) -> np.ndarray:
        beta = np.zeros((n, len(self.ae_names_)))
        beta[:, 0] = self.ae_intercept_
        if self.use_prior:
            beta[:, 1 : 1 + _N_COMPONENTS] = _logit(_BACKGROUND_AE + AE_PRIOR.to_numpy()) - _logit(
                _BACKGROUND_AE
            )
        return beta

    def fit(
        self,
        patients: pd.DataFrame,
        *,
        plans,
        improvement,
        adverse_event,
        groups=None,
        progress=None,
    ) -> PlanOutcomeModel:
        """Fit on logged episodes.

        ``patients`` is a validated patient/episode frame; ``plans`` canonical plan strings;
        ``improvement`` = peg − peg_12wk; ``adverse_event`` 0/1; ``groups`` patient ids so no
        patient straddles a split. ``progress`` is an optional callable(str) for long fits.
        """
        say = progress or (lambda msg: log.info(msg))
        y = np.asarray(improvement, dtype=float)
        ae = np.asarray(adverse_event, dtype=float)
        plan_idx = np.array([PLAN_INDEX[p] for p in plans])
        groups = np.arange(len(y)) if groups is None else np.asarray(groups)
        n = len(y)

        self.encoder_ = PatientEncoder().fit(patients)
        self.schema_ = schema_fingerprint()
        X = self.encoder_.transform(patients)
        cat = self.encoder_.categorical_indices
        self.effect_basis_, names = effect_basis()
        self.effect_names_ = names + ("burden",) + MODIFIERS
        self.ae_basis_, self.ae_names_ = ae_basis()
        # once: the basis, θ0 and its mean reuse it; read from X as at inference
        prior = prior_effects_encoded(X, self.encoder_.feature_names_)
        Bf = self._logged_basis(X, prior, plan_idx)
        Ba = self.ae_basis_[plan_idx]

        if n >= 20:
            splitter = GroupShuffleSplit(
                n_splits=1, test_size=self.validation_fraction, random_state=self.random_state
            )
            tr, va = next(splitter.split(X, groups=groups))
        else:  # too small to hold anything out: fit on all, calibrate on all (flagged)
            tr = va = np.arange(n)
        self.n_train_, self.n_calibration_ = len(tr), len(va)

        # Nuisances m(x) = E[Y|x] and e(x) = E[ψ(A)|x], cross-fitted on the training split;
        # the calibration split gets the average of the fold models (it was never fitted on).
        m_hat = np.zeros(n)
        e_hat = np.zeros_like(Bf)
        self.m_models_, self.e_models_ = [], []
        if self.orthogonalize:
            say("fitting the logging-policy and baseline-outcome models (cross-fitted)")
            folds = min(self.n_folds, len(np.unique(groups[tr])))
            splits = (
                GroupKFold(n_splits=folds).split(tr, groups=groups[tr])
                if folds >= 2
                else [(np.arange(len(tr)), np.arange(len(tr)))]
            )
            rng = np.random.default_rng(self.random_state)
            for k, (a, b) in enumerate(splits):
                ia, ib = tr[a], tr[b]
                # Nuisances are smooth averages; past ~50k rows more data buys little accuracy
                # but linear time, so each fold model learns from a sample of its folds (its
                # predictions stay out-of-fold for every row it did not see).
                if len(ia) > _NUISANCE_MAX_ROWS:
                    ia = np.sort(rng.choice(ia, _NUISANCE_MAX_ROWS, replace=False))
                stop = ib[: _NUISANCE_MAX_ROWS // 4]
                m = self._regressor().fit(X[ia], y[ia], categorical_feature=cat)
                e = self._booster(
                    "multi_l2", random_state=self.random_state + k, learning_rate=0.2,
                    max_rounds=150, early_stopping_rounds=15, num_leaves=15,
                ).fit(X[ia], Bf[ia], validation={"X": X[stop], "y": Bf[stop]}, categorical=cat)
                m_hat[ib] = m.predict(X[ib])
                e_hat[ib] = e.predict_raw(X[ib])
                self.m_models_.append(m)
                self.e_models_.append(e)
            if not np.array_equal(tr, va):
                m_hat[va], e_hat[va] = self._nuisance(X[va])
        else:
            # Naive joint model: an intercept column in the basis instead of residualising.
            m_hat[:] = 0.0

        # Treatment coefficients τ(x), boosted from the evidence prior.
        say("fitting the treatment-effect model")
        prior_theta = self._prior_theta(patients, prior)
        theta0 = prior_theta
        B_eff, target = Bf - e_hat, y - m_hat
        if not self.orthogonalize:
            B_eff = np.hstack([np.ones((n, 1)), Bf])
            self.intercept0_ = float(y[tr].mean())
            theta0 = np.hstack([np.full((n, 1), self.intercept0_), theta0])
        # The average patient's prior, so explanations can split "what evidence expects for
        # everyone" (base value) from "what is different about this patient's condition".
        self.tau_prior_mean_ = prior_theta[tr].mean(0)
        Z = self._effect_design(len(X))
        self.effect_model_ = self._booster("l2").fit(
            X[tr],
            target[tr],
            B=B_eff[tr],
            theta0=theta0[tr],
            categorical=cat,
            Z=Z[tr],
            B_scale=(Bf if self.orthogonalize else B_eff)[tr],
            validation={"X": X[va], "y": target[va], "B": B_eff[va], "theta0": theta0[va],
                        "Z": Z[va]},
        )
        del Z

        # Adverse events: logit P(AE | x, a) = ψ_AE(a) · β(x), from the §5.1 rates.
        say("fitting the adverse-event model")
        self.ae_intercept_ = 0.0
        beta_prior = self._prior_ae(n)  # components only; the intercept is set just below
        self.ae_intercept_ = float(
            _logit(max(ae[tr].mean(), 1e-3)) - np.mean((Ba[tr, 1:] * beta_prior[tr, 1:]).sum(1))
        )
        beta0 = self._prior_ae(n)
        # Logistic hessians p(1-p) are ~4x smaller than the effect model's basis hessians, so
        # the same prior strength (≈ rows of evidence per leaf) needs a 4x smaller L2 penalty.
        Z = self._ae_design(len(X))
        self.ae_model_ = self._booster("logistic", lambda_l2=self.lambda_l2 / 4).fit(
            X[tr],
            ae[tr],
            B=Ba[tr],
            theta0=beta0[tr],
            categorical=cat,
            Z=Z[tr],
            validation={"X": X[va], "y": ae[va], "B": Ba[va], "theta0": beta0[va], "Z": Z[va]},
        )
        del Z

        # Residual scale and split-conformal calibration of the interval.
        say("calibrating intervals")
        fitted = self._expected_improvement_logged(X, patients, plan_idx)
        resid = np.abs(y - fitted)
        self.scale_model_ = self._regressor().fit(X[tr], resid[tr], categorical_feature=cat)
        scale_va = np.maximum(self.scale_model_.predict(X[va]), 0.05)
        scores = resid[va] / scale_va
        level = min(1.0, np.ceil((len(va) + 1) * self.interval_level) / len(va))
        self.conformal_q_ = float(np.quantile(scores, level, method="higher"))
        self.calibration_coverage_ = float(np.mean(scores <= self.conformal_q_))
        self.n_features_in_ = X.shape[1]
        self.feature_names_in_ = np.array(self.encoder_.feature_names_)
        return self

    # ------------------------------------------------------------------ inference

    def _nuisance(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not self.orthogonalize:
            return np.zeros(len(X)), np.zeros((len(X), len(self.effect_names_)))
        m = np.mean([_predict(mm, X) for mm in self.m_models_], axis=0)
        e = np.mean([em.predict_raw(X) for em in self.e_models_], axis=0)
        return m, e

    def _tau(self, X: np.ndarray, patients: pd.DataFrame | None,
             prior: np.ndarray | None = None) -> np.ndarray:
        theta0 = self._prior_theta(patients, prior)
        if not self.orthogonalize:
            theta0 = np.hstack([np.full((len(X), 1), self.intercept0_), theta0])
        return theta0 + self.effect_model_.predict_raw(X, self._effect_design(len(X)))

    def _expected_improvement_logged(self, X, patients, plan_idx) -> np.ndarray:
        coef = self.patient_coefficients(patients, X=X)
        Bf = self._logged_basis(X, coef["prior"], plan_idx)
        return coef["baseline"] + (Bf * coef["tau"]).sum(1)

    def patient_coefficients(self, patients: pd.DataFrame | None, X: np.ndarray | None = None
                             ) -> dict:
        """Per-patient quantities every plan's estimate is built from.

        ``baseline`` is E[Y | x, empty plan] = m(x) − e(x)·τ(x) (or the intercept of the naive
        model); ``tau`` the (n, K) effect coefficients; ``beta`` the (n, K_AE) adverse-event
        log-odds coefficients; ``scale`` the residual scale for intervals. With ``X`` (the
        encoded patients) the frame is not read and may be None.
        """
        X = self.encoder_.transform(patients) if X is None else X
        m, e = self._nuisance(X)
        # The evidence prior is computed once per call, from the encoded matrix: the
        # coefficients, the burden column and the explanations all reuse it (read from the
        # frame, it was the largest cost of a single request).
        prior = prior_effects_encoded(X, self.encoder_.feature_names_)
        tau = self._tau(X, patients, prior)
        if self.orthogonalize:
            baseline = m - (e * tau).sum(1)
        else:
            baseline, tau = tau[:, 0], tau[:, 1:]
        beta = self._prior_ae(len(X)) + self.ae_model_.predict_raw(X, self._ae_design(len(X)))
        scale = (
            np.maximum(_predict(self.scale_model_, X), 0.05)
            if hasattr(self, "scale_model_")
            else None
        )
        return {"X": X, "baseline": baseline, "tau": tau, "beta": beta, "scale": scale,
                "prior": prior, "modifiers": self._modifiers(X, prior)}

    def predict_plans(
        self, patients: pd.DataFrame | None, plan_index=None, *, coefficients: dict | None = None
    ) -> PlanEstimates:
        """Estimates for every patient × plan (all 839 plans unless ``plan_index`` is given).
        With ``coefficients`` from :meth:`patient_coefficients` the frame may be None."""
        self._check_fitted()
        plan_index = np.arange(N_PLANS) if plan_index is None else np.asarray(plan_index)
        coef = coefficients or self.patient_coefficients(patients)
        # the encoded PEG column (patient_coefficients always returns X): no pandas
        peg = coef["X"][:, self.encoder_.feature_names_.index(PEG), None]
        ei = coef["baseline"][:, None] + self._plan_effects(coef, patients, plan_index)
        # Improvement is bounded by the scale: peg_12wk ∈ [0, 10].
        ei = np.clip(ei, peg - 10.0, peg)
        half = (self.conformal_q_ * coef["scale"])[:, None]
        low, high = np.clip(ei - half, peg - 10, peg), np.clip(ei + half, peg - 10, peg)
        z = norm.ppf(0.5 + self.interval_level / 2)
        sigma = np.maximum(half / z, 1e-3)
        # ndtr(-z) is what norm.sf(z) computes, bit for bit, without scipy.stats' argument
        # handling around it (a quarter of batch scoring time; bench/results/batch.md).
        p_response = ndtr(-(((1 - RESPONDER_FRACTION) * peg - ei) / sigma))
        p_ae = 1.0 / (1.0 + np.exp(-np.clip(coef["beta"] @ self.ae_basis_[plan_index].T, -30, 30)))
        return PlanEstimates(
            plan_index, ei, low, high, p_response, p_ae, ei - self.lambda_ae * p_ae
        )

    def component_effects(self, patients: pd.DataFrame) -> np.ndarray:
        """(n, 12) estimated single-component effect on improvement vs usual care."""
        coef = self.patient_coefficients(patients)
        singles = np.array([PLAN_INDEX[code] for code in COMPONENT_CODES])
        return self._plan_effects(coef, patients, singles)

    def _check_fitted(self) -> None:
        if not hasattr(self, "effect_model_"):
            raise ValueError("PlanOutcomeModel is not fitted; call fit() first")
