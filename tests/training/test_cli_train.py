"""The train / promote / recommend commands: thin wrappers, contract-shaped output, clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from features.validate import validate
from recommender.recommend import RANKED_COLUMNS
from recommender.safety import floor_violations
from training.cli import main


@pytest.fixture(scope="module")
def patients_file(tmp_path_factory) -> Path:
    """Patients with contraindications on purpose, so the floor has something to exclude."""
    from training.simulate import simulate_truth

    patients, _ = simulate_truth(60, seed=31, progress=False)
    patients = patients.copy()
    patients.loc[:9, "maoi"] = True
    patients.loc[10:19, "gi_bleed_history"] = True
    patients.loc[20:29, "prior_opioid"] = "intolerant"
    patients.loc[30:39, "egfr"] = 20.0
    path = tmp_path_factory.mktemp("patients") / "patients.csv"
    patients.to_csv(path, index=False)
    return path


def check_ranked(rows: pd.DataFrame, patients_path: Path, top_k: int) -> None:
    """CONTRACT §7 and §5 properties of a ranked output."""
    assert list(rows.columns) == list(RANKED_COLUMNS)
    patients = validate(pd.read_csv(patients_path, dtype=str), "patients").frame
    assert set(rows.patient_id.astype(str)) == set(patients.patient_id)
    for _, group in rows.groupby("patient_id", sort=False):
        assert list(group["rank"]) == list(range(1, top_k + 1))
        assert group.utility.is_monotonic_decreasing
    assert (rows.improvement_low <= rows.expected_improvement + 1e-9).all()
    assert (rows.expected_improvement <= rows.improvement_high + 1e-9).all()
    assert rows.p_response.between(0, 1).all() and rows.p_adverse_event.between(0, 1).all()
    by_id = patients.set_index("patient_id")
    aligned = by_id.loc[rows.patient_id.astype(str)].reset_index()
    assert not floor_violations(aligned, rows.plan.tolist()).any()


def test_every_command_has_help(capsys):
    for command in ("train", "promote", "recommend"):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        assert "usage: painplan " + command in capsys.readouterr().out
    out = subprocess.run(
        [sys.executable, "-m", "training.cli", "train", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--data FILE" in out and "--promote" in out


@pytest.mark.parametrize("k", ["0", "51", "three"])
def test_top_k_out_of_range_is_refused(k, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["recommend", "--patients", "p.csv", "--out", str(tmp_path / "o.csv"), "--top-k", k])
    assert exit_.value.code == 2
    assert "between 1 and 50" in capsys.readouterr().err


def test_train_on_a_bad_file_exits_non_zero_with_one_paragraph_and_no_run(
    tmp_path, monkeypatch, capsys, helpers
):
    helpers.use_store(monkeypatch, tmp_path / "home")
    cohort = helpers.write_cohort(tmp_path, 150, seed=5)
    bad = cohort["episodes"].astype(str)
    bad.loc[7, "peg_12wk"] = "12.5"
    bad = bad.drop(columns=["adverse_event"])
    bad.to_csv(tmp_path / "bad.csv", index=False)
    code = main(["train", "--data", str(tmp_path / "bad.csv")])
    progress, error = capsys.readouterr().err.rstrip("\n").rsplit("\n", 1)
    assert code == 2
    assert progress.startswith("painplan: validating")
    assert error.startswith("painplan train: error: 2 problem(s)")  # one paragraph, one line
    assert "'peg_12wk'" in error and "'adverse_event'" in error
    assert not (tmp_path / "home").exists()


@pytest.mark.slow
def test_train_prints_run_id_and_model_uri(in_store, tmp_path, capsys, helpers):
    # Same store as the other tests (a fresh SQLite store costs ~5 s of migrations), but its
    # own experiment and registered model.
    cohort = helpers.write_cohort(tmp_path, 400, seed=6)
    config = tmp_path / "train.yaml"
    config.write_text("model_name: cli-model\nmodel:\n  max_rounds: 30\n  n_jobs: 1\n")
    code = main(
        [
            "train",
            "--data",
            str(cohort["data"]),
            "--config",
            str(config),
            "--experiment",
            "cli",
            "--seed",
            "3",
            "--promote",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = captured.out.splitlines()
    assert lines[0].startswith("run id: ") and len(lines[0]) == len("run id: ") + 32
    assert lines[1] == "model URI: models:/cli-model/1"
    assert lines[2].startswith("promotion: promoted: ")
    assert "painplan: fitting" in captured.err  # progress goes to stderr

    import mlflow

    run = mlflow.MlflowClient().get_run(lines[0].removeprefix("run id: "))
    assert run.data.params["seed"] == "3" and run.data.params["experiment"] == "cli"

    # promote the latest again: it is the champion already
    assert main(["promote", "--model-name", "cli-model"]) == 0
    assert "already the champion" in capsys.readouterr().out


@pytest.mark.slow
def test_recommend_with_the_champion_conforms_to_the_contract(
    in_store, patients_file, tmp_path, capsys
):
    out = tmp_path / "ranked.csv"
    assert (
        main(["recommend", "--patients", str(patients_file), "--out", str(out), "--top-k", "7"])
        == 0
    )
    assert "ranked plan row(s) written" in capsys.readouterr().out
    rows = pd.read_csv(out, dtype={"patient_id": str})
    assert len(rows) == 60 * 7
    check_ranked(rows, patients_file, 7)
    maoi = rows[rows.patient_id.isin(pd.read_csv(patients_file, dtype=str).patient_id[:10])]
    assert not maoi.plan.str.contains("snri|tca|opioid").any()


@pytest.mark.slow
def test_recommend_accepts_version_uris_and_bundle_directories(in_store, patients_file, tmp_path):
    from training.register import load_bundle_from_uri

    version = in_store.good_result.version
    by_version = tmp_path / "v.parquet"
    assert (
        main(
            [
                "recommend",
                "--patients",
                str(patients_file),
                "--out",
                str(by_version),
                "--model",
                f"models:/painplan/{version}",
            ]
        )
        == 0
    )
    bundle_dir = tmp_path / "downloaded"
    load_bundle_from_uri(f"models:/painplan/{version}", dst=bundle_dir)
    local = tmp_path / "local.parquet"
    assert (
        main(
            [
                "recommend",
                "--patients",
                str(patients_file),
                "--out",
                str(local),
                "--model",
                str(bundle_dir / "artifacts" / "bundle"),
            ]
        )
        == 0
    )
    a, b = pd.read_parquet(by_version), pd.read_parquet(local)
    pd.testing.assert_frame_equal(a, b)
    check_ranked(a, patients_file, 5)


@pytest.mark.slow
def test_recommend_in_chunks_equals_one_pass(in_store, patients_file, tmp_path):
    from training.pipeline import recommend_file

    one = tmp_path / "one.csv"
    many = tmp_path / "many.parquet"
    seen = []
    recommend_file(patients_file, one, top_k=3)
    recommend_file(patients_file, many, top_k=3, chunk_size=7, progress=seen.append)
    assert sum("ranked" in s for s in seen) == int(np.ceil(60 / 7))
    a = pd.read_csv(one, dtype={"patient_id": str})
    b = pd.read_parquet(many)
    pd.testing.assert_frame_equal(a, b, check_dtype=False)
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.slow
def test_recommend_without_a_champion_explains_what_to_do(in_store, tmp_path, capsys, helpers):
    patients = helpers.read_patients(in_store.good["episodes"], 5)
    patients.to_csv(tmp_path / "p.csv", index=False)
    code = main(
        [
            "recommend",
            "--patients",
            str(tmp_path / "p.csv"),
            "--out",
            str(tmp_path / "o.csv"),
            "--model-name",
            "never-registered",
        ]
    )
    assert code == 3
    assert "no champion" in capsys.readouterr().err
    assert not (tmp_path / "o.csv").exists()
