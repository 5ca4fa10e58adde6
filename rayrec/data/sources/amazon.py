"""Amazon review dumps (McAuley et al.): the 2014 and the 2018 formats, gzipped or not.

A folder (``data.input``) holding one category's files:

- reviews: ``reviews_<Cat>_5.json(.gz)`` (2014) or ``<Cat>_5.json(.gz)`` (2018), one JSON object
  per line with ``reviewerID``, ``asin``, ``unixReviewTime`` and ``overall`` (the rating);
- metadata (optional): ``meta_<Cat>.json(.gz)``, one item per line with ``asin``, ``title``,
  ``description`` (text or list), ``categories`` (2014: list of lists) or ``category`` (2018:
  list), ``brand``, and ``imUrl`` / ``imageURL`` where present. The 2014 metadata lines are
  Python literals (single quotes), not JSON: they are parsed with ``ast.literal_eval``, which
  reads literals only and never runs code.

Item text (for the UR4Rec features and the generative track's titles) is the title, the
categories and the description; the image URL is kept as a column (nothing is downloaded).
The 5-core filter is the job's ``data.filters`` (``user_core: 5, item_core: 5``).
"""

from __future__ import annotations

import ast
import gzip
import html
import json
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from rayrec.data.sources.base import BadLines, OnBadLine, RawData
from rayrec.data.sources.generic import to_interactions
from rayrec.errors import DataError

REVIEW_PATTERNS = ("reviews_{cat}_5.json.gz", "reviews_{cat}_5.json", "{cat}_5.json.gz", "{cat}_5.json")
META_PATTERNS = ("meta_{cat}.json.gz", "meta_{cat}.json")
_TAGS = re.compile(r"<[^>]+>")
MAX_TEXT = 2000  # characters of item text kept
MAX_LINE = 1 << 20  # bytes: a longer line is a bad line (never parsed: literal_eval's tree would be huge)


def read_amazon(input: Path, *, category: str | None = None, on_bad_line: OnBadLine = "error") -> RawData:
    """Reviews (and metadata when present) of one category from ``input`` (a folder or the reviews file)."""
    reviews, cat = _find_reviews(Path(input), category)
    bad = BadLines(reviews, on_bad_line)
    rows = list(_reviews(reviews, bad))
    if not rows:
        raise DataError(f"{reviews}: no review lines (expected JSON lines with reviewerID, asin, unixReviewTime)")
    table = pd.DataFrame(rows, columns=["lineno", "user", "item", "timestamp", "rating"])
    if table["rating"].isna().any():  # ``overall`` is optional: without it on every line, no ratings at all
        table = table.drop(columns="rating")
    events = to_interactions(table, bad)
    duplicates = int(events.duplicated(["user", "item", "timestamp"]).sum())
    events = events.drop_duplicates(["user", "item", "timestamp"], ignore_index=True)  # the 2018 dumps repeat reviews
    raw = RawData(events, input_files=[reviews], skipped_lines=bad.count)
    raw.missing["duplicate_reviews"] = duplicates
    meta = next((reviews.parent / p.format(cat=cat) for p in META_PATTERNS
                 if (reviews.parent / p.format(cat=cat)).is_file()), None)
    if meta is None:
        raw.missing[META_PATTERNS[0].format(cat=cat)] = "absent"
        return raw
    mbad = BadLines(meta, on_bad_line)
    items = pd.DataFrame(list(_meta(meta, mbad)), columns=["item", "title", "text", "genres", "image_url"])
    items = items.drop_duplicates("item", keep="first")
    raw.items, raw.skipped_lines = items, raw.skipped_lines + mbad.count
    raw.input_files.append(meta)
    reviewed = set(raw.interactions["item"])
    raw.missing["metadata"] = len(reviewed - set(items["item"]))
    raw.missing["titles"] = int(items.loc[items["item"].isin(reviewed), "title"].isna().sum())
    return raw


