"""Check a frame against the contract and return it typed.

:func:`validate` looks at every declared column and collects *all* problems before raising a
single :class:`~features.errors.ContractError`; each problem names the column, the rows
(1-based data rows, header not counted: the first few plus a count) and the bad values.

Every check is vectorised (pandas/pyarrow string kernels, numpy masks): a file of a million
episodes validates in seconds, and the only per-value Python work is parsing each *distinct*
plan spelling once.

The typed frame depends only on the declarations, never on the data, so a model fitted on
one file sees the same dtypes when it is served a single request:

==========  ====================================================================
declared    returned as
==========  ====================================================================
int         ``int64`` if required, nullable ``Int64`` if optional
float       ``float64``, ``NaN`` for missing
bool        ``bool`` if required or defaulted (risk flags), else nullable ``boolean``
category    ``category`` with exactly the declared levels (in declared order)
string      ``object`` (Python ``str``; ``None`` for missing)
plan        ``object``: the canonical plan spelling (CONTRACT §1)
date        ``datetime64[us]``, ``NaT`` for missing
==========  ====================================================================
"""

from __future__ import annotations

import difflib
import functools
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from features.catalog import parse_plan
from features.errors import ContractError, PlanError
from features.schema import Column, Kind, columns_for

log = logging.getLogger(__name__)

SHOW = 5  # rows/values quoted per problem before "and N more"
MAX_VALUE_CHARS = 80  # a quoted bad value longer than this is cut, so the message stays readable
_TRUE = ("true", "1", "yes", "1.0")
_FALSE = ("false", "0", "no", "0.0")
_ISO_DATE = r"^\d{4}-\d{2}-\d{2}(?:$|[T ])"  # a full calendar date, optionally with a time
_DATE_DTYPE = "datetime64[us]"
EPISODE_ONLY = frozenset({"episode_id", "plan", "peg_12wk", "adverse_event"})


@dataclass
class Validated:
    """A contract-conforming frame plus the warnings raised while checking it."""

    frame: pd.DataFrame
    kind: Kind
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Problems:
    """Problems found so far; each becomes one structured entry of ``ContractError.violations``."""

    items: list[dict] = field(default_factory=list)

    def add(
        self,
        column: str,
        problem: str,
        mask: np.ndarray | None = None,
        values: pd.Series | None = None,
        hint: str = "",
    ) -> None:
        rows: list[int] = []
        shown: list = []
        n = 0
        if mask is not None:
            idx = np.flatnonzero(mask)
            n = int(idx.size)
            rows = [int(i) + 1 for i in idx[:SHOW]]
            if values is not None:
                shown = [_jsonable(v) for v in values.iloc[idx[:SHOW]].tolist()]
        item = {
            "column": column,
            "problem": problem,
            "rows": rows,
            "n_rows": n,
            "values": shown,
            "hint": hint,
        }
        item["message"] = _describe(item)
        self.items.append(item)

    def message(self, notes: Iterable[str] = ()) -> str:
        text = (
            f"{len(self.items)} problem(s) found against the painplan contract "
            "(rows are 1-based data rows, header not counted): "
            + "; ".join(p["message"] for p in self.items)
            + "."
        )
        for note in notes:
            text += f" Note: {note}."
        return _one_paragraph(text)


def _describe(p: dict) -> str:
    text = f"column '{p['column']}': {p['problem']}"
    if p["n_rows"]:
        rest = p["n_rows"] - len(p["rows"])
        text += f" at row(s) {', '.join(map(str, p['rows']))}"
        text += f" and {rest} more" if rest > 0 else ""
        if p["values"]:
            text += f" (value(s): {', '.join(_quote(v) for v in p['values'])})"
    if p["hint"]:
        text += f" — {p['hint']}"
    return text


def _quote(v: object) -> str:
    text = repr(v)  # repr also escapes newlines, keeping the message one paragraph
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 1] + "…"


def _one_paragraph(text: str) -> str:
    return " ".join(text.split())


def _jsonable(v: object) -> object:
    if isinstance(v, np.generic):
        v = v.item()
    if v is None or v is pd.NA or v is pd.NaT or (isinstance(v, float) and np.isnan(v)):
        return None
    return v if isinstance(v, (int, float, bool, str)) else str(v)


def _as_text(s: pd.Series) -> pd.Series:
    """Values as stripped text (pandas string dtype, vectorised); missing values become ''."""
    return s.astype("str").str.strip().fillna("")


def _arrow(text: pd.Series) -> pa.Array:
    """The text column as an Arrow string array (zero-copy for pandas' default string dtype)."""
    return pa.array(text, type=pa.large_string())


