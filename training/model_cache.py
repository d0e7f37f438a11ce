"""A local, verified cache of registered model bundles, so ``painplan recommend`` does not pay
for MLflow on every run.

Resolving and downloading ``models:/painplan@champion`` through MLflow costs about 2 s per
command on a 2-core machine (importing ``mlflow`` and SQLAlchemy, opening the store, copying
the artifacts) — more than scoring 5,000 patients. With the cache, a run asks the registry
which version it needs, finds that version's bundle on local disk, verifies it and unpickles
it; ``mlflow`` is imported only when something has to be downloaded.

Layout (``$PAINPLAN_MODEL_CACHE``, default ``$PAINPLAN_HOME/model-cache``)::

    <name>/v<version>-<store key>/
        entry.json      which registered version this is: tracking store, name, version,
                        run id, creation time, content_sha256 (registry tag and bundle)
        bundle/         the model bundle (metadata.json, model.pkl, model_card.md)

Rules:

* Only registered **versions** are cached: ``models:/<name>/<N>``, and an alias such as
  ``models:/<name>@champion`` after it has been resolved to its version. ``runs:/`` URIs,
  stage names and local directories load as before, without the cache.
* **The registry is asked on every run.** An alias is resolved to the version it points at
  *now*, and that version's run id, creation time and ``content_sha256`` tag must equal the
  ones recorded in ``entry.json``; otherwise the entry is stale (the alias moved, or the store
  was re-created and numbers its versions from 1 again) and is downloaded afresh. For a SQLite
  store (painplan's default) the question is one read-only query with the standard library
  (a few milliseconds, no MLflow import); for any other store (PostgreSQL, an MLflow server),
  or a SQLite store whose schema this code does not recognise, it goes through
  ``MlflowClient``.
* **Every load is verified.** ``model.pkl`` must hash to the ``content_sha256`` in
  ``metadata.json`` (:func:`recommender.artifact.load_bundle`), and that must equal both the
  value recorded in ``entry.json`` and the registry's ``content_sha256`` tag of the version. A
  damaged or partial entry is never used: it is removed with a warning naming it, and the
  version is downloaded again. A download whose hash differs from the registry's tag is
  refused.
* Entries are assembled in a temporary directory inside the cache and renamed into place, so a
  crash or two concurrent runs leave a complete entry or none.

Clearing the cache is deleting its directory (``rm -rf .painplan/model-cache``); it is rebuilt
on demand. ``PAINPLAN_MODEL_CACHE=off`` (or ``painplan recommend --no-model-cache``) bypasses
it. Unpickling runs code, so the cache directory is created private to the user (0700); the
registry-tag check makes a swapped ``model.pkl`` fail loudly, but only point the cache at a
directory you trust.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from features.errors import IncompatibleModel, ModelError, ModelNotFound
from recommender.artifact import ModelBundle, load_bundle

log = logging.getLogger(__name__)

CACHE_ENV = "PAINPLAN_MODEL_CACHE"
CACHE_DIR = "model-cache"  # under $PAINPLAN_HOME
ENTRY_FILE = "entry.json"
BUNDLE_DIR = "bundle"
ENTRY_FORMAT = 1
_OFF = ("off", "0", "false", "no", "none", "disabled")
# mlflow.entities.model_registry.model_version_stages.STAGE_DELETED_INTERNAL: MLflow keeps a
# deleted version's row with this stage (tests/training/test_model_cache.py checks the value).
DELETED_STAGE = "Deleted_Internal"
CHAMPION = "champion"  # training.register.CHAMPION (not imported: keeps this module light)

Progress = Callable[[str], None]


# --------------------------------------------------------------------------- configuration


def cache_dir() -> Path | None:
    """The cache directory, or None when ``PAINPLAN_MODEL_CACHE`` switches it off."""
    value = os.environ.get(CACHE_ENV, "").strip()
    if value.lower() in _OFF:
        return None
    if value:
        return Path(value).expanduser().resolve()
    from training.tracking import painplan_home

    return painplan_home() / CACHE_DIR


@dataclass(frozen=True)
class ModelsUri:
    """A ``models:/`` URI this cache can serve: exactly one of ``version`` / ``alias``."""

    name: str
    version: str | None = None
    alias: str | None = None


def parse_models_uri(uri: str) -> ModelsUri | None:
    """``models:/<name>/<N>`` or ``models:/<name>@<alias>`` → its parts; None for anything
    else (``runs:/``, stage names such as ``models:/x/Production``, ``@latest``, sub-paths,
    logged-model ids), which are loaded without the cache."""
    if not uri.startswith("models:/"):
        return None
    body = uri[len("models:/"):]
    if "@" in body:
        name, alias = body.rsplit("@", 1)
        if name and alias and "/" not in name and "/" not in alias and alias.lower() != "latest":
            return ModelsUri(name, alias=alias)
        return None
    name, _, version = body.partition("/")
    if name and version.isdigit() and "/" not in version:
        return ModelsUri(name, version=str(int(version)))
    return None


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class RegistryVersion:
    """What the registry says about one model version: enough to tell whether a cached
    bundle is that version's."""

    name: str
    version: str
    run_id: str | None
    created_ms: int | None
    content_sha256: str | None  # the version's registry tag (set by log_and_register)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def identity(self, store: str) -> dict:
        return {
            "tracking_uri": store,
            "name": self.name,
            "version": self.version,
            "run_id": self.run_id,
            "created_ms": self.created_ms,
            "content_sha256": self.content_sha256,
        }