def _find_reviews(input: Path, category: str | None) -> tuple[Path, str]:
    if input.is_file():
        name = input.name.removesuffix(".gz").removesuffix(".json")
        return input, category or name.removeprefix("reviews_").removesuffix("_5")
    if not input.is_dir():
        raise DataError(f"{input}: not a file or folder of Amazon review files")
    if category is not None:
        for p in REVIEW_PATTERNS:
            if (input / p.format(cat=category)).is_file():
                return input / p.format(cat=category), category
        raise DataError(f"{input}: no reviews file for category {category!r} (looked for "
                        f"{', '.join(p.format(cat=category) for p in REVIEW_PATTERNS)})")
    found = sorted({f for f in input.iterdir() if re.fullmatch(r"(reviews_)?.+_5\.json(\.gz)?", f.name)})
    if len(found) != 1:
        listed = ", ".join(f.name for f in found) or "none"
        raise DataError(f"{input}: expected one reviews file (reviews_<Cat>_5.json.gz or <Cat>_5.json.gz), found "
                        f"{listed}; pick one with the source option category=<Cat>")
    name = found[0].name.removesuffix(".gz").removesuffix(".json")
    return found[0], name.removeprefix("reviews_").removesuffix("_5")


def _lines(path: Path, bad: BadLines) -> Iterator[tuple[int, str]]:
    """(line number, text) of a possibly gzipped file, decoded line by line (a bad byte is a bad line)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            lineno = 0
            while raw := f.readline(MAX_LINE + 1):
                lineno += 1
                if len(raw) > MAX_LINE and not raw.endswith(b"\n"):
                    while (rest := f.readline(MAX_LINE)) and not rest.endswith(b"\n"):
                        pass  # the rest of the long line
                    bad.report(lineno, f"line longer than {MAX_LINE} bytes")
                    continue
                try:
                    text = raw.decode("utf-8").strip()
                except UnicodeDecodeError as e:
                    bad.report(lineno, f"not UTF-8 ({e.reason} at byte {e.start})")
                    continue
                if text:
                    yield lineno, text
    except (OSError, EOFError, zlib.error) as e:  # a truncated or corrupt gzip stream
        raise DataError(f"{path}: cannot read ({e})") from e


def _reviews(path: Path, bad: BadLines) -> Iterator[tuple]:
    for lineno, text in _lines(path, bad):
        try:
            r = json.loads(text)
        except json.JSONDecodeError as e:
            bad.report(lineno, f"not a JSON object ({e.msg} at column {e.colno})")
            continue
        except (ValueError, RecursionError) as e:  # e.g. a number of 5,000 digits, nesting 10,000 deep
            bad.report(lineno, f"not a JSON object ({type(e).__name__})")
            continue
        missing = [k for k in ("reviewerID", "asin", "unixReviewTime") if not isinstance(r, dict) or k not in r]
        if missing:
            bad.report(lineno, f"no {', '.join(missing)} in the review")
            continue
        yield lineno, str(r["reviewerID"]), str(r["asin"]), r["unixReviewTime"], r.get("overall", float("nan"))


def _record(text: str) -> object:
    """A metadata line: JSON (2018) or a Python literal (2014, single quotes); never evaluated as code."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return ast.literal_eval(text)


def _meta(path: Path, bad: BadLines) -> Iterator[tuple]:
    for lineno, text in _lines(path, bad):
        try:
            m = _record(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
            bad.report(lineno, f"neither JSON nor a Python literal ({type(e).__name__})")
            continue
        if not isinstance(m, dict) or "asin" not in m:
            bad.report(lineno, "no asin in the metadata record")
            continue
        title = _clean(m.get("title"))
        cats = _categories(m.get("categories", m.get("category")))
        desc = _clean(" ".join(map(str, m["description"])) if isinstance(m.get("description"), list)
                      else m.get("description"))
        parts = [p for p in (title, ", ".join(cats), desc) if p]
        images = m.get("imUrl") or m.get("imageURLHighRes") or m.get("imageURL") or []
        image = images if isinstance(images, str) else next(iter(images), None)
        yield str(m["asin"]), title[:MAX_TEXT] or None, ". ".join(parts)[:MAX_TEXT], "|".join(cats), image


def _categories(value) -> list[str]:
    """2014: [["Beauty", "Makeup", "Face"], ...]; 2018: ["Beauty", "Makeup"]; distinct, in order."""
    flat: list[str] = []
    for v in ([value] if isinstance(value, str) else value or []):
        flat.extend(v if isinstance(v, list) else [v])
    return list(dict.fromkeys(c for c in (_clean(str(x)) for x in flat) if c))


def _clean(value) -> str:
    if value is None:
        return ""
    return " ".join(html.unescape(_TAGS.sub(" ", str(value))).split())
