"""Batch scoring building blocks shared by both engines of ``painplan recommend``.

* :func:`rank_block` is *the* per-chunk step: validated patients → :func:`recommender.recommend.
  recommend` (estimates, safety floor, ranking) → CONTRACT §7 rows. The single-process engine
  (:func:`training.pipeline.recommend_file`) and the Dask engine
  (:mod:`training.dask_recommend`, one call per chunk inside every partition) both call it, so
  the two cannot drift apart.
* :func:`dataset_pieces` / :func:`read_piece` describe a patient dataset (one ``.csv``/
  ``.parquet`` file, or a directory of them) as pieces of bounded size, read with the same
  readers everywhere.

Memory per scored chunk is dominated by the (rows × 839 plans) float64 arrays of
:class:`recommender.model.PlanEstimates` and their temporaries: about
``rows × 839 × 8 B × ~7 arrays`` ≈ 47 kB per patient, so 235 MB for the default 5000-row chunk
(measured peak in ``docs/scale-out.md``). The chunk, not the partition, bounds that part; a
partition adds only its own input rows (~1 kB per patient) and its output (``top_k`` rows per
patient).

The single-process engine scores each chunk with :func:`scoring_threads` threads (2 by
default on a machine with 2 or more CPUs), each ranking an equal slice of the chunk: NumPy and
LightGBM release the GIL for their heavy work, so the slices run on separate cores, and the
live memory stays that of one chunk. Every patient is ranked independently, so the rows are
bit-identical whatever the number of threads or the chunk size. Dask workers score with one
thread per task (Dask already runs tasks in parallel).

Nothing here imports Dask or MLflow: Dask workers import this module to score.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from features.errors import ContractError
from features.io import SUFFIXES, read_table
from features.schema import PATIENT_ID

log = logging.getLogger(__name__)

CHUNK_SIZE = 5000  # patients per scoring block: 5000 × 839 plans × 7 estimates ≈ 235 MB peak
PARTITION_ROWS = 20_000  # default upper bound of patients per Dask partition (see module doc)
BYTES_PER_PATIENT_PLAN = 8 * 7  # float64 × ~7 live (patients × plans) arrays while ranking
THREADS_ENV = "PAINPLAN_SCORING_THREADS"
DEFAULT_THREADS = 2  # more threads would cut a chunk into slices too small to pay off


def scoring_threads() -> int:
    """Threads the single-process engine scores a chunk with: ``PAINPLAN_SCORING_THREADS``
    when set (1 turns threading off), else 2 when this process may use 2 or more CPUs."""
    from features.errors import ConfigError

    text = os.environ.get(THREADS_ENV, "").strip()
    if text:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise ConfigError(f"{THREADS_ENV}={text!r} must be a whole number of threads, 1 or "
                              f"more (1 scores in one thread); unset it for the default")
        return value
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(DEFAULT_THREADS, cpus))


def chunk_bytes(rows: int, n_plans: int = 839) -> int:
    """Rough peak bytes of scoring ``rows`` patients at once (the formula in the module doc)."""
    return int(rows) * int(n_plans) * BYTES_PER_PATIENT_PLAN


def rank_block(model, patients: pd.DataFrame, *, top_k: int) -> pd.DataFrame:
    """CONTRACT §7 rows for one block of *validated* patients: the one scoring step.

    Estimates, the safety floor and ranking all come from :func:`recommender.recommend.
    recommend`; only the row layout comes from :func:`recommender.recommend.ranked_rows`.
    """
    from recommender.recommend import ranked_rows, recommend

    return ranked_rows(recommend(model, patients, top_k=top_k), patients[PATIENT_ID].to_numpy())


def iter_ranked(
    model, patients: pd.DataFrame, *, top_k: int, chunk_size: int = CHUNK_SIZE, threads: int = 1
) -> Iterator[tuple[int, pd.DataFrame]]:
    """Yield ``(patients done so far, §7 rows)`` per block of ``chunk_size`` patients.

    With ``threads`` > 1 each block is cut into that many equal slices, ranked concurrently
    and put back in order: the same rows, with the memory of one block.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    n = len(patients)
    if threads == 1:
        for start in range(0, n, chunk_size):
            block = patients.iloc[start : start + chunk_size]
            yield min(start + chunk_size, n), rank_block(model, block, top_k=top_k)
        return

    def rank(piece: pd.DataFrame) -> pd.DataFrame:
        return rank_block(model, piece, top_k=top_k)

    with ThreadPoolExecutor(threads, thread_name_prefix="painplan-score") as pool:
        for start in range(0, n, chunk_size):
            block = patients.iloc[start : start + chunk_size]
            step = -(-len(block) // threads)  # ceil: at most `threads` slices
            slices = [block.iloc[i : i + step] for i in range(0, len(block), step)]
            parts = list(pool.map(rank, slices))
            rows = parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)
            yield min(start + chunk_size, n), rows


