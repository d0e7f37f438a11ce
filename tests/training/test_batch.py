"""training.batch (dataset pieces) and the cluster-free parts of the Dask engines."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from features.errors import ContractError
from training.batch import Piece, chunk_bytes, dataset_files, dataset_pieces, read_piece


@pytest.fixture
def dataset(tmp_path):
    frame = pd.DataFrame({"patient_id": [f"p{i}" for i in range(1000)], "age": 50})
    frame.iloc[:700].to_parquet(tmp_path / "a.parquet", index=False, row_group_size=100)
    frame.iloc[700:].to_csv(tmp_path / "b.csv", index=False)
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / ".hidden.parquet").write_text("not data")
    return tmp_path, frame


def test_pieces_split_parquet_along_row_groups_and_keep_order(dataset):
    root, frame = dataset
    pieces = dataset_pieces(root, max_rows=250)
    assert [p.path.rsplit("/", 1)[-1] for p in pieces] == ["a.parquet"] * 4 + ["b.csv"]
    assert [p.rows for p in pieces[:4]] == [200, 200, 200, 100]
    assert [p.first_row for p in pieces[:4]] == [0, 200, 400, 600]
    assert pieces[0].row_groups == (0, 1) and pieces[-1].row_groups is None
    back = pd.concat([read_piece(p) for p in pieces], ignore_index=True)
    assert back["patient_id"].tolist() == frame["patient_id"].tolist()
    assert "data rows 201-400" in pieces[1].describe()


def test_small_files_are_one_piece_each(dataset):
    root, _ = dataset
    assert [p.row_groups for p in dataset_pieces(root, max_rows=10_000)] == [None, None]


def test_dataset_errors_say_what_to_do(tmp_path):
    with pytest.raises(ContractError, match="no such file or directory"):
        dataset_files(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ContractError, match="holds no .parquet or .csv files"):
        dataset_files(tmp_path / "empty")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ContractError, match="unsupported file type '.json'"):
        dataset_files(tmp_path / "x.json")


def test_chunk_memory_formula():
    assert chunk_bytes(5000) == 5000 * 839 * 8 * 7  # ≈ 235 MB, the default chunk


def test_block_labels_decode_to_block_order():
    from training.dask_learners import _block_bounds, _decode_blocks

    bounds = _block_bounds(10, 3)
    assert bounds == [(0, 3), (3, 7), (7, 10)]
    labels = np.r_[np.full(4, 1.0), np.full(3, 0.0)].astype(np.float32)  # LightGBM's labels
    assert _decode_blocks(labels) == [(1, 4), (0, 3)]


def test_detach_clears_every_engine_reference():
    from recommender.boosting import VaryingCoefficientBooster
    from recommender.model import PlanOutcomeModel
    from recommender.propensity import LoggingPolicyModel
    from training.dask_learners import detach

    engine = object()
    model = PlanOutcomeModel(engine=engine)
    model.e_models_ = [VaryingCoefficientBooster(trainer=engine)]
    model.effect_model_ = VaryingCoefficientBooster(trainer=engine)
    policy = LoggingPolicyModel(engine=engine)
    detach(model, policy)
    assert model.engine is None and policy.engine is None
    assert model.e_models_[0].trainer is None and model.effect_model_.trainer is None


def test_piece_describes_whole_files_by_path():
    assert Piece("d/a.parquet", None, 10).describe() == "d/a.parquet"