class _Unsupported(Exception):
    """The SQLite registry cannot be read directly; ask MLflow instead."""


def store_key(tracking_uri: str) -> str:
    """The tracking store as recorded in the cache: SQLite paths made absolute (the same file
    from two working directories is one store), passwords removed."""
    from training.tracking import redact

    path = sqlite_path(tracking_uri)
    return f"sqlite:///{path.as_posix()}" if path is not None else redact(tracking_uri)


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a plain ``sqlite:///<path>`` URI (relative paths are relative to
    the working directory, as in SQLAlchemy); None for anything else (other databases,
    in-memory, URIs with query parameters or %-escapes)."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    rest = tracking_uri[len(prefix):]
    if not rest or rest == ":memory:" or any(c in rest for c in "?%#"):
        return None
    return Path(rest).absolute()


def lookup(tracking_uri: str, ref: ModelsUri, uri: str) -> RegistryVersion | None:
    """The registry's record of the version ``ref`` names (an alias resolved to its version
    now). Raises ModelNotFound, with what to do, when the model, version or alias does not
    exist. Returns None when the version exists but is not ready (still registering), which
    the caller loads without the cache."""
    path = sqlite_path(tracking_uri)
    if path is not None:
        try:
            return _sqlite_lookup(path, ref, uri, store_key(tracking_uri))
        except _Unsupported as why:
            log.debug("reading the registry through MLflow: %s", why)
    return _mlflow_lookup(ref, uri)


