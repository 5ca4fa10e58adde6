"""RecBole atomic files and generic CSV / Parquet interaction tables."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from rayrec.data.sources import SOURCES
from rayrec.data.sources.generic import read_interactions_table
from rayrec.data.sources.recbole import read_recbole
from rayrec.errors import DataError

INTER = (
    "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    "196\t242\t3\t881250949\n"
    "186\t302\t3\t891717742.0\n"
    "22\t377\t1\t878887116\n"
)
ITEM = (
    "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
    "242\tKolya\t1996\tComedy\n"
    "302\tL.A. Confidential\t1997\tCrime Film-Noir Mystery Thriller\n"
    "377\tHeavyweights\t\tChildren's Comedy\n"
)


def write(folder: Path, files: dict[str, str]) -> Path:
    """Write each name -> UTF-8 text into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def test_recbole_inter_and_item(tmp_path):
    raw = read_recbole(write(tmp_path, {"ml-100k.inter": INTER, "ml-100k.item": ITEM}))
    inter = raw.interactions
    assert inter.values.tolist() == [
        ["196", "242", 881250949, 3.0], ["186", "302", 891717742, 3.0], ["22", "377", 878887116, 1.0],
    ]  # fmt: skip
    items = raw.items.set_index("item")
    assert items.loc["302", "title"] == "L.A. Confidential"
    assert items.loc["302", "genres"] == "Crime|Film-Noir|Mystery|Thriller"
    assert items.loc["242", "text"] == "Kolya. release year: 1996. class: Comedy."
    assert items.loc["377", "text"] == "Heavyweights. class: Children's, Comedy."  # empty year left out
    assert [p.name for p in raw.input_files] == ["ml-100k.inter", "ml-100k.item"]


def test_recbole_without_time_rating_or_item_file(tmp_path):
    inter = "item_id:token\tuser_id:token\textra:float\nb\tu1\t0.5\na\tu1\t0.1\n"
    raw = read_recbole(write(tmp_path, {"x.inter": inter}), name="x")
    assert raw.interactions["item"].tolist() == ["b", "a"]
    assert raw.interactions["timestamp"].tolist() == [2, 3]  # line order
    assert raw.interactions["rating"].isna().all()
    assert raw.items is None and raw.missing == {"x.item": "absent"}


def test_recbole_finds_the_single_inter_file(tmp_path):
    with pytest.raises(DataError, match="found none"):
        read_recbole(tmp_path)
    write(tmp_path, {"a.inter": INTER, "b.inter": INTER})
    with pytest.raises(DataError, match="found a.inter, b.inter; pick one with the source option name"):
        read_recbole(tmp_path)
    assert len(read_recbole(tmp_path, name="b").interactions) == 3


def test_recbole_header_needs_user_and_item(tmp_path):
    write(tmp_path, {"d.inter": "uid:token\titem_id:token\n1\t2\n"})
    with pytest.raises(DataError, match=r"d.inter:1: no field 'user_id'.*fields present: uid, item_id"):
        read_recbole(tmp_path)


def test_recbole_bad_lines_error_and_skip(tmp_path):
    write(tmp_path, {"d.inter": INTER + "5\t6\t4\n7\t8\tfour\t1\n", "d.item": ITEM + "9\tOnly two\n"})
    with pytest.raises(DataError, match=r"d.inter:5: expected 4 fields separated by '\\t', got 3"):
        read_recbole(tmp_path)
    raw = read_recbole(tmp_path, on_bad_line="skip")
    assert raw.skipped_lines == 3
    assert len(raw.interactions) == 3 and len(raw.items) == 3


CSV = "uid,iid,when,stars\nu1,i1,100,4.5\nu2,i2,2020-01-02T00:00:00Z,3\nu1,i3,2020-01-02,1\n"


def test_csv_with_named_columns_and_iso_dates(tmp_path):
    path = write(tmp_path, {"log.csv": CSV}) / "log.csv"
    raw = read_interactions_table(path, user_col="uid", item_col="iid", time_col="when", rating_col="stars")
    assert raw.interactions.values.tolist() == [
        ["u1", "i1", 100, 4.5], ["u2", "i2", 1577923200, 3.0], ["u1", "i3", 1577923200, 1.0],
    ]  # fmt: skip
    assert raw.input_files == [path]


def test_csv_unknown_column_names_file_column_and_present_columns(tmp_path):
    path = write(tmp_path, {"log.csv": CSV}) / "log.csv"
    with pytest.raises(DataError) as err:
        read_interactions_table(path, user_col="uid", item_col="item", time_col="when")
    assert str(err.value) == (
        f"{path}: no column 'item' (item_col); columns present: uid, iid, when, stars. "
        "Set the option to one of the present columns."
    )


def test_csv_bad_timestamp_line_and_skip(tmp_path):
    text = 'user,item,timestamp\na,b,1\n"c\nd",e,2\nf,g,soon\nh,i\n'
    path = write(tmp_path, {"log.tsv": text}) / "log.tsv"
    with pytest.raises(
        DataError, match=r"log.tsv:5: bad timestamp 'soon' \(expected a number or an ISO date"
    ):
        read_interactions_table(path)
    raw = read_interactions_table(path, on_bad_line="skip")
    assert raw.skipped_lines == 2
    assert raw.interactions["user"].tolist() == ["a", "c\nd"]
    assert math.isnan(raw.interactions["rating"].iloc[0])


def test_tab_separated_table(tmp_path):
    path = write(tmp_path, {"log.txt": "user\titem\ttimestamp\tr\n1\t2\t3\t5\n"}) / "log.txt"
    raw = read_interactions_table(path, sep="\t", rating_col="r")
    assert raw.interactions.values.tolist() == [["1", "2", 3, 5.0]]


def test_parquet_table(tmp_path):
    frame = pd.DataFrame({
        "user": [1, 2, 2],
        "item": ["a", "b", None],
        "ts": pd.to_datetime(["1970-01-01 00:00:10", "1970-01-02 00:00:00", "1970-01-03 00:00:00"]),
    })  # fmt: skip
    frame.to_parquet(tmp_path / "log.parquet")
    with pytest.raises(DataError, match=r"log.parquet:3: empty item id"):
        read_interactions_table(tmp_path / "log.parquet", time_col="ts")
    raw = read_interactions_table(tmp_path / "log.parquet", time_col="ts", on_bad_line="skip")
    assert raw.interactions[["user", "item", "timestamp"]].values.tolist() == [
        ["1", "a", 10], ["2", "b", 86400],
    ]  # fmt: skip
    assert raw.skipped_lines == 1


def test_registry_names_every_reader():
    assert {"movielens-100k", "movielens-1m", "movielens-multimodal", "recbole", "csv"} <= set(SOURCES)
    assert SOURCES["csv"] is read_interactions_table and SOURCES["recbole"] is read_recbole
