"""Ranking: a pure function from estimates and eligibility to ranked plans. No I/O.

Order: higher utility first. Ties (equal utility to the last bit) go to the plan with fewer
components, then to the alphabetically first canonical spelling — that is, catalog order
(:data:`features.catalog.PLANS` is sorted by size, then spelling), which a stable sort keeps.
Plans not allowed by the safety rules are never ranked.
"""

from __future__ import annotations

import numpy as np


def rank_plans(utility: np.ndarray, allowed: np.ndarray, top_k: int) -> np.ndarray:
    """Column indices of the ``top_k`` best allowed plans per row, best first.

    ``utility`` and ``allowed`` are (n, P) arrays over the same plan columns (in catalog
    order). Rows with fewer than ``top_k`` allowed plans are padded with -1.
    """
    if utility.shape != allowed.shape:
        raise ValueError(f"utility {utility.shape} and allowed {allowed.shape} differ in shape")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    k = min(top_k, utility.shape[1])
    key = np.where(allowed, -utility, np.inf)
    order = np.argsort(key, axis=1, kind="stable")[:, :k]
    ok = np.take_along_axis(allowed, order, axis=1)
    return np.where(ok, order, -1)
