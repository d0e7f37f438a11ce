"""training.model_cache: the verified local cache of registered model bundles that lets
``painplan recommend`` load a registered version without MLflow.

What must hold: the cached path ranks bit-identically to a registry download; an alias is
resolved by the registry on every run; a damaged, partial or stale entry is never used (it is
replaced, with a warning naming it); bad model URIs fail with one paragraph that says what to
do; and a cache hit imports neither MLflow nor SQLAlchemy.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from features.errors import ModelError, ModelNotFound
from training import model_cache
from training.model_cache import (
    ModelsUri,
    cache_dir,
    entry_dir,
    lookup,
    parse_models_uri,
    sqlite_path,
    store_key,
)

REPO = Path(__file__).resolve().parents[2]

# --------------------------------------------------------------------------- fast units


def test_parse_models_uri_accepts_versions_and_aliases_only():
    assert parse_models_uri("models:/painplan/3") == ModelsUri("painplan", version="3")
    assert parse_models_uri("models:/painplan/03") == ModelsUri("painplan", version="3")
    assert parse_models_uri("models:/painplan@champion") == ModelsUri("painplan",
                                                                      alias="champion")
    for uncached in ("models:/painplan/Production", "models:/painplan@latest",
                     "models:/painplan/3/extra", "models:/m-0123abcd", "runs:/abc/model",
                     "/some/dir", "models:/@champion", "models:/painplan/"):
        assert parse_models_uri(uncached) is None, uncached


def test_sqlite_paths_and_store_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sqlite_path("sqlite:////abs/mlflow.db") == Path("/abs/mlflow.db")
    assert sqlite_path("sqlite:///rel.db") == tmp_path / "rel.db"
    for other in ("sqlite://", "sqlite:///:memory:", "sqlite:///x.db?mode=ro",
                  "postgresql+psycopg://u@h/db", "http://mlflow:5000"):
        assert sqlite_path(other) is None, other
    # one file is one store, whatever the working directory; no password is ever recorded
    assert store_key("sqlite:///rel.db") == f"sqlite:///{(tmp_path / 'rel.db').as_posix()}"
    assert "secret" not in store_key("postgresql+psycopg://u:secret@h:5432/db")


def test_cache_location_and_switch(tmp_path, monkeypatch):
    monkeypatch.setenv("PAINPLAN_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PAINPLAN_MODEL_CACHE", raising=False)
    assert cache_dir() == (tmp_path / "home" / "model-cache").resolve()
    monkeypatch.setenv("PAINPLAN_MODEL_CACHE", str(tmp_path / "elsewhere"))
    assert cache_dir() == (tmp_path / "elsewhere").resolve()
    for off in ("off", "OFF", "0", "false"):
        monkeypatch.setenv("PAINPLAN_MODEL_CACHE", off)
        assert cache_dir() is None


def test_entries_are_keyed_by_store_name_and_version(tmp_path):
    v = model_cache.RegistryVersion("painplan", "3", "run", 1, "abc")
    a = entry_dir(tmp_path, "sqlite:////a/mlflow.db", v)
    assert a.parent == tmp_path / "painplan" and a.name.startswith("v3-")
    assert a != entry_dir(tmp_path, "sqlite:////b/mlflow.db", v)
    assert a != entry_dir(tmp_path, "sqlite:////a/mlflow.db", dataclasses.replace(v, version="4"))


def test_deleted_stage_is_mlflows():
    from mlflow.entities.model_registry.model_version_stages import STAGE_DELETED_INTERNAL

    assert model_cache.DELETED_STAGE == STAGE_DELETED_INTERNAL


def test_no_registry_yet_explains_and_creates_nothing(tmp_path, monkeypatch):
    from training.pipeline import load_scoring_model

    monkeypatch.setenv("PAINPLAN_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("PAINPLAN_MODEL_CACHE", raising=False)
    with pytest.raises(ModelNotFound) as err:
        load_scoring_model(None)
    text = str(err.value)
    assert text.startswith("no champion model at models:/painplan@champion")
    assert "painplan train --data FILE --promote" in text and "mlflow.db" in text
    assert not (tmp_path / "home").exists()


def test_recommend_help_says_where_the_cache_lives():
    out = subprocess.run(
        [sys.executable, "-m", "training.cli", "recommend", "--help"],
        capture_output=True, text=True, check=True, cwd=REPO,
    ).stdout
    text = " ".join(out.split())
    assert "--no-model-cache" in text and "$PAINPLAN_HOME/model-cache" in text
    assert "PAINPLAN_MODEL_CACHE=off" in text


def test_parser_builds_only_the_command_that_runs(capsys):
    from training.cli import build_parser, main

    # every command is still listed and has its own help
    listing = build_parser(only="recommend").format_help()
    assert all(name in listing for name in ("simulate", "demo", "recommend", "train"))
    for command in ("simulate", "demo"):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        assert f"usage: painplan {command}" in capsys.readouterr().out
    code = (
        "import sys\n"
        "from training.cli import main\n"
        "try:\n"
        "    main(['recommend', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('training.simulate' in sys.modules, file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=REPO)
    assert done.stderr.strip().endswith("False")


# --------------------------------------------------------------------------- with a registry


@pytest.fixture
def client(in_store):
    import mlflow

    return mlflow.MlflowClient()


@pytest.fixture
def cache_root(in_store, tmp_path, monkeypatch):
    """A model cache of this test's own (the trained store is ``in_store``)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("PAINPLAN_MODEL_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def patients_csv(tmp_path_factory, helpers) -> Path:
    from training.simulate import simulate_episodes

    episodes = simulate_episodes(300, seed=41, progress=False)
    path = tmp_path_factory.mktemp("cache-patients") / "patients.csv"
    helpers.read_patients(episodes, 200).to_csv(path, index=False)
    return path


