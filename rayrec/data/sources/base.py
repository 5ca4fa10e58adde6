"""What every source reader returns, and the helpers they share for bad lines.

A reader turns one raw layout (MovieLens, RecBole, ...) into a ``RawData``:
interactions in one long table plus optional item and user tables. Everything
after that (filters, splits, parquet) is source-independent and lives in
``rayrec.data.prepare``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd

from rayrec.errors import DataError

OnBadLine = Literal["skip", "error"]

#: Columns of ``RawData.interactions``. ``user`` and ``item`` are the source ids
#: as strings; ``timestamp`` is int64 (seconds or any monotone order key);
#: ``rating`` is float (NaN when the source has none).
INTERACTION_COLUMNS = ("user", "item", "timestamp", "rating")


@dataclass
class PreSplit:
    """A split that the source fixes itself (MiniOneRec keeps its own temporal split).

    ``train_seqs`` maps user id -> chronological list of item ids (source ids);
    ``valid`` and ``test`` are tables with columns ``user``, ``history``
    (list of source item ids) and ``target`` (source item id).
    """

    train_seqs: dict[str, list[str]]
    valid: pd.DataFrame
    test: pd.DataFrame


@dataclass
class RawData:
    """One source's content before filtering and splitting.

    interactions: columns ``INTERACTION_COLUMNS``, one row per event.
    items: optional, column ``item`` (source id, str) plus any of ``title``,
        ``text``, ``image_path`` (absolute path or None) and extra metadata
        columns such as ``genres`` (str, ``|``-joined).
    users: optional, column ``user`` (source id, str) plus e.g. ``pref_text``.
    presplit: set when the source carries its own split (then the prepare step
        keeps it as given and only maps ids).
    input_files: every file read, hashed into the manifest.
    skipped_lines: malformed lines skipped under ``on_bad_line="skip"``.
    missing: what the layout lacked, e.g. ``{"images": 3, "descriptions": 10}``
        or ``{"user.dat": "absent"}``; reported in the manifest.
    """

    interactions: pd.DataFrame
    items: pd.DataFrame | None = None
    users: pd.DataFrame | None = None
    presplit: PreSplit | None = None
    input_files: list[Path] = field(default_factory=list)
    skipped_lines: int = 0
    missing: dict[str, int | str] = field(default_factory=dict)


class BadLines:
    """Collects malformed lines of one file: raise at once or count and skip.

    Usage inside a reader::

        bad = BadLines(path, on_bad_line)
        for lineno, line in enumerate(f, start=1):
            parts = line.split("\\t")
            if len(parts) != 4:
                bad.report(lineno, f"expected 4 tab-separated fields, got {len(parts)}")
                continue
    """

    def __init__(self, path: Path, on_bad_line: OnBadLine) -> None:
        self.path = Path(path)
        self.on_bad_line = on_bad_line
        self.count = 0

    def report(self, lineno: int, reason: str) -> None:
        if self.on_bad_line == "error":
            raise DataError(
                f"{self.path}:{lineno}: {reason} "
                "(pass --on-bad-line skip to skip such lines and count them in the manifest)"
            )
        self.count += 1


def require_file(path: Path, what: str) -> Path:
    """Return ``path`` if it is a file, else fail naming the file and what it should hold."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: missing {what}")
    return path
