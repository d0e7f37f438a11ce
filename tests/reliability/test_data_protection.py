"""Data protection (docs/reliability.md §5): no raw patient id and no free-text name in what
training leaves in MLflow; API keys held only as digests, in memory and anywhere persisted.
(The server's logs and the audit rows are searched in test_load.py, after 32 clients sent
the sentinels for 20 s; refusing to start without an HMAC secret is in
test_startup_refusals.py.)"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import reliability_harness as H

SENTINELS = (H.SENTINEL_ID, "EP-SENTINEL-", H.SENTINEL_NAME)


def _readable(path: Path) -> Iterator[str]:
    """The file's bytes as text, and what compressed or columnar formats hold inside."""
    data = path.read_bytes()
    yield data.decode("utf-8", "replace")
    if path.suffix == ".parquet":
        frame = pd.read_parquet(path)
        yield " ".join(map(str, frame.columns)) + "\n" + frame.to_csv(index=False)
    elif data[:2] == b"\x1f\x8b":
        yield gzip.decompress(data).decode("utf-8", "replace")
    elif data[:2] == b"PK":
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for name in archive.namelist():
                yield name + "\n" + archive.read(name).decode("utf-8", "replace")


@pytest.mark.slow
def test_mlflow_store_holds_no_patient_id_or_name(tiny_run):
    """Every file of the run's MLflow store — database, artifacts, the registered model's
    pickles, parquet validation sets and SHAP tables — searched for the sentinel patient ids
    (every row's), episode ids and names the training file carried."""
    home = tiny_run["home"]
    files = [p for p in home.rglob("*") if p.is_file()]
    parquet = [p for p in files if p.suffix == ".parquet"]
    assert len(files) >= 15 and len(parquet) >= 2, files
    assert any(p.name == "model.pkl" for p in files) and (home / "mlflow.db") in files
    found = []
    for path in files:
        for text in _readable(path):
            found += [(path.relative_to(home), s) for s in SENTINELS if s.lower() in text.lower()]
    assert not found, found
    # and the training file really had them (the search would find them)
    raw = tiny_run["data"].read_text(encoding="utf-8-sig")
    assert all(s in raw for s in SENTINELS)


def _reachable(root, limit: int = 300_000) -> Iterator[object]:
    """Objects reachable from ``root`` through instance attributes and containers (not
    through classes, modules or functions, which lead to everything, os.environ included)."""
    import types

    skip = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType,
            types.MethodType)
    seen: set[int] = set()
    stack = [root]
    while stack and len(seen) < limit:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        yield obj
        if isinstance(obj, str | bytes | bytearray | int | float | bool) or obj is None:
            continue
        module = type(obj).__module__ or ""
        if module.startswith(("numpy", "pandas", "lightgbm", "sklearn", "scipy")):
            continue  # model internals: arrays of numbers
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, list | tuple | set | frozenset):
            stack.extend(obj)
        for name in getattr(type(obj), "__slots__", ()):
            if hasattr(obj, name):
                stack.append(getattr(obj, name))
        if hasattr(obj, "__dict__") and not isinstance(obj, type):
            stack.extend(vars(obj).values())


def test_api_keys_are_held_only_as_digests(asgi, env_for, model, tmp_path):
    import bentoml

    url = f"sqlite:///{tmp_path}/audit.db"
    headers = {"Authorization": f"Bearer {H.CLINICIAN_KEY}"}
    with asgi(env_for(url)) as client:
        body = {"patient": H.random_profile(random.Random(2), H.SENTINEL_ID)}
        assert client.post("/recommend", json=body, headers=headers).status_code == 200
        service = bentoml.get_current_service()
        keys = service.api.config.api_keys
        objects = list(_reachable(service))
    assert len(objects) > 1000  # the walk reached the service's state ...
    assert any(isinstance(o, bytes) and o == H.HMAC_KEY.encode() for o in objects)  # its secrets
    assert keys.entries and all(isinstance(d, bytes) and len(d) == 32 for d, _ in keys.entries)
    assert {d for d, _ in keys.entries} == {hashlib.sha256(k.encode()).digest()
                                             for k in (H.CLINICIAN_KEY, H.AUDITOR_KEY)}
    raw = [H.CLINICIAN_KEY, H.AUDITOR_KEY]
    held = [o for o in objects if isinstance(o, str | bytes)
            and any(k in (o if isinstance(o, str) else o.decode("utf-8", "replace")) for k in raw)]
    assert not held, "a raw API key is held by the service"
    assert not any(k in repr(service.api.config) for k in [*raw, H.HMAC_KEY])
    # nothing persisted holds a key or its digest: the audit store, the model store
    digests = [hashlib.sha256(k.encode()).hexdigest() for k in raw]
    dump = H.audit_dump(url)
    assert not any(s in dump for s in [*raw, *digests, H.HMAC_KEY])
    for path in Path(model.bentoml_home).rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(s.encode() in data for s in [*raw, *digests, H.HMAC_KEY]), path


def test_audit_record_keeps_the_pseudonym_not_the_id_or_extra_fields(asgi, env_for, tmp_path):
    url = f"sqlite:///{tmp_path}/audit.db"
    patient = {**H.random_profile(random.Random(3), H.SENTINEL_ID), "name": H.SENTINEL_NAME,
               "notes": f"{H.SENTINEL_NAME} called about MRN {H.SENTINEL_ID}"}
    with asgi(env_for(url)) as client:
        answer = client.post("/recommend", json={"patient": patient},
                             headers={"Authorization": f"Bearer {H.CLINICIAN_KEY}"}).json()
        record = client.get(f"/audit/{answer['request_id']}",
                            headers={"Authorization": f"Bearer {H.AUDITOR_KEY}"}).json()
    assert any("'name'" in w and "'notes'" in w for w in answer["input_warnings"])
    assert not {"patient_id", "name", "notes"} & set(record["profile"])
    dump = H.audit_dump(url)
    assert H.SENTINEL_ID not in dump and H.SENTINEL_NAME not in dump
    assert json.dumps(record).count(record["patient_key"]) == 1
