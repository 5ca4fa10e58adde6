"""MovieLens-1M with descriptions and posters, in the layout written by the UR4Rec tools.

Layout of the input folder::

    ratings.dat   UserID::MovieID::Rating::Timestamp
    movies.dat    MovieID::Title::Genres
    user.dat      UserID::Gender::Age::Occupation::Zip   (optional)
    text.xls      or text.csv: columns movie-id, review  (optional)
    image/<movie id>.png                                  (optional, per movie)

Descriptions, user.dat and posters are often partial (scraping misses some
movies), so whatever is absent is counted in ``RawData.missing`` and logged
rather than failing: an item without a description falls back to the
title-and-genres text, an item without a poster gets ``image_path=None``.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import logging
import os
from pathlib import Path

import pandas as pd

from rayrec.data.sources.base import BadLines, OnBadLine, RawData, require_file
from rayrec.data.sources.generic import SortedBadLines, read_text_lines
from rayrec.data.sources.movielens import add_movies_dat, add_users_dat, read_ratings
from rayrec.errors import DataError

log = logging.getLogger(__name__)

_DESCRIPTION_COLUMNS = ("movie-id", "review")


def read_movielens_multimodal(input: Path, *, on_bad_line: OnBadLine = "error") -> RawData:
    """Read the UR4Rec multimodal MovieLens folder into interactions, items (text, image) and users."""
    input = Path(input).resolve()
    ratings = require_file(input / "ratings.dat", "ratings (UserID::MovieID::Rating::Timestamp)")
    raw = read_ratings(ratings, "::", on_bad_line)
    add_movies_dat(raw, input / "movies.dat", on_bad_line)
    add_users_dat(raw, input / "user.dat", on_bad_line)
    items = raw.items
    descriptions = _read_descriptions(raw, input, on_bad_line)
    described = items["item"].map(descriptions).fillna("").str.strip()
    items["text"] = described.where(described != "", items["text"])
    items["image_path"] = _poster_paths(input / "image", items["item"])
    if not (input / "image").is_dir():
        raw.missing["image/"] = "absent"
    missing = {
        "descriptions": int((described == "").sum()),
        "images": int(items["image_path"].isna().sum()),
    }
    raw.missing.update({key: count for key, count in missing.items() if count})
    if raw.missing:
        log.warning(
            "%s: %d movies; missing parts: %s (items without a description use "
            "title and genres; items without a poster have no image_path)",
            input,
            len(items),
            raw.missing,
        )
    return raw


def _poster_paths(image_dir: Path, movie_ids: pd.Series) -> pd.Series:
    """Absolute ``image/<id>.png`` path per movie, None where the file does not exist."""
    present = set(os.listdir(image_dir)) if image_dir.is_dir() else set()
    paths = [str(image_dir / f"{m}.png") if f"{m}.png" in present else None for m in movie_ids]
    return pd.Series(paths, index=movie_ids.index, dtype=object)


def _read_descriptions(raw: RawData, input: Path, on_bad_line: OnBadLine) -> dict[str, str]:
    """Movie id -> description from text.xls (when an Excel reader is installed) or text.csv."""
    xls, csv_path = input / "text.xls", input / "text.csv"
    engine = _excel_engine(xls, required=not csv_path.is_file()) if xls.is_file() else None
    path = xls if engine else csv_path
    if not path.is_file():
        raw.missing["text.xls/text.csv"] = "absent"
        return {}
    descriptions: dict[str, str] = {}
    with SortedBadLines(path, on_bad_line) as bad:
        records = _excel_records(path, engine) if engine else _csv_records(path, bad)
        for lineno, movie_id, review in records:
            if not movie_id.isdigit():
                bad.report(lineno, f"non-numeric movie-id {movie_id!r}")
                continue
            descriptions.setdefault(movie_id, review)
    raw.input_files.append(path)
    raw.skipped_lines += bad.count
    return descriptions


def _excel_engine(path: Path, *, required: bool) -> str | None:
    """The pandas engine for this Excel file, or None (or a DataError when ``required``) if not installed.

    Old ``.xls`` (OLE2) files need xlrd; files that are really ``.xlsx`` (zip) need openpyxl.
    """
    with open(path, "rb") as f:
        engine = "openpyxl" if f.read(2) == b"PK" else "xlrd"
    if _module_available(engine):
        return engine
    if required:
        raise DataError(
            f"{path}: reading this Excel file needs the '{engine}' package; install it "
            f"(pip install {engine}) or save the sheet as text.csv beside it "
            f"(columns {', '.join(_DESCRIPTION_COLUMNS)})"
        )
    log.info("%s: %s is not installed, reading text.csv instead", path, engine)
    return None


def _module_available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _excel_records(path: Path, engine: str) -> list[tuple[int, str, str]]:
    """(sheet row number, movie id, review) of the first sheet; row 1 is the header."""
    frame = pd.read_excel(path, engine=engine, dtype=object)
    frame.columns = [str(c) for c in frame.columns]
    id_col, review_col = _description_columns(path, list(frame.columns))
    return [
        (row + 2, _cell_text(movie_id), _cell_text(review))
        for row, (movie_id, review) in enumerate(zip(frame[id_col], frame[review_col], strict=True))
    ]


def _cell_text(value: object) -> str:
    """A cell as text: "" for empty cells, integral floats without ".0" (Excel stores ids as floats)."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _csv_records(path: Path, bad: BadLines) -> list[tuple[int, str, str]]:
    """(first line number, movie id, review) of each record; reviews may span quoted lines."""
    reader = csv.reader(io.StringIO("\n".join(read_text_lines(path, bad))))
    header = [name.strip() for name in next(reader, [])]
    id_col, review_col = _description_columns(path, header)
    id_at, review_at = header.index(id_col), header.index(review_col)
    records, start = [], reader.line_num + 1
    for fields in reader:
        if len(fields) == len(header):
            records.append((start, fields[id_at].strip(), fields[review_at].strip()))
        elif any(field.strip() for field in fields):
            bad.report(start, f"expected {len(header)} comma-separated fields, got {len(fields)}")
        start = reader.line_num + 1
    return records


def _description_columns(path: Path, present: list[str]) -> tuple[str, str]:
    """The actual names of the movie-id and review columns (case and ``_``/``-`` ignored)."""
    normal = {name.strip().lower().replace("_", "-"): name for name in present}
    if not all(col in normal for col in _DESCRIPTION_COLUMNS):
        raise DataError(
            f"{path}: expected columns {', '.join(_DESCRIPTION_COLUMNS)}; "
            f"columns present: {', '.join(present)}"
        )
    return normal["movie-id"], normal["review"]
