"""Reader for a MiniOneRec data folder (the generative-recommendation benchmark layout).

Layout (as in MiniOneRec's ``data/Amazon``)::

    train/ valid/ test/   CSV files, one row per prediction: user_id, history_item_id,
                          item_id (+ history_item_sid, item_sid, history_item_title,
                          item_title); list cells are Python list literals
    info/*.txt            SID <tab> title <tab> item_id
    index/*.index.json    item id -> list of SID tokens, e.g. ["<a_1>", "<b_2>", "<c_3>"]
    index/*.item.json     item id -> {"title": ..., "description": ...}

One folder may hold several categories (``Industrial_and_Scientific_5_...csv``,
``Industrial_and_Scientific.index.json``, ...); ``name`` picks one by file-name
prefix. MiniOneRec fixes its own temporal split, so it is returned as a
``PreSplit`` and kept as given. List cells are parsed with ``ast.literal_eval``
(never ``eval``: the files come from elsewhere), and a cell that is not a flat
list of ids is a bad line reported as ``file:line``.
"""

from __future__ import annotations

import ast
import csv
import json
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from rayrec.data.sources.base import BadLines, OnBadLine, PreSplit, RawData
from rayrec.errors import DataError

SPLITS = ("train", "valid", "test")
REQUIRED_COLUMNS = ("user_id", "history_item_id", "item_id")
#: Row = (user, history item ids, target item id), all source ids as strings.
Row = tuple[str, list[str], str]


def parse_id_list(cell: str) -> list[str]:
    """Parse a list-literal cell such as ``"[12, 7, 200]"`` or ``"['a', 'b']"`` into ids.

    Only literals are accepted (``ast.literal_eval``), and only a flat list or
    tuple of ints and strings; anything else raises ``ValueError``.
    """
    try:
        value = ast.literal_eval(cell.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
        raise ValueError(f"not a list literal: {cell[:60]!r}") from exc
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"expected a list, got {type(value).__name__}: {cell[:60]!r}")
    if not all(isinstance(v, (int, str)) and not isinstance(v, bool) for v in value):
        raise ValueError(f"list elements must be ids (int or str): {cell[:60]!r}")
    return [str(v).strip() for v in value]


def _matches(path: Path, name: str | None) -> bool:
    """Whether a file belongs to category ``name`` (all files do when name is None)."""
    stem = path.name.split(".")[0]
    return name is None or stem == name or stem.startswith(name + "_")


def _only_one(files: list[Path], folder: Path, what: str) -> Path | None:
    """The single file of a category in ``folder`` (None if none); several is an error
    because one folder may hold several categories and mixing them would be silent."""
    if len(files) > 1:
        names = ", ".join(p.name for p in files)
        raise DataError(f"{folder}: several {what} ({names}); pass the dataset name to pick one category")
    return files[0] if files else None


def _split_file(root: Path, split: str, name: str | None) -> Path:
    """The CSV file of one split for the chosen category; error if the folder or file is missing."""
    folder = root / split
    if not folder.is_dir():
        raise DataError(f"{folder}: missing {split}/ folder of a MiniOneRec dataset")
    path = _only_one(sorted(p for p in folder.glob("*.csv") if _matches(p, name)), folder, "CSV files")
    if path is None:
        which = f" for category {name!r}" if name else ""
        raise DataError(f"{folder}: no CSV file{which}")
    return path


def _records(reader, path: Path):
    """Iterate a csv reader, turning its errors (e.g. a runaway quote) into ``file:line``."""
    try:
        yield from reader
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: unreadable CSV: {exc}") from exc


def _read_csv(path: Path, on_bad_line: OnBadLine) -> tuple[list[Row], int]:
    """Rows of one split CSV and the number of bad lines skipped.

    Line numbers count the header as line 1 and point at the first physical line
    of a record, so quoted cells spanning several lines are counted correctly.
    """
    bad = BadLines(path, on_bad_line)
    rows: list[Row] = []
    with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as f:  # a BOM; bad bytes kept
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        lacking = [c for c in REQUIRED_COLUMNS if c not in header]
        if lacking:
            raise DataError(f"{path}:1: missing column(s) {', '.join(lacking)} (header: {', '.join(header)})")
        col = {c: header.index(c) for c in REQUIRED_COLUMNS}
        start = reader.line_num + 1
        for record in _records(reader, path):
            lineno, start = start, reader.line_num + 1
            if not record:
                continue
            if any(_undecodable(cell) for cell in record):
                bad.report(lineno, "not UTF-8 (a byte of another encoding, e.g. latin-1)")
                continue
            if len(record) != len(header):
                bad.report(lineno, f"expected {len(header)} fields, got {len(record)}")
                continue
            try:
                history = parse_id_list(record[col["history_item_id"]])
            except ValueError as exc:
                bad.report(lineno, f"history_item_id: {exc}")
                continue
            user, target = record[col["user_id"]].strip(), record[col["item_id"]].strip()
            if not user or not target:
                bad.report(lineno, "empty user_id or item_id")
                continue
            rows.append((user, history, target))
    return rows, bad.count


