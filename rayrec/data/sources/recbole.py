"""RecBole atomic files: ``NAME.inter`` and, optionally, ``NAME.item``.

Atomic files are tab-separated with a typed header (``user_id:token
item_id:token rating:float timestamp:float``). Fields are matched by name
without the ``:type`` suffix, so any extra fields are simply ignored.
``token_seq`` values are space-separated lists.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from rayrec.data.sources.base import BadLines, OnBadLine, RawData, require_file
from rayrec.data.sources.generic import (
    SortedBadLines,
    read_text_lines,
    split_fields,
    split_table,
    to_interactions,
)
from rayrec.errors import DataError

#: ``.item`` fields used as the title (first present wins) and as the genres.
TITLE_FIELDS = ("movie_title", "title", "name", "item_title")
GENRE_FIELDS = ("class", "genre", "genres", "categories")

#: ``.inter`` field name -> interaction column.
_INTER_FIELDS = {"user_id": "user", "item_id": "item", "timestamp": "timestamp", "rating": "rating"}


def read_recbole(input: Path, *, name: str | None = None, on_bad_line: OnBadLine = "error") -> RawData:
    """Read ``NAME.inter`` (and ``NAME.item`` when present) from a RecBole dataset folder.

    ``name`` defaults to the stem of the folder's single ``*.inter`` file.
    Without a timestamp field the line order is the time order; without a
    rating field ratings are NaN.
    """
    inter = _find_inter(Path(input), name)
    with SortedBadLines(inter, on_bad_line) as bad:
        interactions = _read_inter(inter, bad)
    raw = RawData(interactions, input_files=[inter], skipped_lines=bad.count)
    item_file = inter.with_suffix(".item")
    if item_file.is_file():
        with SortedBadLines(item_file, on_bad_line) as bad:
            raw.items = _read_item(item_file, bad)
        raw.input_files.append(item_file)
        raw.skipped_lines += bad.count
    else:
        raw.missing[item_file.name] = "absent"
    return raw


def _find_inter(folder: Path, name: str | None) -> Path:
    """``folder/NAME.inter``, or the folder's only ``*.inter`` file when ``name`` is None."""
    if name is not None:
        return require_file(folder / f"{name}.inter", "RecBole interactions (atomic .inter file)")
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder (expected a RecBole dataset folder with NAME.inter)")
    found = sorted(folder.glob("*.inter"))
    if len(found) != 1:
        listed = ", ".join(path.name for path in found) or "none"
        raise DataError(
            f"{folder}: expected exactly one *.inter file, found {listed}; "
            "pick one with the source option name=NAME"
        )
    return found[0]


def _header(path: Path, lines: list[str], required: tuple[str, ...]) -> list[str]:
    """Field names of the header line, without their ``:type`` suffix; ``required`` ones must be there."""
    fields = [field.strip().split(":", 1)[0] for field in lines[0].split("\t")] if lines else []
    absent = [field for field in required if field not in fields]
    if absent:
        raise DataError(
            f"{path}:1: no field {', '.join(map(repr, absent))} in the header "
            f"(expected e.g. user_id:token<TAB>item_id:token); fields present: {', '.join(fields)}"
        )
    return fields


def _read_inter(path: Path, bad: BadLines) -> pd.DataFrame:
    """Typed interactions of one ``.inter`` file."""
    lines = read_text_lines(path, bad)
    fields = _header(path, lines, ("user_id", "item_id"))
    table = split_table(lines[1:], "\t", fields, bad, first_lineno=2)
    table = table[[field for field in _INTER_FIELDS if field in fields] + ["lineno"]]
    table = table.rename(columns=_INTER_FIELDS)
    return to_interactions(table, bad)


def _read_item(path: Path, bad: BadLines) -> pd.DataFrame:
    """Items of one ``.item`` file: columns item, title, text, and genres when a genre field exists."""
    lines = read_text_lines(path, bad)
    fields = _header(path, lines, ("item_id",))
    title_field = next((field for field in TITLE_FIELDS if field in fields), None)
    genre_field = next((field for field in GENRE_FIELDS if field in fields), None)
    rows, linenos = split_fields(lines[1:], "\t", len(fields), bad, first_lineno=2)
    items = []
    for row, lineno in zip(rows, linenos, strict=True):
        record = dict(zip(fields, (value.strip() for value in row), strict=True))
        if not record["item_id"]:
            bad.report(lineno, "empty item id")
            continue
        items.append(_item_row(record, title_field, genre_field))
    items = pd.DataFrame(items, columns=["item", "title", "text", "genres"])
    return items if genre_field else items.drop(columns="genres")


def _item_row(record: dict[str, str], title_field: str | None, genre_field: str | None) -> tuple:
    """(item, title, text, genres) of one record; the text joins the title and every other
    non-empty field, e.g. "Toy Story. release year: 1995. class: Animation, Comedy."."""
    title = record.get(title_field, "") if title_field else ""
    genres = record.get(genre_field, "").split() if genre_field else []
    parts = [title] if title else []
    for field, value in record.items():
        if field in ("item_id", title_field) or not value:
            continue
        shown = ", ".join(value.split()) if field == genre_field else value
        parts.append(f"{field.replace('_', ' ')}: {shown}")
    text = ". ".join(parts) + "." if parts else ""
    return record["item_id"], title, text, "|".join(genres)