def _sqlite_lookup(path: Path, ref: ModelsUri, uri: str, store: str) -> RegistryVersion:
    """Read-only lookup in MLflow's SQLite registry tables (``registered_models``,
    ``model_versions``, ``model_version_tags``, ``registered_model_aliases``), with the same
    rules as MLflow's own store: deleted versions are invisible, and a workspace column (MLflow
    3.x) is read in the ``default`` workspace. Anything unexpected raises ``_Unsupported``."""
    workspaces = os.environ.get("MLFLOW_ENABLE_WORKSPACES", "").strip().lower()
    if os.environ.get("MLFLOW_WORKSPACE", "").strip() or workspaces in ("1", "true", "yes"):
        raise _Unsupported("MLflow workspaces are configured")
    if not path.is_file():
        raise ModelNotFound(_no_registry(uri, ref, path))
    import sqlite3
    from contextlib import closing

    needed = {
        "registered_models": {"name"},
        "model_versions": {"name", "version", "creation_time", "current_stage", "run_id",
                           "status"},
        "model_version_tags": {"key", "value", "name", "version"},
        "registered_model_aliases": {"alias", "version", "name"},
    }
    try:
        connection = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=10)
    except sqlite3.Error as err:
        raise _Unsupported(f"cannot open {path}: {err}") from err
    try:
        with closing(connection) as db:
            where = {}
            for table, columns in needed.items():
                have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
                if not columns <= have:
                    raise _Unsupported(f"{path}: table {table} lacks {sorted(columns - have)}")
                where[table] = " AND workspace = 'default'" if "workspace" in have else ""

            def rows(sql: str, table: str, *args) -> list[tuple]:
                return db.execute(sql + where[table], args).fetchall()

            if not rows("SELECT 1 FROM registered_models WHERE name = ?", "registered_models",
                        ref.name):
                raise ModelNotFound(_no_model(uri, ref, store))
            live = rows(
                "SELECT version, run_id, creation_time, status FROM model_versions "
                f"WHERE name = ? AND current_stage != '{DELETED_STAGE}'", "model_versions",
                ref.name,
            )
            versions = {str(v): (run_id, created, status) for v, run_id, created, status in live}
            version = ref.version
            if ref.alias is not None:
                found = rows(
                    "SELECT version FROM registered_model_aliases WHERE name = ? AND alias = ?",
                    "registered_model_aliases", ref.name, ref.alias,
                )
                if not found:
                    raise ModelNotFound(_no_alias(uri, ref, store, sorted(versions, key=int)))
                version = str(found[0][0])
            if version not in versions:
                raise ModelNotFound(_no_version(uri, ref, version, store,
                                                sorted(versions, key=int)))
            run_id, created, status = versions[version]
            if status != "READY":
                raise _Unsupported(f"{ref.name} version {version} is {status}")
            tag = rows(
                "SELECT value FROM model_version_tags WHERE name = ? AND version = ? "
                "AND key = 'content_sha256'", "model_version_tags", ref.name, int(version),
            )
    except sqlite3.Error as err:
        raise _Unsupported(f"cannot read {path}: {err}") from err
    return RegistryVersion(
        ref.name, version, run_id, None if created is None else int(created),
        tag[0][0] if tag else None,
    )


def _mlflow_lookup(ref: ModelsUri, uri: str) -> RegistryVersion | None:
    import mlflow
    from mlflow.exceptions import MlflowException

    from training.register import _not_found
    from training.tracking import configure_tracking

    configure_tracking()
    client = mlflow.MlflowClient()
    try:
        if ref.alias is not None:
            mv = client.get_model_version_by_alias(ref.name, ref.alias)
        else:
            mv = client.get_model_version(ref.name, ref.version)
    except MlflowException as err:
        raise _not_found(uri, err) from err
    if str(getattr(mv, "status", "READY")) != "READY":
        return None
    created = getattr(mv, "creation_timestamp", None)
    return RegistryVersion(
        ref.name, str(mv.version), mv.run_id, None if created is None else int(created),
        (mv.tags or {}).get("content_sha256"),
    )


_WHERE = ("Check the name (--model models:/<name>/<version>, --model-name NAME), or point "
          "MLFLOW_TRACKING_URI / PAINPLAN_HOME at the store the model was registered in.")


def _champion_fix(ref: ModelsUri) -> str:
    flag = "" if ref.name == "painplan" else f" --model-name {ref.name}"
    return (f"Train and promote one with 'painplan train --data FILE --promote{flag}', or "
            f"promote a registered version with 'painplan promote --version N{flag}'.")


def _no_registry(uri: str, ref: ModelsUri, path: Path) -> str:
    what = f"no champion model at {uri}" if ref.alias == CHAMPION else f"cannot load {uri}"
    return (f"{what}: there is no MLflow registry at {path} (the file does not exist), so "
            f"nothing has been registered there yet. {_champion_fix(ref)} {_WHERE}")


def _no_model(uri: str, ref: ModelsUri, store: str) -> str:
    what = f"no champion model at {uri}" if ref.alias == CHAMPION else f"cannot load {uri}"
    return (f"{what}: the MLflow registry at {store} has no registered model "
            f"{ref.name!r}. {_champion_fix(ref) + ' ' if ref.alias == CHAMPION else ''}{_WHERE}")