def _to_float(text: pd.Series, missing: np.ndarray) -> np.ndarray:
    """Parse text to float64 (NaN where missing or not a number)."""
    try:  # Arrow's parser is several times faster; it refuses the whole column on one bad value
        parsed = pc.cast(_arrow(text.where(~missing)), pa.float64())
        return parsed.to_numpy(zero_copy_only=False).astype("float64", copy=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        num = pd.to_numeric(text.where(~missing), errors="coerce")
        return num.to_numpy(dtype="float64", na_value=np.nan, copy=True)


def _is_text_free(s: pd.Series, col: Column) -> bool:
    """True when the column is already in its declared physical type (e.g. from Parquet)."""
    if col.dtype in ("int", "float"):
        return pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s)
    if col.dtype == "bool":
        return pd.api.types.is_bool_dtype(s)
    if col.dtype == "date":
        return pd.api.types.is_datetime64_any_dtype(s)
    return False


# Each converter gets the raw column ``s``, its stripped ``text`` (or None when ``s`` already
# has the declared physical type), the ``missing`` mask, and returns the typed column.


def _numeric(col: Column, s, text, missing, problems: _Problems) -> pd.Series:
    if text is None:
        values = s.to_numpy(dtype="float64", na_value=np.nan, copy=True)
    else:
        values = _to_float(text, missing)
    bad = ~missing & ~np.isfinite(values)  # text that is not a number, and 'inf'/'nan'
    if bad.any():
        empty = "" if col.required else ", or leave the cell empty if unknown"
        problems.add(
            col.name,
            f"not a number (expected {'a whole number' if col.dtype == 'int' else 'a number'})",
            bad,
            s,
            hint=f"write a plain number in range {col.range_text()}{empty}",
        )
    ok = ~missing & ~bad
    if col.dtype == "int":
        frac = ok & (values != np.round(values))
        if frac.any():
            problems.add(
                col.name, "not a whole number", frac, s, hint=f"{col.name} is an integer score"
            )
        ok &= ~frac
    below = np.zeros(len(values), dtype=bool)
    above = np.zeros(len(values), dtype=bool)
    with np.errstate(invalid="ignore"):
        if col.min is not None:
            below = values <= col.min if col.min_exclusive else values < col.min
        if col.max is not None:
            above = values > col.max
    out = ok & (below | above)
    if out.any():
        problems.add(
            col.name,
            f"out of range {col.range_text()}",
            out,
            s,
            hint="check the unit and the value",
        )
    values[~ok | out] = np.nan  # only reached when raising; keeps the casts below clean
    if col.dtype == "int":
        if col.required and not np.isnan(values).any():
            return pd.Series(values.astype("int64"), index=s.index)
        return pd.Series(pd.array(values, dtype="Float64").astype("Int64"), index=s.index)
    return pd.Series(values, index=s.index)


def _boolean(col: Column, s, text, missing, problems: _Problems) -> pd.Series:
    if text is None:  # bool or nullable boolean already: missing reads as False
        value = s.to_numpy(dtype=bool, na_value=False)
        bad = np.zeros(len(s), dtype=bool)
    else:
        low = text.str.lower()
        value = low.isin(_TRUE).to_numpy()
        bad = ~missing & ~value & ~low.isin(_FALSE).to_numpy()
    if bad.any():
        problems.add(
            col.name,
            "not a boolean",
            bad,
            s,
            hint="use true/false, 1/0 or yes/no (any case)",
        )
    unknown = missing | bad
    if col.default is not None:
        return pd.Series(np.where(unknown, bool(col.default), value), index=s.index)
    if col.required and not unknown.any():
        return pd.Series(value, index=s.index)
    out = pd.array(value, dtype="boolean")
    out[unknown] = pd.NA
    return pd.Series(out, index=s.index)


def _category(col: Column, s, text, missing, problems: _Problems) -> pd.Series:
    assert col.levels is not None  # declaration invariant, not an input check
    found = pc.index_in(_arrow(text), value_set=pa.array(col.levels, type=pa.large_string()))
    codes = pc.fill_null(found, -1).to_numpy(zero_copy_only=False).astype(np.int8)
    bad = ~missing & (codes < 0)
    if bad.any():
        problems.add(
            col.name,
            f"unknown level (expected {col.range_text()})",
            bad,
            s,
            hint="levels are lower-case and exact",
        )
    if col.default is not None:
        codes = np.where(codes < 0, col.levels.index(col.default), codes)
    cat = pd.Categorical.from_codes(codes, dtype=_categorical_dtype(col.levels))
    return pd.Series(cat, index=s.index)


