"""Off-policy estimates of a policy's value from logged episodes (IPS, SNIPS, DR).

Estimators follow Open Bandit Pipeline's definitions (zr-obp ``obp/ope/estimators.py``):
the reward is the realised utility ``r = improvement − λ·adverse_event``; ``p_logged`` is the
logging probability of the plan actually given; a target policy is given by the probability
it assigns to the logged plan (1/0 for a deterministic top-1 policy) and, for DR, by the
model's estimate of its expected reward. Confidence intervals are percentile bootstraps over
episodes (seeded). With 839 plans a deterministic policy rarely matches the logged plan, so
the effective sample size is reported and estimates with too little support are flagged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_ESS = 30.0


@dataclass(frozen=True)
class OPEResult:
    ips: float
    snips: float
    dr: float
    ips_ci: tuple[float, float]
    snips_ci: tuple[float, float]
    dr_ci: tuple[float, float]
    ess: float
    match_rate: float
    evaluable: bool

    def as_metrics(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}_ips": self.ips, f"{prefix}_snips": self.snips, f"{prefix}_dr": self.dr,
               f"{prefix}_dr_ci_low": self.dr_ci[0], f"{prefix}_dr_ci_high": self.dr_ci[1],
               f"{prefix}_ips_ci_low": self.ips_ci[0], f"{prefix}_ips_ci_high": self.ips_ci[1],
               f"{prefix}_snips_ci_low": self.snips_ci[0], f"{prefix}_snips_ci_high": self.snips_ci[1],
               f"{prefix}_ess": self.ess, f"{prefix}_match_rate": self.match_rate,
               f"{prefix}_evaluable": float(self.evaluable)}
        return out


def _estimates(w: np.ndarray, r: np.ndarray, q_target: np.ndarray, q_logged: np.ndarray):
    ips = np.mean(w * r, axis=-1)
    sw = np.sum(w, axis=-1)
    snips = np.where(sw > 0, np.sum(w * r, axis=-1) / np.where(sw > 0, sw, 1), np.nan)
    dr = np.mean(q_target + w * (r - q_logged), axis=-1)
    return ips, snips, dr


def off_policy_value(reward: np.ndarray, p_logged: np.ndarray, p_target_logged: np.ndarray,
                     q_target: np.ndarray, q_logged: np.ndarray, *, n_boot: int = 300,
                     seed: int = 0) -> OPEResult:
    """IPS, SNIPS and DR value of a target policy, with bootstrap 95 % intervals.

    ``p_target_logged[i]`` = π_e(a_i | x_i); ``q_target[i]`` = Σ_a π_e(a|x_i) q̂(x_i, a);
    ``q_logged[i]`` = q̂(x_i, a_i).
    """
    r = np.asarray(reward, float)
    w = np.asarray(p_target_logged, float) / np.asarray(p_logged, float)
    qt, ql = np.asarray(q_target, float), np.asarray(q_logged, float)
    ips, snips, dr = _estimates(w, r, qt, ql)
    rng = np.random.default_rng(seed)
    n = len(r)
    boots = []
    for chunk in np.array_split(np.arange(n_boot), max(1, n_boot * n // 5_000_000)):
        idx = rng.integers(0, n, size=(len(chunk), n))
        boots.append(np.column_stack(_estimates(w[idx], r[idx], qt[idx], ql[idx])))
    b = np.vstack(boots)

    def ci(col):
        v = b[:, col][np.isfinite(b[:, col])]
        return (float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975))) if len(v) else (np.nan, np.nan)

    ess = float(w.sum() ** 2 / np.sum(w**2)) if np.any(w > 0) else 0.0
    return OPEResult(float(ips), float(snips), float(dr), ci(0), ci(1), ci(2), ess,
                     float(np.mean(p_target_logged > 0)), ess >= MIN_ESS)