def _no_alias(uri: str, ref: ModelsUri, store: str, versions: list[str]) -> str:
    have = f"versions {', '.join(versions)}" if versions else "no versions"
    if ref.alias == CHAMPION:
        return (f"no champion model at {uri}: registered model {ref.name!r} in the MLflow "
                f"registry at {store} has {have} but no alias 'champion'. "
                f"{_champion_fix(ref)}")
    return (f"cannot load {uri}: registered model {ref.name!r} in the MLflow registry at "
            f"{store} has {have} but no alias {ref.alias!r}. Set the alias in MLflow, or pass "
            f"a version with --model models:/{ref.name}/<version>.")


def _no_version(uri: str, ref: ModelsUri, version: str, store: str, versions: list[str]) -> str:
    have = f"it has versions {', '.join(versions)}" if versions else "it has no versions"
    return (f"cannot load {uri}: registered model {ref.name!r} has no version {version} in the "
            f"MLflow registry at {store} ({have}). Pass one of those with --model "
            f"models:/{ref.name}/<version>, or point MLFLOW_TRACKING_URI / PAINPLAN_HOME at "
            f"the store version {version} was registered in.")


# --------------------------------------------------------------------------- the cache


def entry_dir(root: Path, store: str, version: RegistryVersion) -> Path:
    """Where one registered version lives in the cache."""
    key = hashlib.sha256(f"{store}\n{version.name}".encode()).hexdigest()[:12]
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", version.name).strip("._") or "model"
    return root / safe / f"v{version.version}-{key}"


def load_registered(uri: str, ref: ModelsUri, root: Path, *,
                    progress: Progress | None = None) -> ModelBundle:
    """Load the registered version ``uri`` names through the cache under ``root``."""
    from training.tracking import tracking_uri

    say = progress or log.info
    tracking = tracking_uri()
    store = store_key(tracking)
    record = lookup(tracking, ref, uri)
    if record is None:  # registered but not READY: MLflow decides what that means
        from training.register import load_bundle_from_uri
        from training.tracking import configure_tracking

        configure_tracking()
        say(f"loading model {uri}")
        return load_bundle_from_uri(uri)
    what = uri if ref.alias is None else f"{uri} (version {record.version})"
    entry = entry_dir(root, store, record)
    damaged = None
    if entry.exists():
        bundle, damaged = _use_entry(
            entry, record, store, uri,
            announce=lambda: say(f"loading model {what} from the local cache ({entry})"),
        )
        if bundle is not None:
            return bundle
    say(f"loading model {what} (downloading it into the local cache {root})")
    try:
        return _download(root, entry, record, store, uri)
    except ModelError as err:
        if damaged is None:
            raise
        raise type(err)(f"{err} (The cached copy at {entry} was damaged and has been "
                        f"removed: {damaged})") from err


