"""From the MLflow registry to a running HTTP service, without importing the service.

``training/`` never imports :mod:`recommender.service` (nor ``bentoml``; DESIGN.md), so
everything here talks to the serving side through subprocesses:

* :func:`import_into_serving_store` downloads a registered version and runs
  ``python -m recommender.service import-model``, which verifies it and puts it into
  BentoML's model store (called by :func:`training.register.promote` for every champion);
* :func:`serve` (``painplan serve``) makes sure the champion is in the store, then runs
  ``bentoml serve recommender.service:PainPlan`` with the champion's explicit tag.

``BENTOML_HOME`` defaults to ``$PAINPLAN_HOME/bentoml`` here, so a fresh clone keeps the
MLflow store, the BentoML store and the audit database side by side in one directory.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from features.errors import ConfigError, ModelError, ModelNotFound
from training.tracking import painplan_home

log = logging.getLogger(__name__)

SERVICE = "recommender.service:PainPlan"
READY_TIMEOUT_S = 180.0
IMPORT_TIMEOUT_S = 600.0


def serving_env(environ: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The environment for serving subprocesses: the caller's, with BentoML's home under
    the painplan home unless set, and BentoML's usage analytics off (a clinical service
    should not phone home)."""
    env = dict(os.environ if environ is None else environ)
    env.setdefault("BENTOML_HOME", str(painplan_home() / "bentoml"))
    env.setdefault("BENTOML_DO_NOT_TRACK", "true")
    env.update(extra)
    return env


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def import_bundle(
    bundle_dir: str | os.PathLike,
    *,
    version: str,
    run_id: str | None,
    registered_name: str = "painplan",
) -> str:
    """Run ``python -m recommender.service import-model`` on a bundle; return the tag."""
    cmd = [
        sys.executable,
        "-m",
        "recommender.service",
        "import-model",
        "--bundle",
        str(bundle_dir),
        "--version",
        str(version),
        "--registered-name",
        registered_name,
    ]
    if run_id:
        cmd += ["--run-id", run_id]
    try:
        proc = subprocess.run(
            cmd,
            env=serving_env(),
            capture_output=True,
            text=True,
            timeout=IMPORT_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        raise ModelError(
            f"importing {registered_name} version {version} into the BentoML store took "
            f"more than {IMPORT_TIMEOUT_S:.0f} s; check the disk under BENTOML_HOME."
        ) from err
    if proc.returncode != 0:
        raise ModelError(
            f"{registered_name} version {version} could not be put into the BentoML model "
            f"store: {_last_line(proc.stderr)}"
        )
    return _last_line(proc.stdout)


def import_into_serving_store(model_name: str, version: str, run_id: str | None = None) -> str:
    """Download registered version ``version`` of ``model_name`` and import it into
    BentoML's store (idempotent); return its tag. Needs ``configure_tracking`` first."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from training.pyfunc import BUNDLE_ARTIFACT

    uri = f"models:/{model_name}/{version}"
    with tempfile.TemporaryDirectory(prefix="painplan-serving-") as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        except MlflowException as err:
            raise ModelNotFound(
                f"cannot download {uri} to serve it ({' '.join(str(err).split())[:200]}); "
                "check that MLFLOW_TRACKING_URI / PAINPLAN_HOME point at its registry."
            ) from err
        bundle_dir = local / "artifacts" / BUNDLE_ARTIFACT
        if not bundle_dir.is_dir():
            bundle_dir = local  # a bare bundle directory
        tag = import_bundle(bundle_dir, version=version, run_id=run_id, registered_name=model_name)
    log.info("%s version %s is in the BentoML store as %s", model_name, version, tag)
    return tag


def champion_tag(model_name: str = "painplan") -> str:
    """The BentoML tag of the registered champion, importing it first when needed."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from training.register import CHAMPION
    from training.tracking import configure_tracking

    configure_tracking()
    try:
        mv = mlflow.MlflowClient().get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException as err:
        raise ModelNotFound(
            f"model {model_name!r} has no champion to serve. Train and promote one with "
            "'painplan train --data FILE --promote' (or run 'painplan demo'), or pass "
            "--model-tag to serve a model already in the BentoML store."
        ) from err
    return import_into_serving_store(model_name, str(mv.version), mv.run_id)


@dataclass(frozen=True)
class ServeConfig:
    """``painplan serve`` options."""

    host: str = "127.0.0.1"
    port: int = 3000
    model_tag: str | None = None  # default: the champion's tag
    model_name: str = "painplan"
    workers: int = 1

    def __post_init__(self):
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"--port must be between 1 and 65535, got {self.port}")
        if self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"


def start_server(
    config: ServeConfig, tag: str, environ: Mapping[str, str] | None = None, **popen_kwargs
) -> subprocess.Popen:
    """Start ``bentoml serve`` for ``tag`` (returns at once; see :func:`wait_ready`)."""
    env = serving_env(
        environ,
        PAINPLAN_MODEL_TAG=tag,
        PAINPLAN_HOME=str(painplan_home()),
        # Worker count is BentoML service configuration; this is its documented override.
        BENTOML_CONFIG_OPTIONS=f"services.painplan.workers={config.workers}",
    )
    cmd = [
        sys.executable,
        "-m",
        "bentoml",
        "serve",
        SERVICE,
        "--host",
        config.host,
        "--port",
        str(config.port),
    ]
    log.info("starting %s", " ".join(cmd))
    return subprocess.Popen(cmd, env=env, start_new_session=True, **popen_kwargs)


def wait_ready(
    url: str,
    proc: subprocess.Popen,
    timeout: float = READY_TIMEOUT_S,
    on_wait: Callable[[float], None] | None = None,
) -> float:
    """Poll ``/readyz`` until 200; returns seconds waited. Raises ModelError when the
    server exits first (it printed why) or does not get ready in time."""
    start = time.monotonic()
    while True:
        code = proc.poll()
        if code is not None:
            raise ModelError(
                f"the service exited with code {code} before it was ready; its message is "
                "above (e.g. a missing API key or HMAC key, or a model that failed "
                "verification)."
            )
        try:
            if httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass  # not listening yet
        waited = time.monotonic() - start
        if waited > timeout:
            stop_server(proc)
            raise ModelError(
                f"the service at {url} was not ready after {timeout:.0f} s; see its log above."
            )
        if on_wait is not None:
            on_wait(waited)
        time.sleep(0.5)


def stop_server(proc: subprocess.Popen, timeout: float = 20.0) -> int | None:
    """Stop a server started by :func:`start_server` (its whole process group)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)
        except ProcessLookupError:
            pass
    return proc.returncode


class _Stop(Exception):
    """SIGTERM/SIGHUP arrived while waiting for the server."""


def _raise_stop(signum, _frame):
    raise _Stop(signum)


def run_until_stopped(proc: subprocess.Popen) -> int:
    """Wait for the server; Ctrl-C, SIGTERM or SIGHUP stop it (it runs in its own session,
    so it would otherwise outlive this process). Returns its exit code (0 when stopped)."""
    previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return proc.wait()
    except (KeyboardInterrupt, _Stop):
        stop_server(proc)
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def resolve_tag(config: ServeConfig) -> str:
    """``--model-tag``, else ``PAINPLAN_MODEL_TAG``, else the champion's tag."""
    return (
        config.model_tag
        or os.environ.get("PAINPLAN_MODEL_TAG", "").strip()
        or champion_tag(config.model_name)
    )
