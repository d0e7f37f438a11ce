"""Fixtures of the reliability tests (docs/reliability.md).

The machinery lives in ``reliability_harness.py`` (shared with ``bench/bench_fuzz.py`` and
``bench/bench_load.py``); this file loads it as the module ``reliability_harness``, so test
modules can ``import reliability_harness as H``.

* ``model`` — a small model (1500 simulated episodes) imported into BentoML's store. BentoML
  resolves its store once per process: when the serving tests' ``served`` fixture ran first
  (``pytest`` runs ``tests/recommender`` before ``tests/reliability``), its store is reused;
  otherwise this session sets ``BENTOML_HOME`` to a temporary directory.
* ``env_for(audit_url, **extra)`` — the environment of a service using that model.
* ``asgi(env)`` — the service in-process (Starlette TestClient over ``PainPlan.to_asgi()``,
  lifespan included). The ASGI app is one per process (BentoML registers Prometheus
  metrics once), shared with ``tests/recommender/conftest.py`` when that is loaded.
* ``start_server(env, …)`` — ``bentoml serve`` subprocesses, always stopped afterwards.
* ``throwaway_pg`` — a private PostgreSQL cluster the tests may crash and restart.
* ``tiny_run`` — one small ``training.pipeline.run`` into a temporary MLflow store, on a
  CSV with a byte-order mark, sentinel patient ids and names, and label-leakage columns.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest


def _load_harness():
    name = "reliability_harness"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, Path(__file__).with_name("reliability_harness.py")
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


H = _load_harness()


@dataclass(frozen=True)
class Model:
    bundle_dir: Path
    bentoml_home: Path
    home: Path
    tag: str


@pytest.fixture(scope="session")
def model(tmp_path_factory) -> Model:
    root = tmp_path_factory.mktemp("reliability")
    mp = pytest.MonkeyPatch()
    if not os.environ.get("BENTOML_HOME"):
        mp.setenv("BENTOML_HOME", str(root / "bentoml"))
    mp.setenv("BENTOML_DO_NOT_TRACK", "true")
    bundle = H.train_bundle(root / "bundle")
    tag, bentoml_home = H.import_here(bundle, version="71")
    yield Model(bundle, bentoml_home, root / "home", tag)
    mp.undo()


@pytest.fixture(scope="session")
def env_for(model):
    def make(audit_url: str, **extra: str | None) -> dict[str, str]:
        return H.service_env(
            bentoml_home=model.bentoml_home,
            home=model.home,
            tag=model.tag,
            audit_url=audit_url,
            **extra,
        )

    return make


_APP: list = []
_RECOMMENDER_CONFTEST = Path(__file__).resolve().parents[1] / "recommender" / "conftest.py"


def _shared_app():
    """The process's one ASGI app: the serving tests' if their conftest is loaded (it then
    owns the app whichever suite starts first), else ours."""
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and hasattr(module, "_app") and Path(path).resolve() == _RECOMMENDER_CONFTEST:
            return module._app()
    if not _APP:
        from recommender.service import PainPlan

        _APP.append(PainPlan.to_asgi())
    return _APP[0]


@contextlib.contextmanager
def _asgi_client(env: dict[str, str]):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Starlette's TestClient announces httpx2
        from starlette.testclient import TestClient

    mp = pytest.MonkeyPatch()
    for key in H._SCRUB:
        mp.delenv(key, raising=False)
    for key, value in env.items():
        mp.setenv(key, value)
    try:
        # Server exceptions become 500 answers, as over HTTP (the fuzzer counts them).
        with TestClient(_shared_app(), raise_server_exceptions=False) as client:
            yield client
    finally:
        mp.undo()


@pytest.fixture(scope="session")
def asgi(model):
    """``asgi(env)`` → context manager yielding a TestClient of the service."""
    return _asgi_client


@pytest.fixture
def start_server(tmp_path):
    """``start_server(env, log=…, port=…, ready=True)`` → a started :class:`H.Server`;
    every server started is stopped at teardown."""
    started: list = []

    def start(env, *, log: str = "server.log", port: int | None = None, ready: bool = True):
        server = H.Server(env, tmp_path / log, port=port).start()
        started.append(server)
        if ready:
            server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def throwaway_pg():
    """A private PostgreSQL cluster (initdb + pg_ctl on a free port), removed at the end.
    Tests that stop it must start it again."""
    pg = H.ThrowawayPostgres()
    try:
        pg.start()
        yield pg
    finally:
        pg.close()


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path.as_posix()}"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One ``training.pipeline.run`` (400 episodes, 30 rounds) into a temporary MLflow
    store. The CSV is written by Excel's rules (UTF-8 with a byte-order mark), carries the
    sentinel patient id in every ``patient_id``, a ``name`` column of free text, and two
    label-leakage columns (``peg_12wk_copy``, ``improvement``)."""
    import functools

    from training.config import ModelParams, TrainConfig
    from training.simulate import simulate_episodes

    root = tmp_path_factory.mktemp("tiny-run")
    home = root / "home"
    episodes = simulate_episodes(400, seed=5, progress=False)
    episodes["patient_id"] = H.SENTINEL_ID + "-" + episodes["patient_id"].astype(str)
    episodes["episode_id"] = "EP-SENTINEL-" + episodes["episode_id"].astype(str)
    episodes["name"] = [f"{H.SENTINEL_NAME} #{i}" for i in range(len(episodes))]
    episodes["peg_12wk_copy"] = episodes["peg_12wk"]
    episodes["improvement"] = episodes["peg"] - episodes["peg_12wk"]
    data = root / "episodes.csv"
    episodes.to_csv(data, index=False, encoding="utf-8-sig")
    assert data.read_bytes().startswith(b"\xef\xbb\xbf")

    import training.evaluate as evaluation
    from training.baselines import SLearner
    from training.pipeline import run

    messages: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PAINPLAN_HOME", str(home))
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{(home / 'mlflow.db').as_posix()}")
        mp.delenv("PAINPLAN_ARTIFACT_ROOT", raising=False)
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        mp.setattr(evaluation, "SLearner", functools.partial(SLearner, n_estimators=50, n_jobs=1))
        result = run(
            TrainConfig(data=str(data), seed=0, model=ModelParams(max_rounds=30, n_jobs=1)),
            progress=messages.append,
        )
    return {"root": root, "home": home, "data": data, "episodes": episodes, "result": result,
            "messages": messages}
