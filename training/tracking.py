"""Where runs, models and artifacts are stored (CONTRACT §6 "storage defaults").

Layout with nothing configured (``PAINPLAN_HOME`` defaults to ``./.painplan`` under the
current directory, so a fresh checkout is self-contained and ``.gitignore``'d)::

    $PAINPLAN_HOME/
        mlflow.db                         MLflow tracking + model registry (SQLite)
        mlartifacts/<experiment>/         artifact root of each experiment painplan creates
            <run_id>/artifacts/...        run artifacts (model card, tables, SHAP, …)
            models/<model_id>/artifacts/  logged models (MLflow 3 LoggedModel)
        model-cache/                      verified copies of registered versions for
                                          'painplan recommend' (training.model_cache; safe
                                          to delete, PAINPLAN_MODEL_CACHE moves or disables it)

Environment:

* ``MLFLOW_TRACKING_URI`` — used as-is when set: ``sqlite:///…``, a database URL such as
  ``postgresql+psycopg://postgres@127.0.0.1:5432/painplan``, or an ``http(s)://`` tracking
  server.
* ``PAINPLAN_HOME`` — the project-local directory above.
* ``PAINPLAN_ARTIFACT_ROOT`` — artifact root for new experiments (a path or URI such as
  ``s3://bucket/painplan``); default ``$PAINPLAN_HOME/mlartifacts``.

For database stores (SQLite, PostgreSQL, …) the *client* writes artifacts, and MLflow's
fallback is ``./mlruns`` in whatever directory the command happens to run from; painplan
therefore gives each experiment it creates an explicit artifact location under the artifact
root. With an ``http(s)`` tracking server, the server decides (proxied artifacts).

Nothing here runs at import time: :func:`configure_tracking` is called by the pipeline and
the CLI.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from features.errors import ConfigError

log = logging.getLogger(__name__)

HOME_ENV = "PAINPLAN_HOME"
ARTIFACT_ROOT_ENV = "PAINPLAN_ARTIFACT_ROOT"
DEFAULT_HOME = ".painplan"
DB_FILE = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
_SERVER_SCHEMES = ("http", "https", "databricks", "databricks-uc", "uc")


def painplan_home() -> Path:
    """``$PAINPLAN_HOME`` or ``./.painplan``, as an absolute path (not created here)."""
    return Path(os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser().resolve()


def default_tracking_uri(home: Path | None = None) -> str:
    """The embedded SQLite store under the painplan home."""
    home = home or painplan_home()
    return f"sqlite:///{(home / DB_FILE).as_posix()}"


def artifact_root() -> str:
    """Root under which new experiments get their artifact location."""
    configured = os.environ.get(ARTIFACT_ROOT_ENV, "").strip()
    if not configured:
        return (painplan_home() / ARTIFACT_DIR).as_posix()
    if _scheme(configured) in ("", "file"):
        return Path(configured.removeprefix("file://")).expanduser().resolve().as_posix()
    return configured  # a URI (s3://, gs://, …): passed to MLflow untouched


def _scheme(uri: str) -> str:
    return uri.split(":", 1)[0].lower() if ":" in uri else ""


def is_server_uri(uri: str) -> bool:
    """A tracking server (which stores artifacts itself) rather than a database the client
    writes to directly."""
    return _scheme(uri) in _SERVER_SCHEMES


def tracking_uri() -> str:
    """The store :func:`configure_tracking` would use, without importing MLflow or creating
    anything: ``MLFLOW_TRACKING_URI`` when set (a file store is refused), else the SQLite
    store under :func:`painplan_home`."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        return default_tracking_uri()
    if _scheme(uri) in ("", "file"):
        raise ConfigError(
            f"MLFLOW_TRACKING_URI={uri!r} names a file store, which MLflow 3 no longer "
            "supports by default. Use a database URI such as "
            f"'sqlite:///{(painplan_home() / DB_FILE).as_posix()}' or "
            "'postgresql+psycopg://user@host:5432/db', or unset the variable to use "
            f"painplan's default store under {HOME_ENV} (./{DEFAULT_HOME})."
        )
    return uri


def configure_tracking() -> str:
    """Point MLflow (tracking and registry) at the configured store and return its URI.

    ``MLFLOW_TRACKING_URI`` wins when set; otherwise the SQLite store under
    :func:`painplan_home`, whose directories are created here (and only here).
    """
    import mlflow

    uri = tracking_uri()
    if os.environ.get("MLFLOW_TRACKING_URI", "").strip():
        source = "MLFLOW_TRACKING_URI"
    else:
        home = painplan_home()
        _make_dir(
            home, f"set {HOME_ENV} to a writable directory or MLFLOW_TRACKING_URI to another store"
        )
        uri = default_tracking_uri(home)
        source = f"{HOME_ENV} ({home})"
    root = artifact_root()
    if not is_server_uri(uri) and _scheme(root) in ("", "file"):
        _make_dir(Path(root), f"set {ARTIFACT_ROOT_ENV} or {HOME_ENV} to a writable directory")
    # Per-file download bars would interleave with painplan's own progress lines; a user who
    # wants them can still set the variable.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    log.debug("MLflow tracking store from %s: %s", source, redact(uri))
    return uri


def _make_dir(path: Path, fix: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(
            f"cannot create painplan's storage directory {path} ({err.strerror}); {fix}."
        ) from err


def redact(uri: str) -> str:
    """The URI with any password replaced, for logs and messages."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", uri)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "experiment"


def ensure_experiment(name: str) -> str:
    """Id of experiment ``name``, creating it (with an artifact location under
    :func:`artifact_root` for database stores) when it does not exist yet.

    Call :func:`configure_tracking` first.
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    uri = mlflow.get_tracking_uri()
    try:
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                raise ConfigError(
                    f"experiment {name!r} was deleted in the tracking store {redact(uri)}; "
                    "restore it ('mlflow experiments restore') or choose another name with "
                    "--experiment."
                )
            return experiment.experiment_id
        location = None
        if not is_server_uri(uri):
            root = artifact_root().rstrip("/")
            location = f"{root}/{_slug(name)}"
        experiment_id = mlflow.create_experiment(name, artifact_location=location)
        log.info("created MLflow experiment %r (artifacts: %s)", name, location or "server")
        return experiment_id
    except (MlflowException, SQLAlchemyError) as err:
        raise ConfigError(
            f"cannot use the MLflow tracking store {redact(uri)} ({_first_line(err)}); check "
            "MLFLOW_TRACKING_URI (and that the database server is running and the database "
            f"exists), or unset it to use painplan's default store under {HOME_ENV}."
        ) from err


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:299] + "…"