def empty_ranked() -> pd.DataFrame:
    """A zero-row §7 frame with the column types :func:`rank_block` produces."""
    from recommender.recommend import RANKED_COLUMNS

    return pd.DataFrame(
        {
            name: pd.Series(
                [],
                dtype=object
                if name in (PATIENT_ID, "plan")
                else (np.int64 if name == "rank" else float),
            )
            for name in RANKED_COLUMNS
        }
    )


def ranked_schema():
    """The Arrow schema of a §7 Parquet file (fixed, so every partition file agrees)."""
    import pyarrow as pa

    from recommender.recommend import RANKED_COLUMNS

    types = {PATIENT_ID: pa.string(), "rank": pa.int64(), "plan": pa.string()}
    return pa.schema([(name, types.get(name, pa.float64())) for name in RANKED_COLUMNS])


def ranked_table(rows: pd.DataFrame):
    """§7 rows as an Arrow table in :func:`ranked_schema` (strings stay strings, even empty)."""
    import pyarrow as pa

    return pa.Table.from_pandas(rows, schema=ranked_schema(), preserve_index=False)


# --------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class Piece:
    """A bounded slice of a patient dataset: a whole file, or some row groups of a Parquet file.

    ``first_row`` is the 0-based position of the piece's first row within its file, so a
    validation problem can be located in the file the user has.
    """

    path: str
    row_groups: tuple[int, ...] | None
    rows: int
    first_row: int = 0

    def describe(self) -> str:
        if self.row_groups is None:
            return self.path
        return (
            f"{self.path} (data rows {self.first_row + 1}-{self.first_row + self.rows}; "
            "row numbers below count from the first row of this block)"
        )


def dataset_files(path: str | Path) -> list[Path]:
    """The data files of a patient dataset: the file itself, or every ``.parquet``/``.csv``
    file under a directory (recursively, sorted by path; hidden and ``_``-prefixed files such
    as ``_SUCCESS``/``_metadata`` are skipped, as Spark and Dask write them)."""
    path = Path(path)
    if not path.exists():
        raise ContractError(
            f"{path}: no such file or directory; check the path (a .csv or "
            ".parquet file, or a directory of .parquet files)"
        )
    if path.is_file():
        read_suffix = path.suffix.lower()
        if read_suffix not in SUFFIXES:
            raise ContractError(
                f"{path.name}: unsupported file type {read_suffix or '(none)'!r};"
                " painplan reads .csv and .parquet files, or a directory of them"
            )
        return [path]
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix.lower() in SUFFIXES
        and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts)
    )
    if not files:
        raise ContractError(
            f"{path}: the directory holds no .parquet or .csv files; point "
            "--patients at a patient file or a directory of Parquet partitions"
        )
    return files


def dataset_pieces(path: str | Path, max_rows: int = PARTITION_ROWS) -> list[Piece]:
    """Split a dataset into pieces of at most ``max_rows`` rows where the files allow it.

    A Parquet file is split along its row groups (never inside one); a CSV file, or a Parquet
    file written as one big row group, stays one piece and is logged as oversized, because its
    rows can only be read together.
    """
    import pyarrow.parquet as pq

    pieces: list[Piece] = []
    for file in dataset_files(path):
        if file.suffix.lower() != ".parquet":
            pieces.append(Piece(str(file), None, -1))
            continue
        try:
            meta = pq.ParquetFile(file).metadata
        except (OSError, ValueError) as err:  # pyarrow raises ArrowInvalid (a ValueError)
            raise ContractError(
                f"{file}: cannot be read as parquet ({' '.join(str(err).split())}); check that "
                "the file is not truncated and the extension matches the content"
            ) from err
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        if meta.num_rows <= max_rows or len(sizes) <= 1:
            pieces.append(Piece(str(file), None, meta.num_rows))
            continue
        group: list[int] = []
        rows = first = 0
        for i, size in enumerate(sizes):
            if group and rows + size > max_rows:
                pieces.append(Piece(str(file), tuple(group), rows, first))
                group, first, rows = [], first + rows, 0
            group.append(i)
            rows += size
        pieces.append(Piece(str(file), tuple(group), rows, first))
    big = [p for p in pieces if p.rows > max_rows]
    if big:
        log.warning(
            "%d piece(s) exceed %d rows (largest %d, %s): each is read and held as one partition;"
            " write the dataset as more files or smaller row groups to spread and bound the work",
            len(big),
            max_rows,
            max(p.rows for p in big),
            big[0].path,
        )
    return pieces


def read_piece(piece: Piece) -> pd.DataFrame:
    """Read one piece with the same reader as a single file (:func:`features.io.read_table`)."""
    if piece.row_groups is None:
        return read_table(piece.path)
    import pyarrow.parquet as pq

    return pq.ParquetFile(piece.path).read_row_groups(list(piece.row_groups)).to_pandas()


def read_dataset(path: str | Path) -> pd.DataFrame:
    """Every row of a dataset (file or directory, files in :func:`dataset_files` order)."""
    frames = [read_table(f) for f in dataset_files(path)]
    return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