def _undecodable(text: str) -> bool:
    """Whether ``text`` holds a byte that was not UTF-8 (read with ``errors="surrogateescape"``)."""
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _chain(rows: list[Row]) -> list[str] | None:
    """One user's sequence if the rows, in file order, chain (each history is a suffix
    of the sequence so far, as in MiniOneRec's one-row-per-step files), else None."""
    seq = rows[0][1] + [rows[0][2]]
    for _, history, target in rows[1:]:
        if not history or len(history) > len(seq) or seq[-len(history) :] != history:
            return None
        seq.append(target)
    return seq


def _train_sequences(rows: list[Row]) -> dict[str, list[str]]:
    """One chronological sequence per user from the train rows.

    The chain of the user's rows when they chain (this also recovers the full
    sequence when histories were truncated to a window); otherwise the longest
    history followed by its target.
    """
    by_user: dict[str, list[Row]] = {}
    for row in rows:
        by_user.setdefault(row[0], []).append(row)
    seqs = {}
    for user, urows in by_user.items():
        longest = max(urows, key=lambda r: len(r[1]))
        seqs[user] = _chain(urows) or longest[1] + [longest[2]]
    return seqs


def _load_json(path: Path) -> dict:
    """A JSON object from ``path``; a parse error names the file and line."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from exc
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object mapping item id -> value")
    return {str(k).strip(): v for k, v in data.items()}


def _meta_file(root: Path, folder: str, suffix: str, name: str | None) -> Path | None:
    """``<root>/<folder>/<category><suffix>`` (prefix match for info/*.txt), None if absent."""
    path = root / folder
    if not path.is_dir():
        return None
    if suffix.endswith(".json"):
        files = sorted(p for p in path.glob(f"*{suffix}") if name is None or p.name == name + suffix)
    else:
        files = sorted(p for p in path.glob(f"*{suffix}") if _matches(p, name))
    return _only_one(files, path, f"*{suffix} files")


def _read_info(path: Path, on_bad_line: OnBadLine) -> tuple[dict[str, tuple[str, str]], int]:
    """``info/*.txt``: item id -> (title, SID string). Titles may contain tabs."""
    bad = BadLines(path, on_bad_line)
    out = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            parts = line.rstrip("\r\n").split("\t")
            if parts == [""]:
                continue
            if len(parts) < 3 or not parts[-1].strip():
                bad.report(lineno, f"expected SID<tab>title<tab>item_id, got {len(parts)} field(s)")
                continue
            out[parts[-1].strip()] = ("\t".join(parts[1:-1]), parts[0].strip())
    return out, bad.count


def _sid_strings(index: dict, path: Path) -> dict[str, str]:
    """Item id -> SID tokens joined, e.g. ``"<a_1><b_2><c_3>"`` (as in the CSV ``item_sid``)."""
    out = {}
    for item, tokens in index.items():
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise DataError(f"{path}: item {item!r}: expected a list of SID tokens, got {tokens!r}")
        out[item] = "".join(tokens)
    return out


def _item_table(meta: dict | None, info: dict | None, sids: dict[str, str] | None) -> pd.DataFrame | None:
    """Items from ``*.item.json`` (title, text=description), else from ``info/*.txt``.

    SIDs come from the index, else from the info file. None when neither table exists.
    """
    if meta is not None:
        # A missing title stays None, so that prepare names the item ("item 12").
        rows = [
            (k, str(v["title"]) if v.get("title") else None, _text(v.get("description")))
            for k, v in meta.items()
        ]
    elif info is not None:
        rows = [(k, title or None, "") for k, (title, _) in info.items()]
    else:
        return None
    table = pd.DataFrame(rows, columns=["item", "title", "text"])
    if sids is None and info is not None:
        sids = {k: sid for k, (_, sid) in info.items()}
    if sids is not None:
        table["sid"] = [sids.get(k) for k in table["item"]]
    return table


def _text(description) -> str:
    """Descriptions are strings, lists of strings (Amazon metadata) or missing."""
    if isinstance(description, list):
        return " ".join(str(d) for d in description if d)
    return str(description or "")


def _check_known(ids, known: set[str], where: str, table: Path | None) -> None:
    """Fail naming up to 10 item ids of ``where`` that the item table lacks."""
    unknown = sorted(set(ids) - known)
    if unknown:
        shown = ", ".join(unknown[:10]) + (", ..." if len(unknown) > 10 else "")
        raise DataError(f"{len(unknown)} item id(s) in {where} are not in the item table {table}: {shown}")


class _Items(NamedTuple):
    """What ``index/`` and ``info/`` gave: the table (or None), the file it came from,
    every file read, lines skipped, and what was missing (for the manifest)."""

    table: pd.DataFrame | None
    source: Path | None
    files: list[Path]
    skipped: int
    missing: dict[str, int | str]


def _read_items(root: Path, name: str | None, on_bad_line: OnBadLine) -> _Items:
    """The item table from ``*.item.json`` (else ``info/*.txt``) with SIDs from the index."""
    index_path = _meta_file(root, "index", ".index.json", name)
    meta_path = _meta_file(root, "index", ".item.json", name)
    info_path = _meta_file(root, "info", ".txt", name)
    info, skipped = _read_info(info_path, on_bad_line) if info_path else (None, 0)
    meta = _load_json(meta_path) if meta_path else None
    wrong = [k for k, v in (meta or {}).items() if not isinstance(v, dict)]
    if wrong:
        raise DataError(f"{meta_path}: item {wrong[0]!r}: expected an object with title and description")
    index = _load_json(index_path) if index_path else None
    table = _item_table(meta, info, _sid_strings(index, index_path) if index is not None else None)
    source = meta_path or info_path
    if table is not None and index is not None:
        _check_known(index, set(table["item"]), str(index_path), source)
    found = {"index.json": index_path, "item.json": meta_path, "info": info_path}
    missing: dict[str, int | str] = {what: "absent" for what, p in found.items() if p is None}
    if meta is not None:
        missing["descriptions"] = int((table["text"] == "").sum())
    if table is not None and "sid" in table:
        missing["sids"] = int(table["sid"].isna().sum())
    files = [p for p in found.values() if p is not None]
    return _Items(table, source, files, skipped, missing)


def _flatten(seqs: dict[str, list[str]]) -> pd.DataFrame:
    """Train sequences as interactions, for statistics: timestamps are 0, 1, 2, ... in
    sequence order (MiniOneRec's CSVs carry no times), ratings NaN."""
    users = [u for u, seq in seqs.items() for _ in seq]
    items = [i for seq in seqs.values() for i in seq]
    return pd.DataFrame(
        {
            "user": pd.Series(users, dtype=object).astype(str),
            "item": pd.Series(items, dtype=object).astype(str),
            "timestamp": pd.Series(range(len(items)), dtype="int64"),
            "rating": pd.Series(float("nan"), index=range(len(items)), dtype="float64"),
        }
    )


def _rows_frame(rows: list[Row]) -> pd.DataFrame:
    """Valid/test rows as the ``PreSplit`` table: user, history (list of ids), target."""
    return pd.DataFrame(
        {
            "user": pd.Series([r[0] for r in rows], dtype=object).astype(str),
            "history": pd.Series([r[1] for r in rows], dtype=object),
            "target": pd.Series([r[2] for r in rows], dtype=object).astype(str),
        }
    )


def read_minionerec(
    input: str | Path, *, on_bad_line: OnBadLine = "error", name: str | None = None
) -> RawData:
    """Read a MiniOneRec data folder, keeping its train/valid/test split as given.

    ``name`` is the category (file-name prefix) when the folder holds several.
    Train rows become one sequence per user (see ``_train_sequences``); valid and
    test stay rows of (user, history, target). Item ids in the CSVs or the SID index
    that the item table lacks are an error, since the split could not be mapped.
    """
    root = Path(input)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; expected a MiniOneRec data folder with train/, valid/, test/")
    rows, files, skipped = {}, [], 0
    for split in SPLITS:
        path = _split_file(root, split, name)
        rows[split], n = _read_csv(path, on_bad_line)
        files.append(path)
        skipped += n
    if not rows["train"]:
        raise DataError(f"{files[0]}: no usable train rows")
    items = _read_items(root, name, on_bad_line)
    if items.table is not None:
        ids = (i for split in SPLITS for _, history, target in rows[split] for i in (*history, target))
        _check_known(ids, set(items.table["item"]), "the train/valid/test CSVs", items.source)
    seqs = _train_sequences(rows["train"])
    return RawData(
        interactions=_flatten(seqs),
        items=items.table,
        presplit=PreSplit(seqs, _rows_frame(rows["valid"]), _rows_frame(rows["test"])),
        input_files=files + items.files,
        skipped_lines=skipped + items.skipped,
        missing=items.missing,
    )