@functools.cache
def _categorical_dtype(levels: tuple[str, ...]) -> pd.CategoricalDtype:
    """One (immutable) dtype per level set: building it costs more than validating a one-row
    request's column, and the HTTP service validates one row per request."""
    return pd.CategoricalDtype(list(levels))


def _string(col: Column, s, text, missing, problems: _Problems) -> pd.Series:
    if col.max_length:
        long = (text.str.len() > col.max_length).to_numpy()
        if long.any():
            problems.add(
                col.name,
                f"longer than {col.max_length} characters",
                long,
                s,
                hint=f"shorten the {col.name} values",
            )
    return pd.Series(
        np.where(missing, None, text.to_numpy(dtype=object)), index=s.index, dtype=object
    )


def _date(col: Column, s, text, missing, problems: _Problems) -> pd.Series:
    if text is None:
        if getattr(s.dtype, "tz", None) is not None:
            s = s.dt.tz_convert(None)
        return s.astype(_DATE_DTYPE)
    parsed = pd.to_datetime(text.where(~missing), errors="coerce", format="ISO8601")
    shaped = text.str.contains(_ISO_DATE, regex=True).to_numpy()
    bad = ~missing & (parsed.isna().to_numpy() | ~shaped)
    if bad.any():
        problems.add(
            col.name,
            "not an ISO date",
            bad,
            s,
            hint="write dates as YYYY-MM-DD with a real month and day",
        )
    if getattr(parsed.dtype, "tz", None) is not None:
        parsed = parsed.dt.tz_convert(None)
    return parsed.where(~bad).astype(_DATE_DTYPE)


def _plan(col: Column, s, text, missing, problems: _Problems) -> pd.Series:
    # Parse each distinct spelling once; map back to rows with an index lookup.
    distinct = pd.Index(text[~missing].unique())
    canon = np.empty(len(distinct) + 1, dtype=object)  # last slot: missing -> None
    errors: list[tuple[int, PlanError]] = []
    for i, value in enumerate(distinct):
        try:
            canon[i] = parse_plan(value)
        except PlanError as err:
            errors.append((i, err))
    codes = distinct.get_indexer(text)
    for i, err in errors[:SHOW]:
        problems.add(col.name, str(err), codes == i, s)
    if len(errors) > SHOW:
        rows = np.isin(codes, [i for i, _ in errors[SHOW:]])
        problems.add(
            col.name,
            f"{len(errors) - SHOW} more distinct invalid plan spellings",
            rows,
            s,
            hint="see CONTRACT §1 for the plan spelling and rules",
        )
    # codes == -1 (missing) picks the last slot, which holds None
    return pd.Series(canon[codes], index=s.index, dtype=object)


_CONVERT = {
    "int": _numeric,
    "float": _numeric,
    "bool": _boolean,
    "category": _category,
    "string": _string,
    "date": _date,
    "plan": _plan,
}


def validate(df: pd.DataFrame, kind: Kind = "episodes") -> Validated:
    """Validate ``df`` as patients, episodes or a single HTTP request profile.

    Returns a frame with exactly the declared columns, in declared order, each typed as the
    module docstring says: absent or empty risk flags become ``False`` and prior responses
    ``"none"``; other absent or empty optional columns are missing (NaN/NA/None). Extra columns
    are dropped with a warning (logged and returned). The index is a fresh 0..n-1. Raises
    :class:`ContractError` listing every violation at once.
    """
    if not isinstance(df, pd.DataFrame):
        raise ContractError(f"expected a table of {kind}, got {type(df).__name__}")
    columns = columns_for(kind)
    declared = {c.name for c in columns}
    problems = _Problems()
    notes: list[str] = []
    df = df.reset_index(drop=True)

    names = pd.Index(df.columns)
    dup_names = sorted({str(c) for c in names[names.duplicated()]})
    if dup_names:
        problems.add(
            ", ".join(dup_names),
            "column name appears more than once in the header",
            hint="keep one column of each name",
        )
        df = df.loc[:, ~names.duplicated()]
    extra = [str(c) for c in df.columns if c not in declared]
    if extra:
        notes.append(
            f"ignoring {len(extra)} column(s) not in the contract: " + ", ".join(map(repr, extra))
        )
    if len(df) == 0:
        problems.add("(table)", f"no data rows: a {kind} file needs at least one row")

    out: dict[str, pd.Series] = {}
    for col in columns:
        if col.name in df.columns:
            s = df[col.name]
            text = None if _is_text_free(s, col) else _as_text(s)
            missing = s.isna().to_numpy() if text is None else (text == "").to_numpy()
        elif col.required:
            problems.add(
                col.name, "required column is missing", hint=_missing_column_hint(col, extra)
            )
            continue
        else:  # an absent optional column is all missing: default or NA, in its declared dtype
            s = text = pd.Series(np.full(len(df), "", dtype=object), dtype="str")
            missing = np.ones(len(df), dtype=bool)
        if col.required and missing.any():
            problems.add(
                col.name,
                "required value is empty",
                missing,
                hint=f"every row needs {col.name} ({col.range_text()})",
            )
        out[col.name] = _CONVERT[col.dtype](col, s, text, missing, problems)

    if kind == "episodes" and "episode_id" in out:
        ids = out["episode_id"]
        dup = ids.duplicated(keep=False).to_numpy() & ids.notna().to_numpy()
        if dup.any():
            problems.add(
                "episode_id",
                "duplicate episode_id (must be unique per row)",
                dup,
                ids,
                hint="give every episode its own id",
            )

    if problems.items:
        raise ContractError(problems.message(notes), problems.items)
    frame = pd.DataFrame(out, index=df.index)
    for note in notes:
        log.warning(note)
    return Validated(frame, kind, notes)


