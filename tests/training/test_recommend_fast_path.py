"""What makes ``painplan recommend`` fast besides the model cache (tests/training/
test_model_cache.py): threaded scoring in the single-process engine — the same rows, bit for
bit, whatever the number of threads, and a clear refusal of a bad PAINPLAN_SCORING_THREADS —
and the garbage-collector settings of its start-up, which must never outlive the command."""

from __future__ import annotations

import gc

import pandas as pd
import pytest

from features.errors import ConfigError
from training.batch import THREADS_ENV, iter_ranked, scoring_threads


def test_scoring_threads_default_and_override(monkeypatch):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert 1 <= scoring_threads() <= 2
    monkeypatch.setenv(THREADS_ENV, "1")
    assert scoring_threads() == 1
    monkeypatch.setenv(THREADS_ENV, " 3 ")
    assert scoring_threads() == 3
    for bad in ("0", "-2", "two", "1.5"):
        monkeypatch.setenv(THREADS_ENV, bad)
        with pytest.raises(ConfigError, match=f"{THREADS_ENV}='{bad}' must be a whole number"):
            scoring_threads()


def test_threads_must_be_positive():
    with pytest.raises(ValueError, match="threads must be at least 1"):
        next(iter_ranked(None, pd.DataFrame({"patient_id": ["a"]}), top_k=1, threads=0))


@pytest.fixture(scope="module")
def patients(helpers) -> pd.DataFrame:
    from features.validate import validate
    from training.simulate import simulate_episodes

    episodes = simulate_episodes(1400, seed=23, progress=False)
    return validate(helpers.read_patients(episodes, 1001), "patients").frame


@pytest.mark.slow
def test_threaded_blocks_rank_bit_identically(in_store, patients):
    from training.pipeline import load_scoring_model

    model = load_scoring_model(f"models:/painplan/{in_store.good_result.version}").model

    def ranked(threads: int, chunk: int) -> tuple[list[int], pd.DataFrame]:
        out = list(iter_ranked(model, patients, top_k=4, chunk_size=chunk, threads=threads))
        return [done for done, _ in out], pd.concat([rows for _, rows in out], ignore_index=True)

    done, one = ranked(1, 300)
    assert done == [300, 600, 900, 1001]
    assert len(one) == 1001 * 4
    for threads, chunk in ((2, 300), (3, 300), (2, 1001), (4, 7)):
        got_done, got = ranked(threads, chunk)
        assert got_done == ranked(1, chunk)[0]
        pd.testing.assert_frame_equal(got, one, check_exact=True)


@pytest.mark.slow
def test_recommend_file_output_does_not_depend_on_threads(in_store, patients, tmp_path,
                                                         monkeypatch):
    from training.pipeline import recommend_file

    path = tmp_path / "patients.csv"
    patients.to_csv(path, index=False)
    outputs = []
    for threads in ("1", "2", "3"):
        monkeypatch.setenv(THREADS_ENV, threads)
        seen = []
        out = tmp_path / f"ranked-{threads}.csv"
        recommend_file(path, out, top_k=5, chunk_size=400, progress=seen.append)
        assert any(line.startswith("scoring 1001 patients") for line in seen)
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]


def test_a_bad_thread_setting_fails_before_any_work(tmp_path, monkeypatch, capsys):
    from training.cli import main

    monkeypatch.setenv(THREADS_ENV, "zero")
    code = main(["recommend", "--patients", str(tmp_path / "missing.csv"), "--out",
                 str(tmp_path / "o.csv")])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 4
    assert error == [f"painplan recommend: error: {THREADS_ENV}='zero' must be a whole number "
                     "of threads, 1 or more (1 scores in one thread); unset it for the default"]


@pytest.mark.parametrize("works", [True, False])
def test_recommend_leaves_the_collector_enabled(works, in_store, tmp_path, patients, capsys):
    from training.cli import main

    path = tmp_path / "patients.csv"
    patients.head(20).to_csv(path, index=False)
    args = ["recommend", "--patients", str(path if works else tmp_path / "missing.csv"),
            "--out", str(tmp_path / "o.csv")]
    assert main(args) == (0 if works else 2)
    assert gc.isenabled()