def _rank(patients: Path, out: Path, model: str | None, **kw) -> bytes:
    from training.pipeline import recommend_file

    recommend_file(patients, out, model=model, top_k=5, **kw)
    return out.read_bytes()


def _entries(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.glob("*/*/entry.json"))


@pytest.mark.slow
def test_cached_path_ranks_bit_identically_to_the_registry(
    in_store, cache_root, patients_csv, tmp_path,
):
    version = in_store.good_result.version
    uri = f"models:/painplan/{version}"
    registry = _rank(patients_csv, tmp_path / "registry.csv", uri, use_model_cache=False)
    assert not cache_root.exists(), "--no-model-cache must not touch the cache"
    first = _rank(patients_csv, tmp_path / "first.csv", uri)  # downloads into the cache
    [entry] = _entries(cache_root)
    seen = []
    hit = _rank(patients_csv, tmp_path / "hit.csv", uri, progress=seen.append)
    assert any("from the local cache" in line for line in seen), seen
    assert registry == first == hit
    # the default model (the champion alias) too
    champion = _rank(patients_csv, tmp_path / "champion.csv", None, use_model_cache=False)
    _rank(patients_csv, tmp_path / "champion-first.csv", None)
    seen.clear()
    assert _rank(patients_csv, tmp_path / "champion-hit.csv", None, progress=seen.append) \
        == champion
    assert any("from the local cache" in line for line in seen), seen
    recorded = json.loads((entry / "entry.json").read_text())
    assert recorded["version"] == version and recorded["run_id"] == in_store.good_result.run_id
    assert (entry / "bundle" / "model.pkl").is_file()
    assert oct(cache_root.stat().st_mode & 0o777) == "0o700"


