"""Read and write contract tables by file extension (.csv or .parquet).

CSV is read with every cell as text (so the validator sees the spelling the user wrote, and
``"007"`` stays ``"007"``), empty cells as missing, UTF-8 with or without a byte-order mark
(Excel's "CSV UTF-8" writes one). Rows with more or fewer fields than the header are an
error rather than silently shifted or padded. A header that names a column twice is kept
as written, so :func:`features.validate.validate` reports it with everything else instead of
pandas renaming the copy to ``name.1``.
"""

from __future__ import annotations

import codecs
import csv
from pathlib import Path

import pandas as pd

from features.errors import ContractError

SUFFIXES = (".csv", ".parquet")


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ContractError(
            f"{path.name}: unsupported file type {suffix or '(none)'!r}; "
            "painplan reads and writes .csv and .parquet files"
        )
    return suffix


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a CSV (every cell as text, so the validator sees the spelling) or Parquet file."""
    path = Path(path)
    suffix = _suffix(path)
    if not path.exists():
        raise ContractError(f"{path}: no such file; check the path")
    if path.is_file() and path.stat().st_size == 0:
        raise ContractError(
            f"{path.name}: the file is empty (0 bytes); it needs a header row and data rows"
        )
    try:
        if suffix == ".csv":
            return _read_csv(path)
        return pd.read_parquet(path)
    except UnicodeDecodeError as err:
        raise ContractError(
            f"{path.name}: not UTF-8 text ({_first_bad_byte(path)}); "
            "save the file as UTF-8 CSV (in Excel: 'CSV UTF-8')"
        ) from err
    except pd.errors.EmptyDataError as err:
        raise ContractError(
            f"{path.name}: the file has no header row; it needs a header row and data rows"
        ) from err
    except (pd.errors.ParserError, ValueError, OSError) as err:
        raise ContractError(
            f"{path.name}: cannot be read as {suffix[1:]} ({_one_line(err)}); check that every "
            "row has as many fields as the header, the file is not truncated and the extension "
            "matches the content"
        ) from err


def _first_bad_byte(path: Path, chunk: int = 1 << 20) -> str:
    """Where the first byte that is not UTF-8 sits, in words a user can act on."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # bytes read so far
    with path.open("rb") as fh:
        while True:
            block = fh.read(chunk)
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as err:
                # err.object is the few bytes carried over from the last block plus this one
                pos = offset + len(block) - len(err.object) + err.start
                fh.seek(0)
                line = fh.read(pos).count(b"\n") + 1
                bad = err.object[err.start : err.start + 1].hex()
                return f"byte 0x{bad} on line {line}, byte offset {pos}"
            if not block:
                return "invalid byte sequence"
            offset += len(block)


def _read_csv(path: Path) -> pd.DataFrame:
    df = pd.read_csv(
        path,
        dtype=str,
        keep_default_na=False,
        na_values=[""],
        encoding="utf-8-sig",
        engine="pyarrow",  # several times faster than the C engine, and strict on ragged rows
    )
    with path.open(encoding="utf-8-sig", newline="") as fh:
        header = next(csv.reader(fh), [])
    if len(header) == len(df.columns) and len(set(header)) < len(header):
        df.columns = header  # undo pandas' renaming of repeated names so validate reports them
    return df


def write_table(df: pd.DataFrame, path: str | Path) -> Path:
    """Write ``df`` by extension; creates the parent directory."""
    path = Path(path)
    suffix = _suffix(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".csv":
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path, index=False)
    return path


def profile_records(frame: pd.DataFrame) -> list[dict]:
    """Each row's CONTRACT §2 patient profile as a JSON-ready dict (missing values left out,
    numpy scalars as Python ones): the body of a ``POST /recommend`` for that patient."""
    from features.schema import PATIENT_COLUMNS

    names = [c.name for c in PATIENT_COLUMNS if c.name in frame.columns]
    out = []
    for row in frame[names].itertuples(index=False):
        profile = {}
        for name, value in zip(names, row, strict=True):
            if value is None or pd.isna(value):
                continue
            profile[name] = value.item() if hasattr(value, "item") else value
        out.append(profile)
    return out
