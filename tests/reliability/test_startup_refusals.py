"""``bentoml serve`` refuses to start — exit code non-zero, one paragraph, no traceback —
for a model it must not serve or a configuration it must not run with (docs/reliability.md
§4, §5). Extends tests/recommender/test_service_startup.py, which checks the same refusals
in-process with edited metadata, with the real server process and with *genuine* bundles
built under another feature schema or safety ruleset (consistent hashes: what an older or
newer painplan would have written), as an older release could have imported them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import reliability_harness as H

from features.errors import IncompatibleModel

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OTHER = "1999.01-0+deadbeef"
REFUSE_TIMEOUT_S = 150


def _other_bundle(model, directory: Path, *, schema: str | None = None,
                  ruleset: str | None = None) -> Path:
    """The test model re-saved as if built under another schema or ruleset."""
    from recommender.artifact import load_bundle, save_bundle

    bundle = load_bundle(model.bundle_dir)
    if schema is not None:
        bundle.model.schema_ = schema  # the encoder was fitted under another schema
    if ruleset is not None:
        bundle.metadata["ruleset_version"] = ruleset
    for key in ("schema_fingerprint", "content_sha256"):
        bundle.metadata.pop(key, None)
    save_bundle(bundle, directory)
    return directory


def _store_unverified(bundle_dir: Path, version: str) -> str:
    """Put a bundle into BentoML's store the way import_model does, minus its checks (as a
    release without them, or a hand-made import, would)."""
    import bentoml

    from recommender.service import serving_tag

    meta = json.loads((bundle_dir / "metadata.json").read_text())
    tag = serving_tag(version, meta["content_sha256"])
    with bentoml.models.create(tag, labels={"registered_version": version},
                               metadata={"registered_version": version,
                                         "content_sha256": meta["content_sha256"],
                                         "bundle": meta}) as stored:
        for path in bundle_dir.iterdir():
            shutil.copy2(path, stored.path_of(path.name))
    return tag


def _stored(tag: str) -> Path:
    import bentoml

    return Path(bentoml.models.get(tag).path)


def test_genuine_bundles_of_another_schema_or_ruleset_are_refused_at_import(model, tmp_path):
    from recommender.service import import_model

    for name, kwargs, match in [("schema", {"schema": OTHER}, "feature schema"),
                                ("ruleset", {"ruleset": OTHER}, "safety ruleset")]:
        bundle = _other_bundle(model, tmp_path / name, **kwargs)
        with pytest.raises(IncompatibleModel, match=match) as err:
            import_model(bundle, version=f"80{len(name)}")
        assert "\n" not in str(err.value) and OTHER in str(err.value)


def test_bentoml_serve_refuses_with_one_paragraph(model, env_for, tmp_path):
    from recommender.service import import_model

    cases: dict[str, tuple[dict, str]] = {}
    # 1. a modified model file (bytes appended) and 2. a truncated one
    for name, damage in [("appended", lambda b: b + b"tampered"),
                         ("truncated", lambda b: b[: len(b) // 2])]:
        tag = import_model(model.bundle_dir, version=f"81{len(name)}")
        pkl = _stored(tag) / "model.pkl"
        pkl.write_bytes(damage(pkl.read_bytes()))
        cases[name] = ({"PAINPLAN_MODEL_TAG": tag}, "does not match the content_sha256")
    # 3. the model file deleted from the store
    tag = import_model(model.bundle_dir, version="820")
    (_stored(tag) / "model.pkl").unlink()
    cases["deleted"] = ({"PAINPLAN_MODEL_TAG": tag}, "no model bundle at")
    # 4./5. genuine bundles trained under another feature schema / safety ruleset
    for name, kwargs, match in [("other-schema", {"schema": OTHER}, "feature schema"),
                                ("other-ruleset", {"ruleset": OTHER}, "safety ruleset")]:
        tag = _store_unverified(_other_bundle(model, tmp_path / name, **kwargs),
                                f"83{len(name)}")
        cases[name] = ({"PAINPLAN_MODEL_TAG": tag}, match)
    # 6. no model with that tag
    cases["missing"] = ({"PAINPLAN_MODEL_TAG": "painplan:v404-000000000000"}, "no model")
    # 7. outside demo mode, no HMAC secret
    cases["no-hmac-key"] = ({"PAINPLAN_HMAC_KEY": None, "PAINPLAN_DEMO": None},
                            "PAINPLAN_HMAC_KEY is not set")

    servers = {
        name: H.Server(env_for(f"sqlite:///{tmp_path}/{name}.db", **env),
                       tmp_path / f"{name}.log").start()
        for name, (env, _) in cases.items()
    }
    took: dict[str, float] = {}
    t0 = time.monotonic()
    try:
        for name, server in servers.items():
            try:
                server.wait_exit(max(1.0, REFUSE_TIMEOUT_S - (time.monotonic() - t0)))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name}: bentoml serve did not refuse within "
                            f"{REFUSE_TIMEOUT_S} s:\n{server.log_tail()}")
            took[name] = time.monotonic() - t0
    finally:
        for server in servers.values():
            server.stop()
    print(json.dumps({k: round(v, 1) for k, v in took.items()}))

    for name, server in servers.items():
        _, match = cases[name]
        output = server.log_text()
        assert server.proc.returncode != 0, f"{name}: exit code 0\n{output}"
        lines = [line for line in output.splitlines() if "painplan service cannot start" in line]
        assert len(lines) == 1, f"{name}: expected one refusal line\n{output}"
        assert match in lines[0], f"{name}: {lines[0]}"
        assert "Traceback" not in output, f"{name}: a traceback was printed\n{output}"
        assert len(lines[0]) < 1200  # one paragraph, not a dump


def test_the_in_process_service_refuses_the_genuine_bundles_too(model, asgi, env_for, tmp_path):
    for name, kwargs, match in [("schema", {"schema": OTHER}, "feature schema"),
                                ("ruleset", {"ruleset": OTHER}, "safety ruleset")]:
        tag = _store_unverified(_other_bundle(model, tmp_path / name, **kwargs),
                                f"84{len(name)}")
        with pytest.raises(IncompatibleModel, match=match) as err:
            with asgi(env_for(f"sqlite:///{tmp_path}/a.db", PAINPLAN_MODEL_TAG=tag)):
                pass
        assert "\n" not in str(err.value)


def test_serving_refusal_reaches_the_cli_user(model, env_for, tmp_path):
    """``python -m recommender.service check-model`` (what operators run) says the same."""
    tag = _store_unverified(_other_bundle(model, tmp_path / "r", ruleset=OTHER), "850")
    env = env_for("sqlite:///x.db")
    proc = subprocess.run([sys.executable, "-m", "recommender.service", "check-model", "--tag",
                           tag], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 3, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("painplan check-model: error:") and "safety ruleset" in line