@pytest.mark.slow
def test_a_cache_hit_imports_neither_mlflow_nor_sqlalchemy(
    in_store, cache_root, patients_csv, tmp_path,
):
    uri = f"models:/painplan/{in_store.good_result.version}"
    _rank(patients_csv, tmp_path / "warm.csv", uri)  # fill the cache
    code = (
        "import sys\n"
        "from training.cli import main\n"
        f"code = main(['recommend', '--patients', {str(patients_csv)!r}, '--out', "
        f"{str(tmp_path / 'cli.csv')!r}, '--model', {uri!r}])\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & "
        "{'mlflow', 'sqlalchemy', 'alembic', 'shap', 'bentoml'})\n"
        "print(code, heavy, 'training.simulate' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ), cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[-2] == "0 [] False", done.stdout
    assert "from the local cache" in done.stderr
    assert (tmp_path / "cli.csv").read_bytes() == (tmp_path / "warm.csv").read_bytes()


@pytest.mark.slow
def test_sqlite_lookup_agrees_with_mlflow(in_store, cache_root, client):
    from training.tracking import tracking_uri

    uri = tracking_uri()
    store = store_key(uri)
    for ref in (ModelsUri("painplan", version=in_store.bad_result.version),
                ModelsUri("painplan", version=in_store.good_result.version),
                ModelsUri("painplan", alias="champion")):
        fast = model_cache._sqlite_lookup(sqlite_path(uri), ref, "u", store)
        slow = model_cache._mlflow_lookup(ref, "u")
        assert fast == slow, ref
    mv = client.get_model_version_by_alias("painplan", "champion")
    assert fast.version == str(mv.version) and fast.content_sha256 == mv.tags["content_sha256"]


@pytest.mark.slow
def test_an_alias_is_resolved_by_the_registry_every_run(
    in_store, cache_root, client, patients_csv, tmp_path,
):
    bad, good = in_store.bad_result.version, in_store.good_result.version
    uri = "models:/painplan@cache-test"
    from training.pipeline import load_scoring_model

    try:
        client.set_registered_model_alias("painplan", "cache-test", bad)
        seen = []
        first = load_scoring_model(uri, progress=seen.append)
        assert f"(version {bad})" in seen[-1]
        client.set_registered_model_alias("painplan", "cache-test", good)
        seen.clear()
        moved = load_scoring_model(uri, progress=seen.append)
        assert f"(version {good})" in seen[-1]
    finally:
        client.delete_registered_model_alias("painplan", "cache-test")
    assert first.metadata["mlflow_run_id"] == in_store.bad_result.run_id
    assert moved.metadata["mlflow_run_id"] == in_store.good_result.run_id
    assert len(_entries(cache_root)) == 2  # one entry per version, the alias is not a key


def _damage_pickle(entry: Path) -> None:
    pkl = entry / "bundle" / "model.pkl"
    pkl.write_bytes(pkl.read_bytes()[: pkl.stat().st_size // 2])  # a partial file


def _garble_entry(entry: Path) -> None:
    (entry / "entry.json").write_text("{not json", encoding="utf-8")


def _drop_metadata(entry: Path) -> None:
    (entry / "bundle" / "metadata.json").unlink()


@pytest.mark.slow
@pytest.mark.parametrize("damage", [_damage_pickle, _garble_entry, _drop_metadata])
def test_a_damaged_entry_is_never_used_but_replaced(
    in_store, cache_root, patients_csv, tmp_path, caplog, damage,
):
    uri = f"models:/painplan/{in_store.good_result.version}"
    good = _rank(patients_csv, tmp_path / "good.csv", uri)
    [entry] = _entries(cache_root)
    damage(entry)
    seen = []
    with caplog.at_level(logging.WARNING, logger="training.model_cache"):
        again = _rank(patients_csv, tmp_path / "again.csv", uri, progress=seen.append)
    assert again == good
    [warning] = [r.getMessage() for r in caplog.records
                 if r.levelno == logging.WARNING and r.name == "training.model_cache"]
    assert str(entry) in warning and "damaged" in warning and "downloaded again" in warning
    assert any("downloading it into the local cache" in s for s in seen)
    # the entry is whole again, and served from the cache next time
    seen.clear()
    assert _rank(patients_csv, tmp_path / "third.csv", uri, progress=seen.append) == good
    assert any("from the local cache" in s for s in seen)


@pytest.mark.slow
def test_a_swapped_bundle_is_caught_by_the_registry_hash(
    in_store, cache_root, patients_csv, tmp_path,
):
    """model.pkl and metadata.json of another version, consistent with each other: only the
    registry's content_sha256 tells them apart."""
    bad, good = in_store.bad_result.version, in_store.good_result.version
    want = _rank(patients_csv, tmp_path / "want.csv", f"models:/painplan/{good}",
                 use_model_cache=False)
    from training.pipeline import load_scoring_model

    load_scoring_model(f"models:/painplan/{bad}")
    load_scoring_model(f"models:/painplan/{good}")
    entries = {json.loads((e / "entry.json").read_text())["version"]: e
               for e in _entries(cache_root)}
    for name in ("model.pkl", "metadata.json"):
        (entries[good] / "bundle" / name).write_bytes(
            (entries[bad] / "bundle" / name).read_bytes())
    assert _rank(patients_csv, tmp_path / "got.csv", f"models:/painplan/{good}") == want


@pytest.mark.slow
def test_a_stale_entry_is_downloaded_again(in_store, cache_root, caplog):
    """Same store, name and version but another run (the store was re-created)."""
    from training.pipeline import load_scoring_model

    uri = f"models:/painplan/{in_store.good_result.version}"
    load_scoring_model(uri)
    [entry] = _entries(cache_root)
    recorded = json.loads((entry / "entry.json").read_text())
    recorded["run_id"] = "0" * 32
    (entry / "entry.json").write_text(json.dumps(recorded))
    seen = []
    with caplog.at_level(logging.INFO, logger="training.model_cache"):
        bundle = load_scoring_model(uri, progress=seen.append)
    assert bundle.metadata["mlflow_run_id"] == in_store.good_result.run_id
    assert any("run_id" in r.getMessage() and str(entry) in r.getMessage()
               for r in caplog.records)
    assert "downloading" in seen[-1]
    assert json.loads((entry / "entry.json").read_text())["run_id"] == in_store.good_result.run_id


@pytest.mark.slow
def test_a_damaged_entry_that_cannot_be_removed_is_one_clear_error(
    in_store, cache_root, monkeypatch,
):
    from training.pipeline import load_scoring_model

    uri = f"models:/painplan/{in_store.good_result.version}"
    load_scoring_model(uri)
    [entry] = _entries(cache_root)
    _damage_pickle(entry)

    class NoReplace:  # the module's os, except that nothing can be renamed
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def replace(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(model_cache, "os", NoReplace())
    with pytest.raises(ModelError) as err:
        load_scoring_model(uri)
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(f"the cached copy of {uri} at {entry} is damaged")
    assert "rm -rf" in text and "PAINPLAN_MODEL_CACHE=off" in text


@pytest.mark.slow
def test_a_download_that_differs_from_the_registry_tag_is_refused(
    in_store, cache_root, monkeypatch,
):
    from training.pipeline import load_scoring_model

    real = model_cache.lookup

    def forged(*args, **kwargs):
        return dataclasses.replace(real(*args, **kwargs), content_sha256="f" * 64)

    monkeypatch.setattr(model_cache, "lookup", forged)
    uri = f"models:/painplan/{in_store.good_result.version}"
    with pytest.raises(ModelError, match="registry recorded ffffffffffff"):
        load_scoring_model(uri)
    assert not _entries(cache_root), "a refused download is not cached"


@pytest.mark.slow
def test_an_unwritable_cache_warns_and_still_scores(in_store, tmp_path, monkeypatch, caplog,
                                                    patients_csv):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("PAINPLAN_MODEL_CACHE", str(blocker / "cache"))
    uri = f"models:/painplan/{in_store.good_result.version}"
    with caplog.at_level(logging.WARNING, logger="training.model_cache"):
        got = _rank(patients_csv, tmp_path / "got.csv", uri)
    assert got == _rank(patients_csv, tmp_path / "want.csv", uri, use_model_cache=False)
    assert any("cannot write the model cache" in r.getMessage() and "PAINPLAN_MODEL_CACHE"
               in r.getMessage() for r in caplog.records)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("models:/painplan/999", "registered model 'painplan' has no version 999"),
        ("models:/never-registered/1", "has no registered model 'never-registered'"),
        ("models:/never-registered@champion", "no champion model at "
                                              "models:/never-registered@champion"),
        ("models:/painplan@no-such-alias", "but no alias 'no-such-alias'"),
    ],
)
def test_bad_model_uris_are_one_clear_paragraph(
    in_store, cache_root, patients_csv, tmp_path, capsys, model, expected,
):
    from training.cli import main

    out = tmp_path / "o.csv"
    code = main(["recommend", "--patients", str(patients_csv), "--out", str(out),
                 "--model", model])
    error = capsys.readouterr().err.rstrip("\n").rsplit("\n", 1)[-1]
    assert code == 3
    assert error.startswith("painplan recommend: error: ") and expected in error
    assert "--model" in error or "painplan train" in error  # says how to fix it
    assert not out.exists() and not cache_root.exists()


@pytest.mark.slow
def test_missing_version_through_mlflow_is_model_not_found(in_store, cache_root, monkeypatch):
    """Stores the fast path does not read (PostgreSQL, servers) ask MLflow; same error type."""
    from training.tracking import tracking_uri

    monkeypatch.setattr(model_cache, "sqlite_path", lambda uri: None)
    with pytest.raises(ModelNotFound, match="cannot download model models:/painplan/999"):
        lookup(tracking_uri(), ModelsUri("painplan", version="999"), "models:/painplan/999")
    record = lookup(tracking_uri(), ModelsUri("painplan", alias="champion"),
                    "models:/painplan@champion")
    assert record is not None and record.content_sha256
