"""Multimodal MovieLens (UR4Rec layout): descriptions, posters and user.dat, each possibly missing."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest

from rayrec.data.sources import multimodal_movielens
from rayrec.data.sources.multimodal_movielens import read_movielens_multimodal
from rayrec.errors import DataError

RATINGS = "1::10::5::978300760\n1::20::3::978302109\n2::30::4::978298413\n"
MOVIES = (
    "10::GoldenEye (1995)::Action|Adventure|Thriller\n"
    "20::Cité des enfants perdus, La (1995)::Adventure|Sci-Fi\n"
    "30::Heat (1995)::Action|Crime|Thriller\n"
)
# Movie 10's review spans two lines (quoted); movie 30's review is empty; movie 99 is unknown.
TEXT_CSV = (
    'movie-id,review\n10,"A spy film.\nBond returns."\n20,Une fable sombre.\n30,\n99,Not a movie here.\n'
)


def write_layout(
    folder: Path,
    *,
    text_csv: str | None = TEXT_CSV,
    users: str | None = "1::F::1::10::48067\n2::M::56::16::70072\n",
    posters: tuple[str, ...] = ("10", "30"),
) -> Path:
    """Write the UR4Rec folder layout; None / () leaves a part out."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ratings.dat").write_text(RATINGS)
    (folder / "movies.dat").write_bytes(MOVIES.encode("latin-1"))
    if users is not None:
        (folder / "user.dat").write_text(users)
    if text_csv is not None:
        (folder / "text.csv").write_text(text_csv, encoding="utf-8")
    if posters:
        (folder / "image").mkdir()
        for movie_id in posters:
            (folder / "image" / f"{movie_id}.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return folder


def test_full_layout(tmp_path, caplog):
    folder = write_layout(tmp_path / "ml")
    with caplog.at_level(logging.WARNING):
        raw = read_movielens_multimodal(folder)
    items = raw.items.set_index("item")
    assert items.loc["10", "text"] == "A spy film.\nBond returns."
    assert items.loc["20", "text"] == "Une fable sombre."
    assert items.loc["20", "title"] == "Cité des enfants perdus, La (1995)"
    assert items.loc["30", "text"] == "Heat (1995). Genres: Action, Crime, Thriller."  # fallback
    assert items.loc["30", "genres"] == "Action|Crime|Thriller"
    assert items.loc["10", "image_path"] == str((folder / "image" / "10.png").resolve())
    assert Path(items.loc["10", "image_path"]).is_absolute()
    assert items.loc["20", "image_path"] is None
    assert raw.missing == {"descriptions": 1, "images": 1}
    assert len(raw.interactions) == 3 and raw.users["user"].tolist() == ["1", "2"]
    assert [p.name for p in raw.input_files] == ["ratings.dat", "movies.dat", "user.dat", "text.csv"]
    assert "missing parts" in caplog.text and "'images': 1" in caplog.text


def test_only_ratings_and_movies(tmp_path, caplog):
    folder = write_layout(tmp_path, text_csv=None, users=None, posters=())
    with caplog.at_level(logging.WARNING):
        raw = read_movielens_multimodal(folder)
    assert raw.missing == {
        "user.dat": "absent",
        "text.xls/text.csv": "absent",
        "image/": "absent",
        "descriptions": 3,
        "images": 3,
    }
    assert raw.users is None
    assert raw.items["image_path"].isna().all()
    assert raw.items.set_index("item").loc["10", "text"].startswith("GoldenEye (1995). Genres: Action")
    assert caplog.records and caplog.records[0].levelno == logging.WARNING


def test_bad_description_line_counts_quoted_lines(tmp_path):
    folder = write_layout(tmp_path, text_csv=TEXT_CSV + "x7,Bad id\n")
    with pytest.raises(DataError, match=r"text.csv:7: non-numeric movie-id 'x7'"):
        read_movielens_multimodal(folder)
    raw = read_movielens_multimodal(folder, on_bad_line="skip")
    assert raw.skipped_lines == 1
    assert raw.items.set_index("item").loc["10", "text"] == "A spy film.\nBond returns."


def test_description_columns_must_exist(tmp_path):
    folder = write_layout(tmp_path, text_csv="id,plot\n10,x\n")
    with pytest.raises(DataError, match="expected columns movie-id, review; columns present: id, plot"):
        read_movielens_multimodal(folder)


def test_xls_without_reader_asks_for_xlrd_or_csv(tmp_path, monkeypatch):
    monkeypatch.setattr(multimodal_movielens, "_module_available", lambda name: False)
    folder = write_layout(tmp_path, text_csv=None)
    (folder / "text.xls").write_bytes(b"\xd0\xcf\x11\xe0" + b"\0" * 60)  # OLE2 header, like .xls
    with pytest.raises(DataError, match=r"needs the 'xlrd' package.*pip install xlrd.*text\.csv"):
        read_movielens_multimodal(folder)
    (folder / "text.csv").write_text(TEXT_CSV)  # a CSV copy beside it is used instead
    raw = read_movielens_multimodal(folder)
    assert raw.items.set_index("item").loc["20", "text"] == "Une fable sombre."
    assert raw.input_files[-1].name == "text.csv"


def test_xlsx_saved_as_text_xls_is_read(tmp_path):
    pytest.importorskip("openpyxl")
    folder = write_layout(tmp_path, text_csv=None)
    frame = pd.DataFrame({"movie-id": [10, 20], "review": ["Spy story.", None]})
    frame.to_excel(folder / "text.xls", index=False, engine="openpyxl")
    raw = read_movielens_multimodal(folder)
    items = raw.items.set_index("item")
    assert items.loc["10", "text"] == "Spy story."
    assert raw.missing["descriptions"] == 2
