"""``painplan train --engine dask``: the model's LightGBM learners, fitted with ``lightgbm.dask``.

:class:`DaskLearners` is the *engine* handed to :class:`recommender.model.PlanOutcomeModel`
and :class:`recommender.propensity.LoggingPolicyModel` (their ``engine=`` parameter). The models
keep their structure, cross-fitting, prior, calibration and evaluation; only the LightGBM
fits move to the cluster:

* ``regressor(**params)`` / ``classifier(**params)`` — the nuisance regressors m(x), the
  residual-scale model and the chain-rule logging-policy classifier — are
  ``lightgbm.dask.DaskLGBMRegressor`` / ``DaskLGBMClassifier`` with exactly the local
  parameters, converted back with ``.to_local()``: the fitted attribute is a plain
  ``lightgbm.LGBMRegressor``/``LGBMClassifier``, so a bundle never needs Dask.
* ``train_booster(...)`` runs the multi-output, custom-objective
  :class:`recommender.boosting.VaryingCoefficientBooster` fits (e(x), τ(x), β(x)) as one
  data-parallel ``DaskLGBMRegressor`` fit. This works because the plan-level loss is a sum
  over rows: each row's gradient and Hessian need only that row's basis, target, offset,
  weight and prior θ0. ``lightgbm.dask`` hands a custom objective only ``(y_true, y_pred)``
  of the worker's local rows, so the per-row design travels as follows: every row block of X
  is scattered to one worker and its design block is put into that worker process's memory
  (``client.run``, synchronous, never moved by the scheduler); the label of a row is its
  *block number*; the objective (:class:`_WorkerLoss`) decodes the block order from the labels
  and reads the matching design blocks. θ0 is added inside the objective instead of being
  passed as ``init_score``, which gives the same gradients.
* Early stopping needs the loss on the held-out rows after every round, computed identically
  on every worker (otherwise workers stop at different rounds and LightGBM's collective
  hangs, lightgbm-org/LightGBM#6351). The validation rows are put on every worker; :class:`_ValidationLoss`, a
  LightGBM callback, predicts them with the round's trees and appends the loss to the round's
  evaluation list, so the *same* ``lgb.early_stopping`` callback as the local fit stops all
  workers at the same round. The driver then replays the curve through the caller's own
  callbacks (filling ``history_`` and checking the stopping round).

What stays on the driver: encoding, the cross-fitting splits, the exact linear shift of the
coefficients (:func:`recommender.boosting.linear_shift`, a small dense solve), conformal
calibration, evaluation and MLflow. The driver holds the training table, as in the local path;
the cluster does the tree building. On one 2-core machine that is slower than a single process
(worker start-up, data transfer and socket collectives; see ``docs/scale-out.md``); it pays off
when the workers are separate machines.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from typing import Any

import lightgbm as lgb
import numpy as np

log = logging.getLogger(__name__)

_KEY_PREFIX = "painplan-design"
# lightgbm >= 4.7 callbacks read named fields; older versions take the plain tuple.
_EvalResult = getattr(lgb, "EvalResult", lambda *fields: tuple(fields))
# Parameters lightgbm.dask sets itself (threads per worker, the network) or that describe the
# local process only.
_DROPPED = ("num_threads", "n_jobs", "nthread", "num_thread", "nthreads", "objective")


def _block_bounds(n: int, n_blocks: int) -> list[tuple[int, int]]:
    n_blocks = max(1, min(n_blocks, n))
    edges = np.linspace(0, n, n_blocks + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def _decode_blocks(labels: np.ndarray) -> list[tuple[int, int]]:
    """Run-length decode the block numbers a worker's rows carry: [(block, rows), …]."""
    ids = np.asarray(labels).round().astype(np.int64)
    if ids.size == 0:
        return []
    cut = np.flatnonzero(np.diff(ids)) + 1
    starts = np.r_[0, cut]
    lengths = np.diff(np.r_[starts, ids.size])
    return [(int(ids[s]), int(k)) for s, k in zip(starts, lengths, strict=True)]


