"""Training data: read and validate an episode file, check it can train a model, split it.

The split keeps every patient on one side (a patient's episodes are correlated: seeing one
in training and another in test would overstate accuracy), either at random (``group``) or
by time (``temporal``: the patients who entered the cohort last form the test set, which is
how a model meets new patients after deployment).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupShuffleSplit

from features.errors import ConfigError, ContractError
from features.io import read_table
from features.schema import ADVERSE_EVENT, PATIENT_ID, PEG, PEG_12WK, PLAN, START_DATE
from features.validate import validate
from training.config import TrainConfig

log = logging.getLogger(__name__)


def file_hash(path: str | Path) -> str:
    """SHA-256 of the file's bytes (verifiable with ``sha256sum``), as ``sha256:<hex>``."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def load_episodes(path: str | Path) -> tuple[pd.DataFrame, list[str], str]:
    """Read and validate an episode file (CONTRACT §3).

    Returns ``(frame, warnings, data_hash)``: the typed frame of
    :func:`features.validate.validate`, its warnings (e.g. ignored extra columns), and the
    file's :func:`file_hash`. Raises :class:`ContractError` listing every violation.
    """
    raw = read_table(path)
    result = validate(raw, "episodes")
    warnings = list(result.warnings) + outcome_warnings(result.frame)
    return result.frame, warnings, file_hash(path)


def outcome_warnings(frame: pd.DataFrame) -> list[str]:
    """Warnings (logged, and recorded with the run) for outcomes a model cannot learn from:
    no adverse event at all (or only adverse events), or the same improvement everywhere.
    Such files are valid and may be honest (a small clinic), so they are not refused."""
    out = []
    n = len(frame)
    events = int(frame[ADVERSE_EVENT].sum()) if n else 0
    if n and events in (0, n):
        out.append(
            f"adverse_event is {'true' if events else 'false'} in all {n} episodes: the "
            "adverse-event model cannot learn from this file how plans differ in risk; check "
            "the adverse_event column"
        )
    improvement = (frame[PEG] - frame[PEG_12WK]).to_numpy(dtype=float)
    if n > 1 and np.nanstd(improvement) == 0:
        out.append(
            f"every episode has the same improvement (peg - peg_12wk = {improvement[0]:g}): "
            "the outcome model learns nothing about plans from this file; check peg and "
            "peg_12wk"
        )
    for message in out:
        log.warning(message)
    return out


def check_trainable(frame: pd.DataFrame, config: TrainConfig) -> None:
    """Refuse data that cannot train a meaningful model, saying how to fix it."""
    n = len(frame)
    if n < config.min_episodes:
        raise ContractError(
            f"the episode file has {n} episode(s); training needs at least "
            f"{config.min_episodes} (setting min_episodes). Add episodes — a useful model needs "
            "thousands — or, for a smoke test only, lower min_episodes in the config file."
        )
    n_patients = frame[PATIENT_ID].nunique()
    if n_patients < 2:
        raise ContractError(
            f"all {n} episodes belong to one patient ({n_patients} distinct patient_id); the "
            "model is evaluated on patients it has not seen, so it needs episodes from many "
            "patients. Check that patient_id holds the patient, not a constant or the clinic."
        )
    plans = frame[PLAN].unique()
    if len(plans) < 2:
        raise ContractError(
            f"every episode has the same plan ({plans[0]!r}); the model learns how plans "
            "differ, so it needs episodes with at least two distinct plans. Check that the "
            "plan column holds the plan each patient actually received."
        )


def split(frame: pd.DataFrame, config: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """``(train_idx, test_idx)``: positional indices, each patient on one side only.

    ``config.split == "group"``: a seeded ``GroupShuffleSplit`` by patient with
    ``config.test_fraction`` of the patients in test. ``"temporal"``: patients ordered by
    their first ``start_date``; the latest are moved to test until it holds at least
    ``config.test_fraction`` of the episodes (a patient's later episodes stay with them, so
    a few training episodes may postdate the earliest test episode).
    """
    check_trainable(frame, config)
    groups = frame[PATIENT_ID].to_numpy()
    if config.split == "temporal":
        train_idx, test_idx = _temporal_split(frame, config.test_fraction)
    else:
        splitter = GroupShuffleSplit(
            n_splits=1, test_size=config.test_fraction, random_state=config.seed
        )
        train_idx, test_idx = next(splitter.split(np.zeros(len(frame)), groups=groups))
    n_train_patients = len(np.unique(groups[train_idx]))
    if len(train_idx) == 0 or len(test_idx) == 0 or n_train_patients < 2:
        # (the model holds out a patient of the training set for early stopping: with one
        # training patient it cannot, and fitting failed with a bare sklearn ValueError)
        raise ContractError(
            f"splitting {frame[PATIENT_ID].nunique()} patients with test_fraction "
            f"{config.test_fraction} leaves {n_train_patients} patient(s) for training and "
            f"{len(np.unique(groups[test_idx]))} for testing; training needs at least 2 and "
            "testing at least 1: add episodes from more patients."
        )
    log.info(
        "split (%s): %d training and %d test episodes", config.split, len(train_idx), len(test_idx)
    )
    return np.sort(train_idx), np.sort(test_idx)


def _temporal_split(frame: pd.DataFrame, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    dates = frame[START_DATE] if START_DATE in frame.columns else None
    if dates is None or dates.isna().all():
        raise ConfigError(
            "split: temporal needs the start_date column (ISO date of each episode), but the "
            "episode file has none; add start_date or use split: group in the config."
        )
    if dates.isna().any():
        raise ConfigError(
            f"split: temporal needs a start_date on every episode, but {int(dates.isna().sum())} "
            "episode(s) have none; fill them in, drop those episodes, or use split: group."
        )
    first = (
        pd.DataFrame({"patient": frame[PATIENT_ID].to_numpy(), "date": dates.to_numpy()})
        .groupby("patient", sort=True)
        .agg(first=("date", "min"), n=("date", "size"))
        .sort_values("first", kind="stable")  # ties broken by patient id (groupby sorted it)
    )
    target = test_fraction * len(frame)
    from_latest = first["n"].to_numpy()[::-1].cumsum()
    n_test_patients = int(np.searchsorted(from_latest, target) + 1)
    n_test_patients = min(n_test_patients, len(first) - 1)  # keep someone to train on
    test_patients = set(first.index[len(first) - n_test_patients :])
    in_test = frame[PATIENT_ID].isin(test_patients).to_numpy()
    return np.flatnonzero(~in_test), np.flatnonzero(in_test)


def pseudonymise(
    frame: pd.DataFrame, salt: str, columns: tuple[str, ...] = (PATIENT_ID, "episode_id")
) -> pd.DataFrame:
    """Copy of ``frame`` with identifier columns replaced by salted hashes.

    The same id maps to the same pseudonym within one salt (so episodes of a patient stay
    grouped and truth rows still join their patients), but without the salt — which callers
    keep in memory and never log — a pseudonym cannot be traced back by hashing guessed ids.
    """
    out = frame.copy()
    for name in columns:
        if name not in out.columns:
            continue
        prefix = "pid" if name == PATIENT_ID else name.split("_")[0][:3]
        ids = out[name].astype(str)
        mapping = {
            raw: f"{prefix}-{hashlib.sha256(f'{salt}:{raw}'.encode()).hexdigest()[:16]}"
            for raw in ids.unique()
        }
        out[name] = ids.map(mapping).astype(object)
    return out
