"""``painplan recommend --engine dask``: rank plans for a Parquet dataset on a Dask cluster.

What runs where
---------------
*Driver* (this process): lists the dataset's pieces from Parquet footers only
(:func:`training.batch.dataset_pieces`, at most ``partition_rows`` patients each, split along
row groups), loads and checks the model bundle once (integrity hash, schema, smoke test), sends
it to every worker once (``client.scatter(..., broadcast=True)``: each worker keeps one
deserialised copy in memory for all its tasks), and moves the finished output into place.

*Workers*, one task per piece: read the piece (the same reader as ``--engine local``), validate
it against CONTRACT §2 (a problem names the file, and for split files the block), rank it with
:func:`training.batch.iter_ranked` — the very per-chunk function the single-process engine calls
— through :meth:`dask.dataframe.DataFrame.map_partitions`, and write one Parquet file of §7 rows
(``part-00000.parquet`` … in input order) into a temporary directory beside ``out``. Workers
therefore need the input and the output directory on a filesystem they share with the driver.

Memory per task: the piece's input rows (~1 kB per patient) + its output (``top_k`` rows per
patient) + one scoring chunk, ``chunk_size × 839 plans × 8 B × ~7 arrays`` (≈ 235 MB at the
default 5000). With the default ``partition_rows=20_000`` a worker thread needs well under 1 GB.

Output is all or nothing: the temporary directory replaces ``out`` only when every partition
was written; a failure removes it and leaves an existing ``out`` untouched.
"""

from __future__ import annotations

import logging
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from features.errors import ConfigError, ContractError
from training import batch

log = logging.getLogger(__name__)

PART_NAME = "part-{:05d}.parquet"

# A minimal CONTRACT §2 patient, validated once on the driver to give Dask the exact column
# types of a validated partition (its "meta") without reading any data there.
_META_PATIENT = {
    "patient_id": "meta",
    "age": 50,
    "sex": "female",
    "pain_condition": "low_back",
    "pain_duration_months": 12.0,
    "pain_intensity": 5.0,
    "peg": 5.0,
    "phq9": 5,
    "gad7": 5,
}


def _validated_meta() -> pd.DataFrame:
    from features.validate import validate

    return validate(pd.DataFrame([_META_PATIENT]), "patients").frame.iloc[:0]


def read_valid_piece(piece: batch.Piece) -> pd.DataFrame:
    """Worker side: read one piece and validate it (CONTRACT §2); problems name the file."""
    from features.validate import validate

    raw = batch.read_piece(piece)
    try:
        return validate(raw, "patients").frame
    except ContractError as err:
        raise ContractError(f"{piece.describe()}: {err}", err.violations) from None


def rank_partition(patients: pd.DataFrame, model, *, top_k: int, chunk_size: int) -> pd.DataFrame:
    """Worker side: §7 rows of one validated partition, chunk by chunk (bounded memory)."""
    parts = [
        rows for _, rows in batch.iter_ranked(model, patients, top_k=top_k, chunk_size=chunk_size)
    ]
    return pd.concat(parts, ignore_index=True) if parts else batch.empty_ranked()


def write_part(rows: pd.DataFrame, path: str) -> int:
    """Worker side: one §7 Parquet file (fixed schema); returns its row count."""
    import pyarrow.parquet as pq

    pq.write_table(batch.ranked_table(rows), path)
    return len(rows)