# Per-process store of the design blocks and validation data a worker's fits need, filled by
# ``client.run(_store, …, workers=[…])`` before a fit and emptied after. Plain process memory:
# synchronous to fill, never moved or spilled by the scheduler behind LightGBM's back.
_REGISTRY: dict[str, Any] = {}


def _store(items: dict) -> None:
    _REGISTRY.update(items)


def _drop(prefix: str) -> None:
    for key in [k for k in _REGISTRY if k.startswith(prefix)]:
        del _REGISTRY[key]


def _local_value(key: str) -> Any:
    """A value stored on this worker for the current fit."""
    try:
        return _REGISTRY[key]
    except KeyError:
        raise RuntimeError(
            f"{key} is not stored on this Dask worker: the scheduler moved a row block away "
            "from the worker its design was sent to (was a worker restarted or added during "
            "the fit?); retry the fit"
        ) from None


class _WorkerLoss:
    """The plan-level objective on a worker's rows (a LightGBM sklearn custom objective).

    ``y_true`` holds block numbers (see module doc); the design of each block is read from
    worker memory once, on the first call, and kept for the following rounds.
    """

    def __init__(self, loss: str, token: str, n_outputs: int):
        self.loss, self.token, self.n_outputs = loss, token, n_outputs
        self._design = None
        self._theta0 = None

    def __getstate__(self) -> dict:  # ship (and return) the recipe, never a worker's rows
        return {**self.__dict__, "_design": None, "_theta0": None}

    def _resolve(self, y_true: np.ndarray) -> None:
        from recommender.boosting import _Design

        blocks = []
        for block, rows in _decode_blocks(y_true):
            part = _local_value(f"{_KEY_PREFIX}-{self.token}-{block}")
            if len(part["y"]) != rows:
                raise RuntimeError(
                    f"design block {block} has {len(part['y'])} rows, the "
                    f"worker's data {rows}: the row blocks were split"
                )
            blocks.append(part)

        def cat(name):
            if blocks[0][name] is None:
                return None
            return np.concatenate([b[name] for b in blocks])

        self._design = _Design(cat("B"), cat("y"), cat("offset"), cat("weight"))
        self._theta0 = cat("theta0")

    def __call__(self, y_true: np.ndarray, y_pred: np.ndarray):
        from recommender.boosting import _grad_hess  # the very gradient the local fit uses

        if self._design is None:
            self._resolve(y_true)
        theta = self._theta0 + np.asarray(y_pred).reshape(len(y_true), self.n_outputs)
        return _grad_hess(self.loss, self._design, theta)


class _ValidationLoss:
    """LightGBM callback: the held-out loss after each round, identical on every worker.

    Runs before the stopping callbacks (``order`` 5) and appends ``("valid_0", "loss", …)`` to
    the round's evaluation list, exactly what ``lgb.train`` would have put there with the
    local path's ``valid_sets``/``feval``. The curve is left on the booster for the driver.
    """

    order = 5
    before_iteration = False

    def __init__(self, loss: str, key: str, n_outputs: int):
        self.loss, self.key, self.n_outputs = loss, key, n_outputs
        self._valid = None
        self._pred = None
        self.curve: list[float] = []

    def __call__(self, env) -> None:
        from recommender.boosting import _loss_value

        if self._valid is None:
            self._valid = _local_value(self.key)
            self._pred = np.array(self._valid["theta0"], dtype=float, copy=True)
        X = self._valid["X"]
        step = env.model.predict(X, raw_score=True, start_iteration=env.iteration, num_iteration=1)
        self._pred += np.asarray(step).reshape(len(X), self.n_outputs)
        value = _loss_value(self.loss, self._valid["design"], self._pred)
        self.curve.append(float(value))
        env.model.painplan_valid_curve = self.curve  # returned with the master's booster
        env.evaluation_result_list.append(_EvalResult("valid_0", "loss", value, False))


