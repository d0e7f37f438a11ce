"""The service refuses to start, with one paragraph, when its model is missing, tampered
with or incompatible, or when its configuration is incomplete; importing a model into the
BentoML store is verified and idempotent."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from features.errors import ConfigError, IncompatibleModel, ModelError, ModelNotFound

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def _copy_model(served, version: str) -> str:
    """Import the test bundle again under another version; returns the new tag."""
    from recommender.service import import_model

    return import_model(served.bundle_dir, version=version, run_id=served.run_id)


def _stored_path(tag: str) -> Path:
    import bentoml

    return Path(bentoml.models.get(tag).path)


def _edit_metadata(path: Path, **changes) -> None:
    meta = json.loads((path / "metadata.json").read_text())
    meta.update(changes)
    (path / "metadata.json").write_text(json.dumps(meta))


def _start(asgi_client, tmp_path, tag):
    with asgi_client(f"sqlite:///{tmp_path}/audit.db", PAINPLAN_MODEL_TAG=tag):
        pass


def test_starts_with_the_imported_model(asgi_client, tmp_path, served):
    _start(asgi_client, tmp_path, served.tag)


def test_refuses_to_start_without_the_model(asgi_client, tmp_path, served):
    with pytest.raises(ModelNotFound, match="no model 'painplan:v404-000000000000'") as err:
        _start(asgi_client, tmp_path, "painplan:v404-000000000000")
    assert served.tag in str(err.value) and "\n" not in str(err.value)


def test_refuses_to_start_with_a_tampered_model(asgi_client, tmp_path, served):
    tag = _copy_model(served, "8")
    with (_stored_path(tag) / "model.pkl").open("ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(ModelError, match="does not match the content_sha256") as err:
        _start(asgi_client, tmp_path, tag)
    assert not isinstance(err.value, IncompatibleModel) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("field", "match"),
    [
        ("ruleset_version", "safety ruleset"),
        ("schema_fingerprint", "feature schema"),
    ],
)
def test_refuses_to_start_with_an_incompatible_model(asgi_client, tmp_path, served, field, match):
    tag = _copy_model(served, f"9{len(field)}")
    _edit_metadata(_stored_path(tag), **{field: "1999.01-0+deadbeef"})
    with pytest.raises(IncompatibleModel, match=match) as err:
        _start(asgi_client, tmp_path, tag)
    assert "\n" not in str(err.value)


def test_refuses_files_replaced_after_import(asgi_client, tmp_path, served):
    """A consistent model.pkl + metadata.json pair from another bundle passes the bundle's own
    hash check, but not the content hash recorded in the store at import."""
    from recommender.artifact import load_bundle, save_bundle

    other = load_bundle(served.bundle_dir)
    other.policy = None  # different pickle bytes, so a different content hash
    save_bundle(other, tmp_path / "other")
    tag = _copy_model(served, "10")
    for name in ("model.pkl", "metadata.json"):
        shutil.copy(tmp_path / "other" / name, _stored_path(tag) / name)
    with pytest.raises(ModelError, match="replaced after import"):
        _start(asgi_client, tmp_path, tag)


def test_import_is_idempotent_and_tag_names_version_and_content(served):
    from recommender.service import import_model, serving_tag

    meta = json.loads((served.bundle_dir / "metadata.json").read_text())
    assert served.tag == serving_tag("7", meta["content_sha256"])
    assert import_model(served.bundle_dir, version="7", run_id=served.run_id) == served.tag
    with pytest.raises(ConfigError, match="does not match the MLflow run"):
        import_model(served.bundle_dir, version="7", run_id="another-run")


def test_import_refuses_a_damaged_bundle(served, tmp_path):
    from recommender.service import import_model

    shutil.copytree(served.bundle_dir, tmp_path / "bundle")
    with (tmp_path / "bundle" / "model.pkl").open("ab") as fh:
        fh.write(b"x")
    with pytest.raises(ModelError):
        import_model(tmp_path / "bundle", version="12")


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"PAINPLAN_API_KEYS": ""}, "no API keys"),
        ({"PAINPLAN_API_KEYS": "admin:" + "k" * 20}, "role clinician or auditor"),
        ({"PAINPLAN_API_KEYS": "clinician:short"}, "at least 16"),
        ({"PAINPLAN_HMAC_KEY": ""}, "PAINPLAN_HMAC_KEY is not set"),
        ({"PAINPLAN_HMAC_KEY": "short"}, "at least 32"),
        ({"PAINPLAN_MAX_BODY_BYTES": "lots"}, "positive whole number"),
        ({"PAINPLAN_API_KEYS_FILE": "/nonexistent/keys"}, "cannot be read"),
        ({"PAINPLAN_CPU_AFFINITY": "maybe"}, "PAINPLAN_CPU_AFFINITY='maybe' must be 'on' or 'off'"),
    ],
)
def test_configuration_errors_refuse_start(service_env, env, match, tmp_path):
    from recommender.settings import ServiceConfig

    with pytest.raises(ConfigError, match=match) as err:
        ServiceConfig.from_env(service_env(f"sqlite:///{tmp_path}/a.db", **env))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("value", "on"), [(None, False), ("on", True), ("ON ", True), ("1", True), ("off", False)]
)
def test_cpu_affinity_is_off_unless_asked_for(service_env, tmp_path, value, on):
    from recommender.settings import ServiceConfig

    env = service_env(f"sqlite:///{tmp_path}/a.db")
    if value is not None:
        env["PAINPLAN_CPU_AFFINITY"] = value
    assert ServiceConfig.from_env(env).cpu_affinity is on


def test_worker_cpu_is_round_robin_over_the_allowed_cpus():
    from recommender.cpu_affinity import worker_cpu

    assert [worker_cpu(k, {4, 2, 7}) for k in (1, 2, 3, 4)] == [2, 4, 7, 2]
    with pytest.raises(ValueError, match="worker_index must be >= 1"):
        worker_cpu(0, {0, 1})


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="per-thread affinity is Linux's")
def test_pin_process_pins_every_thread_and_the_ones_started_later():
    # In a child process, so this test run's own threads stay where they are.
    code = textwrap.dedent(
        '''
        import os, threading, time
        from recommender.cpu_affinity import pin_process
        stop = threading.Event()
        early = threading.Thread(target=stop.wait, daemon=True)
        early.start()
        cpu = pin_process(2)
        late = threading.Thread(target=stop.wait, daemon=True)
        late.start()
        for tid in os.listdir("/proc/self/task"):
            assert os.sched_getaffinity(int(tid)) == {cpu}, (tid, os.sched_getaffinity(int(tid)))
        print(cpu, len(os.listdir("/proc/self/task")))
        '''
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert done.returncode == 0, done.stderr
    cpu, threads = map(int, done.stdout.split())
    allowed = sorted(os.sched_getaffinity(0))
    assert cpu == allowed[1 % len(allowed)] and threads >= 3


def test_demo_mode_generates_an_hmac_key_and_keys_file_is_read(service_env, tmp_path):
    from recommender.settings import ServiceConfig

    keys = tmp_path / "keys"
    keys.write_text("# painplan keys\nauditor:" + "z" * 20 + "\n", encoding="utf-8")
    config = ServiceConfig.from_env(
        service_env(
            "sqlite:///x.db",
            PAINPLAN_HMAC_KEY="",
            PAINPLAN_DEMO="1",
            PAINPLAN_API_KEYS_FILE=str(keys),
        )
    )
    assert len(config.hmac_key) == 64
    assert config.api_keys.roles_of("z" * 20) == {"auditor"}
    assert config.hmac_key.decode() not in repr(config) and "z" * 20 not in repr(config)


def test_keys_are_kept_as_digests_and_both_roles_are_possible():
    from recommender.access import AccessDenied, ApiKeys

    key = "k" * 20
    keys = ApiKeys.parse(f"clinician:{key}, auditor:{key}")
    assert keys.roles_of(key) == {"clinician", "auditor"}
    assert all(len(digest) == 32 for digest, _ in keys.entries)
    assert key.encode() not in b"".join(d for d, _ in keys.entries)
    keys.require(f"bearer {key}", "auditor")  # scheme is case-insensitive
    with pytest.raises(AccessDenied) as err:
        keys.require(f"Bearer {key}x", "auditor")
    assert err.value.status == 401


def test_check_model_entry_point(served, capsys):
    from recommender.service import main

    assert main(["check-model", "--tag", served.tag]) == 0
    assert capsys.readouterr().out.strip() == served.tag
    assert main(["check-model", "--tag", "painplan:v0-000000000000"]) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("painplan check-model: error: no model") and "\n" not in err


def test_serve_without_a_champion_says_how_to_get_one(tmp_path, monkeypatch, capsys):
    from training.cli import EXIT_MODEL, main

    monkeypatch.setenv("PAINPLAN_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.delenv("PAINPLAN_MODEL_TAG", raising=False)
    assert main(["serve", "--port", "3999"]) == EXIT_MODEL
    err = capsys.readouterr().err
    assert "has no champion to serve" in err and "painplan demo" in err


def test_export_outcomes_from_an_empty_store_says_so(tmp_path, capsys):
    from recommender.audit import AuditStore
    from training.cli import EXIT_CONFIG, main

    url = f"sqlite:///{tmp_path}/audit.db"
    out = ["export-outcomes", "--out", str(tmp_path / "x.csv"), "--audit-url", url]
    assert main(out) == EXIT_CONFIG
    assert "holds no painplan audit records" in capsys.readouterr().err
    store = AuditStore(url)
    store.create_schema()
    store.close()
    assert main(out) == EXIT_CONFIG
    assert "no reported outcomes yet" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()