def _check_out(out: Path) -> None:
    if out.suffix.lower() == ".csv":
        raise ConfigError(
            f"--out {out}: the Dask engine writes a directory of Parquet "
            "partitions, not CSV; name a directory (e.g. ranked/)"
        )
    if out.exists() and not out.is_dir():
        raise ConfigError(
            f"--out {out} is an existing file; the Dask engine writes a directory "
            "of Parquet partitions: name a new or previous output directory"
        )
    if out.is_dir():
        foreign = [
            p.name
            for p in out.iterdir()
            if not (p.is_file() and p.name.startswith("part-") and p.suffix == ".parquet")
        ]
        if foreign:
            raise ConfigError(
                f"--out {out} exists and holds other things than painplan partitions (e.g. "
                f"{foreign[0]!r}); it is not replaced. Name a new directory, or empty it first"
            )


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace ``out`` by the finished ``tmp`` directory (old output removed only after)."""
    old = None
    if out.exists():
        _check_out(out)  # still only our partitions: safe to replace
        old = out.with_name(f".{out.name}.old-{secrets.token_hex(4)}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recommend_dataset(
    patients_path: str | Path,
    out_dir: str | Path,
    *,
    model: str | None = None,
    top_k: int = 5,
    model_name: str = "painplan",
    chunk_size: int = batch.CHUNK_SIZE,
    partition_rows: int = batch.PARTITION_ROWS,
    scheduler: str | None = None,
    progress: Callable[[str], None] | None = None,
    use_model_cache: bool = True,
) -> int:
    """Rank plans for every patient of a dataset on Dask; write a Parquet dataset directory.

    ``patients_path`` is a ``.parquet``/``.csv`` file or a directory of them (a Parquet
    dataset); ``out_dir`` receives ``part-00000.parquet`` … with CONTRACT §7 rows, one file per
    input piece, in input order. ``scheduler`` is a Dask scheduler address; without one a
    local cluster is started for the call. Returns the number of rows written.
    """
    from recommender.recommend import MAX_TOP_K
    from training.dask_cluster import check_dask, cluster
    from training.pipeline import load_scoring_model

    say = progress or log.info
    if not 1 <= int(top_k) <= MAX_TOP_K:
        raise ConfigError(f"top_k must be between 1 and {MAX_TOP_K}, got {top_k}")
    if chunk_size < 1 or partition_rows < 1:
        raise ConfigError(
            f"chunk_size and partition_rows must be at least 1, got {chunk_size} "
            f"and {partition_rows}"
        )
    out = Path(out_dir)
    _check_out(out)
    check_dask(scheduler)
    import dask
    import dask.dataframe as dd
    from distributed import as_completed

    say(f"reading the layout of {patients_path}")
    pieces = batch.dataset_pieces(patients_path, partition_rows)
    known = sum(p.rows for p in pieces if p.rows >= 0)
    say(
        f"{len(pieces)} partition(s) of at most {partition_rows} patients"
        + (f" ({known} patients in Parquet)" if known else "")
    )
    bundle = load_scoring_model(model, model_name=model_name, progress=say,
                                use_model_cache=use_model_cache)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{secrets.token_hex(4)}")
    tmp.mkdir()
    written = 0
    try:
        with (
            cluster(scheduler, progress=say) as client,
            # Partitions keep the validated dtypes (no conversion to Arrow strings).
            dask.config.set({"dataframe.convert-string": False}),
        ):
            say("sending the model to the workers")
            model_on_workers = dask.delayed(
                client.scatter(bundle.model, broadcast=True, hash=False)
            )
            patients = dd.from_map(
                read_valid_piece,
                pieces,
                meta=_validated_meta(),
                enforce_metadata=False,
                label="read-validate",
            )
            ranked = patients.map_partitions(
                rank_partition,
                model_on_workers,
                top_k=top_k,
                chunk_size=chunk_size,
                meta=batch.empty_ranked(),
                enforce_metadata=False,
            )
            writes = [
                dask.delayed(write_part)(part, str(tmp / PART_NAME.format(i)))
                for i, part in enumerate(ranked.to_delayed())
            ]
            futures = client.compute(writes)
            done = 0
            try:
                for future in as_completed(futures, loop=client.loop):
                    written += future.result()
                    done += 1
                    say(f"ranked {done}/{len(futures)} partitions ({written} rows written)")
            finally:
                if done < len(futures):  # a partition failed: stop the others
                    client.cancel(futures)
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written