def _missing_column_hint(col: Column, extra: list[str]) -> str:
    hint = f"add a '{col.name}' column ({col.description}; {col.range_text()})"
    folded = {e.strip().lower(): e for e in extra}
    close = [folded[col.name]] if col.name in folded else []
    close = close or difflib.get_close_matches(col.name, extra, n=1, cutoff=0.8)
    if close:
        hint += f"; the file has a column {close[0]!r}: rename it to '{col.name}'"
    return hint


def guess_kind(columns: Iterable[str]) -> Kind:
    """Episodes if any episode-only column is present, otherwise patients."""
    return "episodes" if set(columns) & EPISODE_ONLY else "patients"


# --------------------------------------------------------------------------- records


@dataclass
class RecordsValidated:
    """:func:`validate_records` of n records: one typed frame for the accepted ones.

    ``rows[i]`` is record i's row in ``frame`` (None when it was refused), ``errors[i]``
    its :class:`ContractError` (None when accepted), ``warnings[i]`` the warnings
    :func:`validate` gives for it alone, and ``values[i]`` its typed values as plain
    Python (column → value, ``None`` for missing; None when refused).

    ``frame`` is built on first use: the HTTP service encodes ``values`` directly
    (``PatientEncoder.transform_values``) and never needs it, and building a ~45-column
    pandas frame was the largest part of validating one request.
    """

    rows: list[int | None]
    errors: list[ContractError | None]
    warnings: list[list[str]]
    values: list[dict | None]
    kind: Kind = "request"

    @functools.cached_property
    def frame(self) -> pd.DataFrame:
        return typed_frame([v for v in self.values if v is not None], self.kind)


_MISSING = object()