class _DaskFit:
    """An unfitted learner whose ``fit`` runs on the cluster and returns the local model."""

    def __init__(self, engine: DaskLearners, dask_class, params: dict):
        self.engine, self.dask_class, self.params = engine, dask_class, params

    def fit(self, X, y, **fit_params):
        dX, dy = self.engine.distribute(np.asarray(X), np.asarray(y))
        # Threads per worker are Dask's business; the local model gets the caller's n_jobs
        # back, so it predicts exactly like a locally fitted one.
        params = {k: v for k, v in self.params.items() if k not in _DROPPED}
        model = self.dask_class(client=self.engine.client, **params)
        fitted = model.fit(dX, dy, **fit_params).to_local()
        if "n_jobs" in self.params:
            fitted.set_params(n_jobs=self.params["n_jobs"])
        return fitted


def _lightgbm_logs_to_logging() -> None:
    """Route LightGBM's messages (C++ "[LightGBM] [Info] Listening…" and Python "Finding
    random open ports…") to the ``lightgbm`` logger instead of stdout, where the CLI prints
    its result. Runs on the driver and on every worker."""
    logger = logging.getLogger("lightgbm")
    if logger.level == logging.NOTSET:  # its INFO lines are LightGBM's networking chatter
        logger.setLevel(logging.WARNING)
    if not any(isinstance(f, _NJobsNoise) for f in logger.filters):
        logger.addFilter(_NJobsNoise())
    lgb.register_logger(logger)