def _use_entry(entry: Path, record: RegistryVersion, store: str, uri: str,
               announce: Callable[[], None] = lambda: None,
               ) -> tuple[ModelBundle | None, str | None]:
    """(bundle, None) when the entry is this version's and intact; (None, why) after removing
    a damaged one; (None, None) after removing a stale one. ``announce`` is called once the
    entry is known to be this version's, before it is loaded."""
    try:
        recorded = json.loads((entry / ENTRY_FILE).read_text(encoding="utf-8"))
        if not isinstance(recorded, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        return None, _discard(entry, uri, f"its {ENTRY_FILE} is missing or unreadable ({err})")
    if recorded.get("format") != ENTRY_FORMAT:
        _discard(entry, uri, None)
        return None, None
    mine = record.identity(store)
    if {k: recorded.get(k) for k in mine} != mine:
        log.info("the cached copy at %s is not %s as the registry describes it now (%s); "
                 "downloading it again", entry, record.uri,
                 ", ".join(k for k in mine if recorded.get(k) != mine[k]))
        _discard(entry, uri, None)
        return None, None
    bundle_dir = entry / BUNDLE_DIR
    announce()
    try:
        bundle = load_bundle(bundle_dir)
    except IncompatibleModel as err:  # the registry's copy would fail the same way
        raise type(err)(str(err).replace(str(bundle_dir), f"{uri} (cached at {entry})")) from err
    except ModelError as err:
        return None, _discard(entry, uri, " ".join(str(err).split()))
    got = bundle.metadata.get("content_sha256")
    expected = {recorded.get("bundle_sha256"), *([record.content_sha256]
                                                 if record.content_sha256 else [])}
    if expected != {got}:
        return None, _discard(entry, uri, f"its bundle's content_sha256 {str(got)[:12]}… is not "
                                          f"the one recorded for {record.uri}")
    return bundle, None


def _discard(entry: Path, uri: str, why: str | None) -> str | None:
    """Remove an entry (renamed aside first, so no reader sees half of it); warn when it was
    damaged. Raises ModelError when a damaged entry cannot be removed."""
    if why is not None:
        log.warning("the cached copy of %s at %s is damaged and is not used: %s. It is removed "
                    "and the model is downloaded again from the registry.", uri, entry, why)
    aside = entry.with_name(f".{entry.name}.removed-{secrets.token_hex(4)}")
    try:
        os.replace(entry, aside)
        shutil.rmtree(aside)
    except OSError as err:
        if why is None:
            raise ModelError(
                f"cannot replace the outdated cached copy of {uri} at {entry} ({err}); delete "
                f"it by hand (rm -rf '{entry}') or set {CACHE_ENV}=off to bypass the cache."
            ) from err
        raise ModelError(
            f"the cached copy of {uri} at {entry} is damaged ({why}) and cannot be removed "
            f"({err}); delete it by hand (rm -rf '{entry}') or set {CACHE_ENV}=off to bypass "
            "the cache."
        ) from err
    return why


def _download(root: Path, entry: Path, record: RegistryVersion, store: str,
              uri: str) -> ModelBundle:
    """Download ``record``'s version with MLflow, verify it, load it and keep it in the cache
    (when the cache directory can be written; otherwise a warning, and the model is used
    anyway)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from training.register import _bundle_dir, _not_found, load_bundle_from_uri
    from training.tracking import configure_tracking

    configure_tracking()
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        work = Path(tempfile.mkdtemp(prefix=".download-", dir=root))
    except OSError as err:
        log.warning("cannot write the model cache %s (%s); loading %s without it. Set %s to a "
                    "writable directory, or to 'off'.", root, err.strerror or err, uri, CACHE_ENV)
        return _checked(load_bundle_from_uri(record.uri), record, uri)
    try:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=record.uri,
                                                        dst_path=str(work))
        except MlflowException as err:
            raise _not_found(uri, err) from err
        source = _bundle_dir(Path(local))
        try:
            bundle = load_bundle(source)
        except ModelError as err:
            raise type(err)(str(err).replace(str(source), uri)) from err
        _checked(bundle, record, uri)
        try:
            staged = work / "entry"
            staged.mkdir()
            os.replace(source, staged / BUNDLE_DIR)
            (staged / ENTRY_FILE).write_text(json.dumps({
                "format": ENTRY_FORMAT,
                **record.identity(store),
                "bundle_sha256": bundle.metadata.get("content_sha256"),
                "cached_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }, indent=2), encoding="utf-8")
            _install(staged, entry)
        except OSError as err:
            log.warning("could not keep %s in the model cache %s (%s); it is used anyway and "
                        "downloaded again next time", uri, root, err)
        return bundle
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _checked(bundle: ModelBundle, record: RegistryVersion, uri: str) -> ModelBundle:
    """Refuse a bundle whose hash is not the one the registry recorded for the version."""
    got = bundle.metadata.get("content_sha256")
    if record.content_sha256 and got != record.content_sha256:
        raise ModelError(
            f"the model downloaded for {uri} has content_sha256 {str(got)[:12]}…, but the "
            f"registry recorded {record.content_sha256[:12]}… for {record.name} version "
            f"{record.version}: the stored artifacts are not the ones that were registered "
            "(overwritten or edited afterwards). Register the model again with 'painplan "
            "train', or restore the artifact store."
        )
    return bundle


def _install(staged: Path, entry: Path) -> None:
    """Rename a complete entry into place; if another run got there first, keep theirs."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    if entry.exists():
        _discard(entry, str(entry), None)
    try:
        os.rename(staged, entry)
    except OSError:
        if not (entry / ENTRY_FILE).is_file():
            raise
        log.debug("another run cached %s first", entry)


__all__ = [
    "CACHE_ENV",
    "ModelsUri",
    "RegistryVersion",
    "cache_dir",
    "entry_dir",
    "load_registered",
    "lookup",
    "parse_models_uri",
]
