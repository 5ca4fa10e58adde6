"""Generic interaction tables (CSV or Parquet), and the typing helpers every reader shares.

``read_interactions_table`` reads any user/item/time table whose column names
are given as options. The helpers below it (``read_text_lines``,
``split_fields``, ``to_interactions``) are what the MovieLens and RecBole
readers use too, so every source reports malformed lines the same way:
``file:line: reason``, raised at once or counted and skipped.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rayrec.data.sources.base import (
    INTERACTION_COLUMNS,
    BadLines,
    OnBadLine,
    RawData,
    require_file,
)
from rayrec.errors import DataError

log = logging.getLogger(__name__)

#: Larger timestamps are not times (1e16 microseconds is the year 2286): a bad line, not a sort key.
MAX_TIMESTAMP = 1e16


def read_interactions_table(
    input: Path,
    *,
    user_col: str = "user",
    item_col: str = "item",
    time_col: str | None = "timestamp",
    rating_col: str | None = None,
    sep: str = ",",
    on_bad_line: OnBadLine = "error",
) -> RawData:
    """Read one interactions table: Parquet if the name ends in ``.parquet``, else CSV with a header.

    Timestamps may be numbers (seconds, or any monotone key) or, in CSV, ISO
    dates, which become UTC seconds. ``time_col=None`` uses the file order;
    ``rating_col=None`` leaves ratings NaN. For Parquet, the "line" in an error
    is the 1-based row number.
    """
    path = require_file(Path(input), "interactions table (CSV or Parquet)")
    wanted = {"user": user_col, "item": item_col, "timestamp": time_col, "rating": rating_col}
    wanted = {key: col for key, col in wanted.items() if col is not None}
    with SortedBadLines(path, on_bad_line) as bad:
        if path.suffix.lower() == ".parquet":
            table = _parquet_table(path, wanted)
        else:
            table = _csv_table(path, wanted, sep, bad)
        interactions = to_interactions(table, bad, dates=True)
    return RawData(interactions, input_files=[path], skipped_lines=bad.count)


def _check_columns(path: Path, present: list[str], wanted: dict[str, str]) -> None:
    """Fail naming the file, each absent column (and the option that names it) and the columns present."""
    option = {"user": "user_col", "item": "item_col", "timestamp": "time_col", "rating": "rating_col"}
    absent = [f"{col!r} ({option[key]})" for key, col in wanted.items() if col not in present]
    if absent:
        raise DataError(
            f"{path}: no column {', '.join(absent)}; columns present: {', '.join(present)}. "
            "Set the option to one of the present columns."
        )


def _parquet_table(path: Path, wanted: dict[str, str]) -> pd.DataFrame:
    """The wanted Parquet columns renamed to interaction names, with 1-based row numbers as ``lineno``."""
    _check_columns(path, pq.read_schema(path).names, wanted)
    frame = pd.read_parquet(path, columns=list(dict.fromkeys(wanted.values())))
    table = pd.DataFrame({key: frame[col] for key, col in wanted.items()})
    table["lineno"] = np.arange(1, len(table) + 1)
    return table


def _csv_table(path: Path, wanted: dict[str, str], sep: str, bad: BadLines) -> pd.DataFrame:
    """The wanted CSV columns as raw strings, with the line each record starts on as ``lineno``."""
    records = _csv_records(read_text_lines(path, bad), sep)
    header = next(records, (1, []))[1]
    header = [name.strip() for name in header]
    _check_columns(path, header, wanted)
    index = {key: header.index(col) for key, col in wanted.items()}
    columns: dict[str, list[str]] = {key: [] for key in index}
    linenos = []
    for lineno, fields in records:
        if len(fields) != len(header):
            bad.report(lineno, f"expected {len(header)} fields separated by {sep!r}, got {len(fields)}")
            continue
        for key, i in index.items():
            columns[key].append(fields[i])
        linenos.append(lineno)
    return pd.DataFrame({**columns, "lineno": linenos}, dtype=object)


def _csv_records(lines: list[str], sep: str) -> Iterator[tuple[int, list[str]]]:
    """(first line number, fields) of each non-blank record; quoted fields may span lines."""
    if len(sep) != 1:  # the csv module only takes one-character delimiters
        for lineno, line in enumerate(lines, start=1):
            if line.strip():
                yield lineno, line.split(sep)
        return
    reader = csv.reader(io.StringIO("\n".join(lines)), delimiter=sep)
    start = 1
    for fields in reader:
        if fields and any(field.strip() for field in fields):
            yield start, fields
        start = reader.line_num + 1


class SortedBadLines(BadLines):
    """A ``BadLines`` that holds reports until the ``with`` block ends, then raises or counts in line order.

    Readers check a file in passes (field counts first, then typed columns), so
    the first problem found is not always the first in the file; error mode
    should still name the earliest bad line. ``count`` is final after the block.
    """

    def __init__(self, path: Path, on_bad_line: OnBadLine) -> None:
        super().__init__(path, on_bad_line)
        self._held: list[tuple[int, str]] = []

    def report(self, lineno: int, reason: str) -> None:
        self._held.append((lineno, reason))

    def __enter__(self) -> SortedBadLines:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        held, self._held = sorted(self._held, key=lambda problem: problem[0]), []
        if exc_type is None:
            for lineno, reason in held:
                super().report(lineno, reason)


def read_text_lines(path: Path, bad: BadLines | None = None) -> list[str]:
    """The lines of a text file, decoded as UTF-8 (BOM dropped), line by line.

    Official MovieLens files are latin-1, re-saved copies are often UTF-8. A file in which
    no line holds UTF-8 beyond ASCII while some line is not UTF-8 is a latin-1 file, read as
    such. Otherwise a line that is not UTF-8 is a bad line (``bad``, reported ``file:line``
    with the byte; without ``bad`` an error), so one stray byte no longer turns a UTF-8
    file's titles into mojibake. Lines are split on "\\n" only: latin-1 text can hold
    U+0085, which ``str.splitlines`` would treat as a line break.
    """
    data = Path(path).read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        return []
    raw = data.split(b"\n")
    lines: list[str | None] = []
    wide_utf8 = False
    for line in raw:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            lines.append(None)
            continue
        wide_utf8 = wide_utf8 or not text.isascii()
        lines.append(text)
    failed = [i for i, line in enumerate(lines) if line is None]
    if failed and not wide_utf8:
        log.info("%s: not UTF-8, read as latin-1", path)
        return [line.decode("latin-1").rstrip("\r") for line in raw]
    out = []
    for i, line in enumerate(lines):
        if line is None:
            e = _utf8_error(raw[i])
            reason = f"not UTF-8 (byte 0x{e[0]:02x} at column {e[1] + 1}) in a UTF-8 file"
            if bad is None:
                raise DataError(f"{path}:{i + 1}: {reason}")
            bad.report(i + 1, reason)
            line = ""  # a blank line: skipped by the readers
        out.append(line.rstrip("\r"))
    return out


def _utf8_error(line: bytes) -> tuple[int, int]:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as e:
        return line[e.start], e.start
    return 0, 0


def split_fields(
    lines: list[str], sep: str, n_fields: int, bad: BadLines, *, first_lineno: int = 1
) -> tuple[list[list[str]], list[int]]:
    """Split each non-blank line on ``sep``; lines without exactly ``n_fields`` fields go to ``bad``.

    Returns the kept rows and their 1-based line numbers (``first_lineno`` is
    the number of ``lines[0]``, e.g. 2 when a header line was taken off).
    """
    rows, linenos = [], []
    for lineno, line in enumerate(lines, start=first_lineno):
        if not line.strip():
            continue
        fields = line.split(sep)
        if len(fields) != n_fields:
            bad.report(lineno, f"expected {n_fields} fields separated by {sep!r}, got {len(fields)}")
            continue
        rows.append(fields)
        linenos.append(lineno)
    return rows, linenos


def split_table(
    lines: list[str], sep: str, columns: list[str], bad: BadLines, *, first_lineno: int = 1
) -> pd.DataFrame:
    """Like ``split_fields``, vectorised with pyarrow for large files (ML-1M: ~1 s, not ~5 s).

    Returns one string column per name in ``columns`` plus ``lineno``.
    """
    text = pa.array(lines, type=pa.large_string())
    lineno = np.arange(first_lineno, first_lineno + len(lines), dtype="int64")
    blank = pc.equal(pc.utf8_trim_whitespace(text), "").to_numpy(zero_copy_only=False)
    parts = pc.split_pattern(text, sep)
    counts = pc.list_value_length(parts).to_numpy(zero_copy_only=False)
    wrong = ~blank & (counts != len(columns))
    for row in np.flatnonzero(wrong):
        bad.report(
            int(lineno[row]), f"expected {len(columns)} fields separated by {sep!r}, got {counts[row]}"
        )
    keep = ~blank & ~wrong
    fields = pc.list_flatten(parts.filter(pa.array(keep)))
    table = {
        name: fields.take(pa.array(np.arange(i, len(fields), len(columns)))).to_pandas()
        for i, name in enumerate(columns)
    }
    return pd.DataFrame({**table, "lineno": lineno[keep]})


def to_interactions(
    table: pd.DataFrame, bad: BadLines, *, numeric_ids: bool = False, dates: bool = False
) -> pd.DataFrame:
    """Type a raw table (``user``, ``item``, optional ``timestamp``/``rating``, ``lineno``).

    Returns columns ``INTERACTION_COLUMNS``: ids as stripped strings, timestamp
    int64 (the line number when the table has none, i.e. file order), rating
    float64 (NaN when the table has none). Rows with an empty or (when
    ``numeric_ids``) non-numeric id, a bad timestamp or a non-numeric rating are
    reported to ``bad`` and dropped.
    """
    lineno = pd.Series(table["lineno"], dtype="int64").to_numpy()
    columns = {"user": _ids(table["user"], "user", numeric_ids)}
    columns["item"] = _ids(table["item"], "item", numeric_ids)
    if "timestamp" in table:
        columns["timestamp"] = _times(table["timestamp"], dates)
    if "rating" in table:
        columns["rating"] = _ratings(table["rating"])
    _report(bad, lineno, list(columns.values()))
    keep = np.logical_and.reduce([check.ok for check in columns.values()])
    out = {name: pd.Series(check.values)[keep].reset_index(drop=True) for name, check in columns.items()}
    out.setdefault("timestamp", pd.Series(lineno[keep]))
    out.setdefault("rating", pd.Series(np.full(int(keep.sum()), np.nan)))
    frame = pd.DataFrame({name: out[name] for name in INTERACTION_COLUMNS})
    return frame.astype({"user": str, "item": str, "timestamp": "int64", "rating": "float64"})


@dataclass
class _Checked:
    """One typed column: values, which rows are valid, and how to describe an invalid row."""

    values: np.ndarray | pd.Series
    ok: np.ndarray
    raw: pd.Series  # the stripped source text, for messages
    message: str  # formatted with the raw value as {!r}


def _report(bad: BadLines, lineno: np.ndarray, checks: list[_Checked]) -> None:
    """Report each failing row once, with its first failing check."""
    failing = np.flatnonzero(~np.logical_and.reduce([check.ok for check in checks]))
    for row in failing:
        check = next(check for check in checks if not check.ok[row])
        bad.report(int(lineno[row]), check.message.format(check.raw.iloc[row]))


def _raw_text(series: pd.Series) -> pd.Series:
    """Values as stripped strings with missing values as "" (for messages and id checks)."""
    if not pd.api.types.is_string_dtype(series):  # e.g. integer ids or datetimes from Parquet
        series = series.astype(object).where(series.notna(), "").astype(str)
    return series.fillna("").str.strip()


def _ids(series: pd.Series, what: str, numeric: bool) -> _Checked:
    """One id column as stripped strings; empty (or, when ``numeric``, non-digit) ids are invalid."""
    text = _raw_text(series)
    ok = (text != "").to_numpy()
    if numeric:
        ok = ok & text.str.fullmatch(r"\d+").to_numpy(dtype=bool)
    message = f"non-numeric {what} id {{!r}}" if numeric else f"empty {what} id"
    return _Checked(text.reset_index(drop=True), ok, text, message)


def _times(series: pd.Series, dates: bool) -> _Checked:
    """Timestamps as int64 seconds (floored); ISO dates are accepted when ``dates``."""
    text = _raw_text(series)
    if pd.api.types.is_datetime64_any_dtype(series):
        seconds = _date_seconds(series)
    else:
        seconds = pd.to_numeric(text, errors="coerce").astype("float64")
        if dates and seconds.isna().any():
            undated = seconds.isna()
            parsed = pd.to_datetime(text[undated], errors="coerce", utc=True, format="ISO8601")
            seconds[undated] = _date_seconds(parsed)
    seconds = seconds.to_numpy(dtype="float64", na_value=np.nan)
    ok = np.isfinite(seconds) & (np.abs(np.nan_to_num(seconds)) < MAX_TIMESTAMP)
    values = np.floor(np.where(ok, seconds, 0.0)).astype("int64")
    expected = "a number or an ISO date" if dates else "a number"
    return _Checked(values, ok, text, f"bad timestamp {{!r}} (expected {expected} below 1e16 in size: seconds, "
                                      "milliseconds or microseconds since 1970)")


def _date_seconds(dates: pd.Series) -> pd.Series:
    """Seconds since the epoch (float, NaN for missing); naive datetimes are taken as UTC."""
    if dates.dt.tz is None:
        dates = dates.dt.tz_localize("UTC")
    return (dates - pd.Timestamp(0, tz="UTC")).dt.total_seconds()


def _ratings(series: pd.Series) -> _Checked:
    """Ratings as float64; a rating must be a finite number."""
    text = _raw_text(series)
    values = pd.to_numeric(text, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
    return _Checked(values, np.isfinite(values), text, "non-numeric rating {!r}")
