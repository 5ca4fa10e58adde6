"""MovieLens 100K (``u.data``, ``u.item``) and 1M (``ratings.dat``, ``movies.dat``, ``users.dat``).

Item text is a short description built from title, year and genres
("Toy Story (1995). Genres: Animation, Children's, Comedy."), so text
encoders and LLM prompts have something to read even without plots.
The ``.dat`` helpers here are reused by the multimodal MovieLens layout.
"""

from __future__ import annotations

import logging
import re
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

log = logging.getLogger(__name__)

#: The 19 genre flags at the end of each ``u.item`` line, in file order.
GENRES_100K = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip

#: Genre labels that say "no genre"; kept in ``genres`` but left out of the text.
_NO_GENRE = {"unknown", "(no genres listed)"}


def read_movielens_100k(input: Path, *, on_bad_line: OnBadLine = "error") -> RawData:
    """Read an ``ml-100k`` folder: ``u.data`` ratings and, when present, ``u.item`` movies."""
    input = Path(input)
    ratings = require_file(input / "u.data", "ratings (u.data: user id, item id, rating, timestamp)")
    raw = read_ratings(ratings, "\t", on_bad_line)
    movies = input / "u.item"
    if not movies.is_file():
        log.warning("%s is absent: items get no titles, texts or genres", movies)
        raw.missing["u.item"] = "absent"
        return raw
    with SortedBadLines(movies, on_bad_line) as bad:
        rows, linenos = split_fields(read_text_lines(movies, bad), "|", 5 + len(GENRES_100K), bad)
        items = [_u_item_row(row, lineno, bad) for row, lineno in zip(rows, linenos, strict=True)]
    items = [item for item in items if item is not None]
    raw.items = pd.DataFrame(items, columns=["item", "title", "text", "genres"])
    raw.input_files.append(movies)
    raw.skipped_lines += bad.count
    return raw


def _u_item_row(row: list[str], lineno: int, bad: BadLines) -> tuple[str, ...] | None:
    """(item, title, text, genres) of one ``u.item`` line, or None after reporting it."""
    movie_id, title, release_date = row[0].strip(), row[1].strip(), row[2].strip()
    flags = [flag.strip() for flag in row[5:]]
    if not movie_id.isdigit():
        bad.report(lineno, f"non-numeric movie id {movie_id!r}")
        return None
    if any(flag not in ("0", "1") for flag in flags):
        bad.report(lineno, f"genre flags must be 0 or 1, got {'|'.join(flags)!r}")
        return None
    genres = [genre for genre, flag in zip(GENRES_100K, flags, strict=True) if flag == "1"]
    year = release_date[-4:] if release_date[-4:].isdigit() else None
    return movie_id, title, describe_movie(title, genres, year), "|".join(genres)


def describe_movie(title: str, genres: list[str], year: str | None = None) -> str:
    """Short item text: "Title (year). Genres: A, B." (the year is added only when the title lacks it)."""
    head = title.strip()
    if year and f"({year})" not in head:
        head = f"{head} ({year})"
    shown = [genre for genre in genres if genre not in _NO_GENRE]
    return f"{head}. Genres: {', '.join(shown)}." if shown else f"{head}."


def read_movielens_1m(input: Path, *, on_bad_line: OnBadLine = "error") -> RawData:
    """Read an ``ml-1m`` folder: ``ratings.dat``, ``movies.dat`` and, when present, ``users.dat``."""
    input = Path(input)
    ratings = require_file(input / "ratings.dat", "ratings (UserID::MovieID::Rating::Timestamp)")
    raw = read_ratings(ratings, "::", on_bad_line)
    add_movies_dat(raw, input / "movies.dat", on_bad_line)
    add_users_dat(raw, input / "users.dat", on_bad_line)
    return raw


def read_ratings(path: Path, sep: str, on_bad_line: OnBadLine) -> RawData:
    """A RawData holding the interactions of a headerless user, item, rating, timestamp file."""
    with SortedBadLines(path, on_bad_line) as bad:
        table = split_table(read_text_lines(path, bad), sep, ["user", "item", "rating", "timestamp"], bad)
        interactions = to_interactions(table, bad, numeric_ids=True)
    return RawData(interactions, input_files=[path], skipped_lines=bad.count)


def add_movies_dat(raw: RawData, path: Path, on_bad_line: OnBadLine) -> None:
    """Set ``raw.items`` from a ``MovieID::Title::Genres`` file (genres ``|``-separated)."""
    require_file(path, "movies (MovieID::Title::Genres)")
    with SortedBadLines(path, on_bad_line) as bad:
        rows, linenos = split_fields(read_text_lines(path, bad), "::", 3, bad)
        items = [_movies_dat_row(row, lineno, bad) for row, lineno in zip(rows, linenos, strict=True)]
    items = [item for item in items if item is not None]
    raw.items = pd.DataFrame(items, columns=["item", "title", "text", "genres"])
    raw.input_files.append(path)
    raw.skipped_lines += bad.count


def _movies_dat_row(row: list[str], lineno: int, bad: BadLines) -> tuple[str, ...] | None:
    """(item, title, text, genres) of one ``movies.dat`` line, or None after reporting it."""
    movie_id, title, genres = (field.strip() for field in row)
    if not movie_id.isdigit():
        bad.report(lineno, f"non-numeric movie id {movie_id!r}")
        return None
    genre_list = [genre.strip() for genre in genres.split("|") if genre.strip()]
    year = match.group(1) if (match := re.search(r"\((\d{4})\)$", title)) else None
    return movie_id, title, describe_movie(title, genre_list, year), "|".join(genre_list)


def add_users_dat(raw: RawData, path: Path, on_bad_line: OnBadLine) -> None:
    """Set ``raw.users`` from ``UserID::Gender::Age::Occupation::Zip-code``, or note it missing."""
    if not path.is_file():
        raw.missing[path.name] = "absent"
        return
    with SortedBadLines(path, on_bad_line) as bad:
        rows, linenos = split_fields(read_text_lines(path, bad), "::", 5, bad)
        users = [[field.strip() for field in row] for row in rows]
        for user, lineno in zip(users, linenos, strict=True):
            if not user[0].isdigit():
                bad.report(lineno, f"non-numeric user id {user[0]!r}")
    users = [user for user in users if user[0].isdigit()]
    raw.users = pd.DataFrame(users, columns=["user", "gender", "age", "occupation", "zip"])
    raw.input_files.append(path)
    raw.skipped_lines += bad.count
