"""MovieLens 100K / 1M readers on tiny files written in the official formats."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from rayrec.data.sources.movielens import read_movielens_1m, read_movielens_100k
from rayrec.errors import DataError

U_DATA = "196\t242\t3\t881250949\n186\t302\t3\t891717742\n22\t377\t1\t878887116\n"


def _flags(*on: int) -> str:
    """The 19 u.item genre flags with the given positions set."""
    return "|".join("1" if i in on else "0" for i in range(19))


# 1 Toy Story: Animation(3), Children's(4), Comedy(5); 267 has only "unknown" (0) and no date.
U_ITEM = (
    f"1|Toy Story (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Toy%20Story%20(1995)|{_flags(3, 4, 5)}\n"
    f"267|unknown||||{_flags(0)}\n"
    f"1300|Misérables, Les (1995)|01-Jan-1995||http://x|{_flags(8)}\n"
)


def write(folder: Path, files: dict[str, str], encoding: str = "latin-1") -> Path:
    """Write each name -> text into ``folder`` (latin-1, like the official archives)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_bytes(text.encode(encoding))
    return folder


def test_100k_reads_ratings_and_items(tmp_path):
    raw = read_movielens_100k(write(tmp_path, {"u.data": U_DATA, "u.item": U_ITEM}))
    inter = raw.interactions
    assert list(inter.columns) == ["user", "item", "timestamp", "rating"]
    assert inter.iloc[0].to_dict() == {"user": "196", "item": "242", "timestamp": 881250949, "rating": 3.0}
    assert str(inter["timestamp"].dtype) == "int64" and str(inter["rating"].dtype) == "float64"
    items = raw.items.set_index("item")
    assert items.loc["1", "genres"] == "Animation|Children's|Comedy"
    assert items.loc["1", "text"] == "Toy Story (1995). Genres: Animation, Children's, Comedy."
    assert items.loc["267", "text"] == "unknown."  # the "unknown" genre is not written out
    assert items.loc["1300", "title"] == "Misérables, Les (1995)"  # latin-1 decoded
    assert raw.input_files == [tmp_path / "u.data", tmp_path / "u.item"]
    assert raw.skipped_lines == 0 and raw.missing == {}


def test_100k_without_u_item_notes_it_missing(tmp_path):
    raw = read_movielens_100k(write(tmp_path, {"u.data": U_DATA}))
    assert len(raw.interactions) == 3 and raw.items is None
    assert raw.missing == {"u.item": "absent"}


def test_100k_without_u_data_fails(tmp_path):
    with pytest.raises(DataError, match="u.data"):
        read_movielens_100k(tmp_path)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("1\t2\t3\n", "expected 4 fields"),
        ("x1\t2\t3\t4\n", "non-numeric user id 'x1'"),
        ("1\t2\t3\tyesterday\n", "bad timestamp 'yesterday'"),
        ("1\t2\tgood\t4\n", "non-numeric rating 'good'"),
    ],
)
def test_100k_bad_line_names_file_and_line(tmp_path, line, reason):
    write(tmp_path, {"u.data": U_DATA + "\n" + line})  # blank line 4 still counts
    with pytest.raises(DataError, match=f"u.data:5: {reason}"):
        read_movielens_100k(tmp_path)


def test_100k_skip_counts_bad_lines_in_both_files(tmp_path):
    bad_item = f"x|Bad|||{_flags(1)}\n2|Short|01-Jan-1995\n"
    write(tmp_path, {"u.data": U_DATA + "1\t2\t3\n7\t8\tx\t9\n", "u.item": U_ITEM + bad_item})
    raw = read_movielens_100k(tmp_path, on_bad_line="skip")
    assert len(raw.interactions) == 3 and len(raw.items) == 3
    assert raw.skipped_lines == 4


RATINGS_DAT = "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n"
MOVIES_DAT = (
    "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
    "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
    "2::Cité des enfants perdus, La (1995)::Adventure|Sci-Fi\n"
)
USERS_DAT = "1::F::1::10::48067\n2::M::56::16::70072\n"


def test_1m_reads_all_three_files(tmp_path):
    write(tmp_path, {"ratings.dat": RATINGS_DAT, "movies.dat": MOVIES_DAT, "users.dat": USERS_DAT})
    raw = read_movielens_1m(tmp_path)
    assert raw.interactions[["user", "item", "rating"]].values.tolist() == [
        ["1", "1193", 5.0], ["1", "661", 3.0], ["2", "1193", 4.0],
    ]  # fmt: skip
    assert raw.interactions["timestamp"].tolist() == [978300760, 978302109, 978298413]
    items = raw.items.set_index("item")
    assert items.loc["2", "title"] == "Cité des enfants perdus, La (1995)"
    assert items.loc["661", "genres"] == "Animation|Children's|Musical"
    assert items.loc["661", "text"] == (
        "James and the Giant Peach (1996). Genres: Animation, Children's, Musical."
    )
    assert raw.users.to_dict("records")[1] == {
        "user": "2", "gender": "M", "age": "56", "occupation": "16", "zip": "70072",
    }  # fmt: skip
    assert [p.name for p in raw.input_files] == ["ratings.dat", "movies.dat", "users.dat"]


def test_1m_reads_a_utf8_copy_too(tmp_path):
    write(tmp_path, {"ratings.dat": RATINGS_DAT, "movies.dat": MOVIES_DAT}, encoding="utf-8")
    raw = read_movielens_1m(tmp_path)
    assert raw.items.set_index("item").loc["2", "title"].startswith("Cité")
    assert raw.users is None and raw.missing == {"users.dat": "absent"}


def test_1m_requires_movies(tmp_path):
    write(tmp_path, {"ratings.dat": RATINGS_DAT})
    with pytest.raises(DataError, match="movies.dat: missing movies"):
        read_movielens_1m(tmp_path)


def test_1m_bad_movie_line_and_skip(tmp_path):
    write(tmp_path, {"ratings.dat": RATINGS_DAT, "movies.dat": MOVIES_DAT + "abc::Title::Drama\n"})
    with pytest.raises(DataError, match=r"movies.dat:4: non-numeric movie id 'abc'"):
        read_movielens_1m(tmp_path)
    raw = read_movielens_1m(tmp_path, on_bad_line="skip")
    assert raw.skipped_lines == 1 and len(raw.items) == 3


def test_1m_rating_values_stay_floats(tmp_path):
    write(tmp_path, {"ratings.dat": "5::7::3.5::100\n", "movies.dat": MOVIES_DAT})
    rating = read_movielens_1m(tmp_path).interactions["rating"].iloc[0]
    assert rating == 3.5 and not math.isnan(rating)