def _plain_value(col: Column, value: object) -> object:
    """A typed frame cell as the plain Python value :func:`typed_frame` takes back."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, float | np.floating) and np.isnan(value):
        return None
    if col.dtype == "int":
        return int(value)
    if col.dtype == "float":
        return float(value)
    if col.dtype == "bool":
        return bool(value)
    return str(value) if col.dtype in ("category", "string") else value


def _fast_value(col: Column, value: object) -> tuple[bool, object]:
    """(True, typed value) when ``value`` is plainly valid for ``col`` as JSON gives it, in
    which case :func:`validate` would type it the same way; (False, None) when in any doubt
    (the caller then asks :func:`validate` itself). Never decides that a value is wrong."""
    if value is _MISSING or value is None or (type(value) is str and value == ""):
        if col.required:
            return False, None
        return True, col.default
    kind = type(value)
    if col.dtype in ("int", "float"):
        if kind is int:
            if abs(value) > 2**53:  # beyond every range here, and float() may overflow
                return False, None
            number = float(value)
        elif kind is float and math.isfinite(value):
            number = value
        else:
            return False, None  # text, bool, inf, …: the validator parses and words it
        if col.min is not None and (number <= col.min if col.min_exclusive else number < col.min):
            return False, None
        if col.max is not None and number > col.max:
            return False, None
        if col.dtype == "float":
            return True, number
        return (True, int(number)) if number == round(number) else (False, None)
    if col.dtype == "bool":
        if kind is bool:
            return True, value
        if kind is str and value.isascii() and value.isprintable() and " " not in value:
            low = value.lower()
            if low in _TRUE:
                return True, True
            if low in _FALSE:
                return True, False
        return False, None
    if col.dtype == "category":
        if kind is str and value in col.levels:  # type: ignore[operator]
            return True, value
        return False, None
    if col.dtype == "string":
        if kind is not str or (col.max_length and len(value) > col.max_length):
            return False, None
        ends = value[0] + value[-1]  # printable ASCII, not blank: no strip removes them
        if ends.isascii() and ends.isprintable() and " " not in ends:
            return True, value
        return False, None
    return False, None  # dates and plans: always the full validator


def _fast_record(record: dict, columns: tuple[Column, ...]) -> dict | None:
    """Typed values of a record every value of which is plainly valid, else None."""
    values = {}
    for col in columns:
        ok, value = _fast_value(col, record.get(col.name, _MISSING))
        if not ok:
            return None
        values[col.name] = value
    return values


def typed_frame(rows: Sequence[Mapping], kind: Kind = "request") -> pd.DataFrame:
    """The frame :func:`validate` returns, from rows of typed plain values as
    :func:`validate_records` gives them (``RecordsValidated.values``)."""
    columns = columns_for(kind)
    index = pd.RangeIndex(len(rows))
    out: dict[str, object] = {}
    for col in columns:
        vals = [r[col.name] for r in rows]
        if col.dtype == "int":
            if col.required:
                array = np.array(vals, dtype="int64")
            else:
                array = pd.array(vals, dtype="Int64")
        elif col.dtype == "float":
            array = np.array([np.nan if v is None else v for v in vals], dtype="float64")
        elif col.dtype == "bool":
            if col.required or col.default is not None:
                array = np.array(vals, dtype=bool)
            else:
                array = pd.array(vals, dtype="boolean")
        elif col.dtype == "category":
            assert col.levels is not None
            level = {name: k for k, name in enumerate(col.levels)}
            codes = np.array([-1 if v is None else level[v] for v in vals], dtype=np.int8)
            array = pd.Categorical.from_codes(codes, dtype=_categorical_dtype(col.levels))
        elif col.dtype == "string":
            array = np.empty(len(vals), dtype=object)
            array[:] = vals
        else:  # pragma: no cover - _fast_value never accepts these kinds of columns
            raise ValueError(f"cannot build a typed {col.dtype} column")
        if col.dtype == "string":  # a bare object array would be inferred as "str"
            array = pd.Series(array, index=index, dtype=object)
        out[col.name] = array
    return pd.DataFrame(out, index=index, copy=False)


def _extra_note(record: dict, declared: set[str]) -> list[str]:
    extra = [str(c) for c in record if c not in declared]
    if not extra:
        return []
    return [f"ignoring {len(extra)} column(s) not in the contract: " + ", ".join(map(repr, extra))]


def validate_records(records: list[dict], kind: Kind = "request") -> RecordsValidated:
    """Validate each of ``records`` (dicts as parsed from JSON, e.g. one patient per HTTP
    request) *on its own*, as ``validate(pd.DataFrame([record]), kind)`` would, and return
    the accepted ones as one typed frame.

    The answer for each record is exactly :func:`validate`'s for that record alone: the same
    typed values and dtypes, the same warnings, the same :class:`ContractError`. Records
    whose every value is plainly valid JSON (a number in range, a level, a boolean or one of
    the contract's spellings, a short string without surrounding blanks) are typed here in
    plain Python, without pandas, which is ~50× cheaper for one row; every other record
    (anything to parse, strip, refuse or word) goes through :func:`validate` itself.
    """
    columns = columns_for(kind)
    declared = {c.name for c in columns}
    fast_ok = all(c.dtype in ("int", "float", "bool", "category", "string") for c in columns)
    rows: list[int | None] = []
    errors: list[ContractError | None] = []
    warnings: list[list[str]] = []
    values: list[dict | None] = []
    typed: list[dict] = []
    for record in records:
        found = _fast_record(record, columns) if fast_ok and isinstance(record, dict) else None
        notes: list[str] = []
        if found is not None:
            notes = _extra_note(record, declared)
            for note in notes:
                log.warning(note)
        else:
            try:
                checked = validate(pd.DataFrame([record]), kind)
            except ContractError as err:
                rows.append(None)
                errors.append(err)
                warnings.append([])
                values.append(None)
                continue
            row = checked.frame.iloc[0]
            found = {c.name: _plain_value(c, row[c.name]) for c in columns}
            notes = list(checked.warnings)
        rows.append(len(typed))
        typed.append(found)
        errors.append(None)
        warnings.append(notes)
        values.append(found)
    return RecordsValidated(rows, errors, warnings, values, kind)