class _NJobsNoise(logging.Filter):
    """lightgbm.dask warns "Parameter n_jobs will be ignored." on every fit, because the
    sklearn estimators always carry an ``n_jobs`` (threads are set per Dask worker instead)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "n_jobs will be ignored" not in record.getMessage()


class DaskLearners:
    """Fit-time engine: LightGBM learners of the painplan models on a Dask cluster.

    Parameters
    ----------
    client : distributed.Client
        Connected client (see :func:`training.dask_cluster.cluster`).
    blocks_per_worker : int, default=1
        Row blocks per worker. One block per worker sends each row once; more blocks let the
        scheduler balance uneven workers at the cost of more tasks.
    progress : callable(str), optional
    """

    def __init__(
        self, client, *, blocks_per_worker: int = 1, progress: Callable[[str], None] | None = None
    ):
        self.client = client
        self.blocks_per_worker = blocks_per_worker
        self.say = progress or log.info
        _lightgbm_logs_to_logging()
        client.run(_lightgbm_logs_to_logging)

    @property
    def workers(self) -> list[str]:
        return sorted(self.client.scheduler_info()["workers"])

    # ------------------------------------------------------------------ data placement

    def _placed_blocks(self, n: int) -> list[tuple[int, int, str]]:
        workers = self.workers
        bounds = _block_bounds(n, len(workers) * self.blocks_per_worker)
        return [(a, b, workers[i % len(workers)]) for i, (a, b) in enumerate(bounds)]

    def distribute(self, *arrays: np.ndarray, blocks=None) -> list:
        """Row blocks of ``arrays`` scattered to the workers, as Dask arrays (same chunks);
        block ``i`` of every array lives on the worker ``blocks[i]`` names."""
        import dask
        import dask.array as da

        blocks = blocks or self._placed_blocks(len(arrays[0]))
        chunks: list[list] = [[] for _ in arrays]
        for a, b, worker in blocks:
            futures = self.client.scatter(
                [arr[a:b] for arr in arrays], workers=[worker], hash=False
            )
            for j, (arr, fut) in enumerate(zip(arrays, futures, strict=True)):
                chunks[j].append(
                    da.from_delayed(dask.delayed(fut), (b - a, *arr.shape[1:]), dtype=arr.dtype)
                )
        return [da.concatenate(c) for c in chunks]

    # ------------------------------------------------------------------ the engine protocol

    def regressor(self, **params) -> _DaskFit:
        from lightgbm.dask import DaskLGBMRegressor

        return _DaskFit(self, DaskLGBMRegressor, params)

    def classifier(self, **params) -> _DaskFit:
        from lightgbm.dask import DaskLGBMClassifier

        return _DaskFit(self, DaskLGBMClassifier, params)

    def train_booster(
        self,
        params: dict,
        train_set: lgb.Dataset,
        *,
        num_boost_round: int,
        valid_sets: list,
        callbacks: list,
        loss: str,
        design,
        valid_design=None,
        feval=None,
    ) -> lgb.Booster:
        """``lgb.train`` for a :class:`recommender.boosting.VaryingCoefficientBooster`, on the
        cluster: same parameters, same per-row objective, same stopping callbacks."""
        from lightgbm.callback import CallbackEnv, EarlyStopException
        from lightgbm.dask import DaskLGBMRegressor

        X = np.asarray(train_set.data)
        n = X.shape[0]
        n_outputs = int(params["num_class"])
        theta0 = np.asarray(train_set.init_score, dtype=float).reshape(n, n_outputs)
        token = secrets.token_hex(6)

        prefix = f"{_KEY_PREFIX}-{token}-"
        blocks = self._placed_blocks(n)
        for i, (a, b, worker) in enumerate(blocks):
            self.client.run(
                _store,
                {
                    f"{prefix}{i}": {
                        "B": None if design.B is None else design.B[a:b],
                        "y": design.y[a:b],
                        "offset": design.offset[a:b],
                        "weight": design.weight[a:b],
                        "theta0": theta0[a:b],
                    }
                },
                workers=[worker],
            )
        labels = np.concatenate([np.full(b - a, float(i)) for i, (a, b, _) in enumerate(blocks)])
        dX, dlabel = self.distribute(X, labels, blocks=blocks)

        worker_callbacks: list = []
        if valid_sets:
            valid = valid_sets[0]
            nv = np.asarray(valid.data).shape[0]
            self.client.run(
                _store,
                {
                    f"{prefix}valid": {
                        "X": np.asarray(valid.data),
                        "theta0": np.asarray(valid.init_score, dtype=float).reshape(nv, n_outputs),
                        "design": valid_design,
                    }
                },
            )
            worker_callbacks = [_ValidationLoss(loss, f"{prefix}valid", n_outputs), *callbacks]
        local = {k: v for k, v in params.items() if k not in _DROPPED}
        model = DaskLGBMRegressor(
            client=self.client,
            objective=_WorkerLoss(loss, token, n_outputs),
            n_estimators=num_boost_round,
            metric="None",
            **local,
        )
        try:
            model.fit(
                dX,
                dlabel,
                categorical_feature=train_set.categorical_feature,
                callbacks=worker_callbacks or None,
            )
        finally:
            self.client.run(_drop, prefix)
        booster = model.booster_
        booster.best_iteration = 0
        curve = booster.__dict__.pop("painplan_valid_curve", None)
        if valid_sets and curve:
            # Replay the curve through the caller's callbacks: fills their record (history_)
            # and re-derives the stopping round the workers used.
            for it, value in enumerate(curve):
                env = CallbackEnv(
                    model=booster,
                    params=params,
                    iteration=it,
                    begin_iteration=0,
                    end_iteration=num_boost_round,
                    evaluation_result_list=[_EvalResult("valid_0", "loss", value, False)],
                )
                try:
                    for cb in sorted(callbacks, key=lambda c: getattr(c, "order", 0)):
                        cb(env)
                except EarlyStopException as stop:
                    booster.best_iteration = stop.best_iteration + 1
                    break
        return booster


def detach(*models) -> None:
    """Drop every engine reference from fitted models, so a saved bundle never refers to a
    cluster (or needs ``training/`` or Dask to unpickle): ``engine`` parameters and the
    ``trainer`` of every :class:`recommender.boosting.VaryingCoefficientBooster` inside."""
    from recommender.boosting import VaryingCoefficientBooster

    def clear(obj, seen):
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, VaryingCoefficientBooster):
            obj.trainer = None
        elif isinstance(obj, list | tuple):
            for item in obj:
                clear(item, seen)
        elif hasattr(obj, "engine"):
            obj.engine = None
            for value in vars(obj).values():
                clear(value, seen)

    seen: set[int] = set()
    for model in models:
        clear(model, seen)
