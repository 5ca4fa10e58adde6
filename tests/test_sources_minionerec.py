"""MiniOneRec reader on tiny folders written in its layout (train/valid/test CSV, info, index)."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest

from rayrec.data.sources.minionerec import parse_id_list, read_minionerec
from rayrec.errors import DataError

HEADER = [
    "user_id",
    "history_item_title",
    "item_title",
    "history_item_id",
    "item_id",
    "history_item_sid",
    "item_sid",
]
TITLES = {"1": "Red Car", "2": "Blue Kite", "3": "Lego Set", "4": "Puzzle", "5": "Yo-yo"}
CSV_NAME = "Toys_5_2016-10-2018-11"


def sid(item: str) -> str:
    return f"<a_{item}><b_0><c_{item}>"


def row(user: str, history: list[str], target: str) -> list[str]:
    """One CSV row as MiniOneRec writes it: list cells are Python list literals."""
    return [
        user,
        repr([TITLES[i] for i in history]),
        TITLES[target],
        repr([int(i) for i in history]),
        target,
        repr([sid(i) for i in history]),
        sid(target),
    ]


TRAIN = [row("A1", ["1"], "2"), row("A1", ["1", "2"], "3"), row("A1", ["1", "2", "3"], "4"),
         row("A2", ["3"], "1"), row("A2", ["3", "1"], "5")]  # fmt: skip
VALID = [row("A1", ["1", "2", "3", "4"], "5")]
TEST = [row("A1", ["1", "2", "3", "4", "5"], "2"), row("A3", ["2"], "3")]


def write_csv(path: Path, rows: list[list[str]], header: list[str] = HEADER) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def make_dataset(root: Path, *, train=TRAIN, valid=VALID, test=TEST, name="Toys", items=TITLES) -> Path:
    """A complete MiniOneRec folder for category ``name``."""
    for split, rows in (("train", train), ("valid", valid), ("test", test)):
        write_csv(root / split / f"{name}_5_2016-10-2018-11.csv", rows)
    (root / "index").mkdir(exist_ok=True)
    index = {i: [f"<a_{i}>", "<b_0>", f"<c_{i}>"] for i in items}
    meta = {i: {"title": t, "description": "" if i == "5" else f"A {t.lower()}."} for i, t in items.items()}
    (root / "index" / f"{name}.index.json").write_text(json.dumps(index))
    (root / "index" / f"{name}.item.json").write_text(json.dumps(meta))
    (root / "info").mkdir(exist_ok=True)
    info = "".join(f"{sid(i)}\t{t}\t{i}\n" for i, t in items.items())
    (root / "info" / f"{name}_5_2016-10-2018-11.txt").write_text(info)
    return root


def test_reads_items_and_keeps_the_split(tmp_path):
    raw = read_minionerec(make_dataset(tmp_path))
    ps = raw.presplit
    assert ps.train_seqs == {"A1": ["1", "2", "3", "4"], "A2": ["3", "1", "5"]}
    assert ps.valid.to_dict("records") == [{"user": "A1", "history": ["1", "2", "3", "4"], "target": "5"}]
    assert list(ps.test["user"]) == ["A1", "A3"] and ps.test["history"][1] == ["2"]
    inter = raw.interactions
    assert list(inter.columns) == ["user", "item", "timestamp", "rating"]
    assert list(inter["item"]) == ["1", "2", "3", "4", "3", "1", "5"]
    assert inter["timestamp"].is_monotonic_increasing and inter["timestamp"].dtype == "int64"
    assert all(math.isnan(r) for r in inter["rating"])
    items = raw.items.set_index("item")
    assert items.loc["3", "title"] == "Lego Set" and items.loc["3", "text"] == "A lego set."
    assert items.loc["3", "sid"] == "<a_3><b_0><c_3>"
    assert raw.missing == {"descriptions": 1, "sids": 0}
    assert {p.name for p in raw.input_files} == {
        f"{CSV_NAME}.csv",
        f"{CSV_NAME}.txt",
        "Toys.index.json",
        "Toys.item.json",
    }


def test_truncated_windows_chain_into_the_full_sequence(tmp_path):
    """Histories cut to the last 2 items still chain; rows that do not chain use the longest."""
    train = [row("A1", ["1"], "2"), row("A1", ["1", "2"], "3"), row("A1", ["2", "3"], "4"),
             row("A1", ["3", "4"], "5"),
             row("A2", ["4", "5"], "1"), row("A2", ["2"], "3")]  # fmt: skip
    raw = read_minionerec(make_dataset(tmp_path, train=train))
    assert raw.presplit.train_seqs == {"A1": ["1", "2", "3", "4", "5"], "A2": ["4", "5", "1"]}


def test_only_id_list_literals_are_accepted():
    assert parse_id_list("[12, 7, 200]") == ["12", "7", "200"]
    assert parse_id_list("['B00X', 'B00Y']") == ["B00X", "B00Y"]
    assert parse_id_list("[]") == []
    for cell in ["__import__('os').system('x')", "[1, [2]]", "{'a': 1}", "[1.5]", "[True]", "[1, 2", "12"]:
        with pytest.raises(ValueError):
            parse_id_list(cell)


def test_code_in_a_list_cell_is_a_bad_line_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = row("A2", ["3"], "1")
    evil[3] = "__import__('pathlib').Path('PWNED').touch()"
    root = make_dataset(tmp_path / "data", train=TRAIN[:2] + [evil] + TRAIN[3:])
    with pytest.raises(DataError, match=rf"{CSV_NAME}\.csv:4: history_item_id"):
        read_minionerec(root)
    raw = read_minionerec(root, on_bad_line="skip")
    assert raw.skipped_lines == 1 and raw.presplit.train_seqs["A1"] == ["1", "2", "3"]
    assert not (tmp_path / "PWNED").exists()


def test_line_numbers_count_multiline_cells(tmp_path):
    """A quoted title spanning three lines shifts the next record's line: 1 header, 2-4, 5."""
    multi = row("A1", ["1"], "2")
    multi[1] = "['Red\nCar', 'big\nbox']"
    bad = row("A1", ["1", "2"], "3")
    bad[3] = "[1, 2"
    root = make_dataset(tmp_path, train=[multi, bad])
    with pytest.raises(DataError, match=rf"{CSV_NAME}\.csv:5: history_item_id: not a list literal"):
        read_minionerec(root)
    bad_multi = row("A1", ["1", "2"], "3")
    bad_multi[3] = "[1,\n2,\nx]"
    root = make_dataset(tmp_path / "b", train=[TRAIN[0], bad_multi, TRAIN[2]])
    with pytest.raises(DataError, match=rf"{CSV_NAME}\.csv:3: "):
        read_minionerec(root)


def test_wrong_field_count_and_missing_column(tmp_path):
    root = make_dataset(tmp_path, train=[TRAIN[0], TRAIN[1][:4]])
    with pytest.raises(DataError, match=rf"{CSV_NAME}\.csv:3: expected 7 fields, got 4"):
        read_minionerec(root)
    write_csv(root / "train" / f"{CSV_NAME}.csv", [r[1:] for r in TRAIN], HEADER[1:])
    with pytest.raises(DataError, match=r"missing column\(s\) user_id"):
        read_minionerec(root)


def test_unknown_item_ids_are_named(tmp_path):
    test = [row("A1", ["1"], "2")]
    test[0][3] = repr(list(range(100, 112)))  # 12 ids the item table lacks
    with pytest.raises(
        DataError, match=r"12 item id\(s\) in the train/valid/test CSVs .*100, 101.*, \.\.\."
    ) as err:
        read_minionerec(make_dataset(tmp_path, test=test))
    assert "109" in str(err.value) and "111" not in str(err.value)  # at most 10 named
    root = make_dataset(tmp_path / "b")
    index = json.loads((root / "index" / "Toys.index.json").read_text())
    (root / "index" / "Toys.index.json").write_text(json.dumps({**index, "77": ["<a_9>"]}))
    with pytest.raises(DataError, match=r"1 item id\(s\) in .*Toys.index.json.*: 77"):
        read_minionerec(root)


def test_missing_folder_is_named(tmp_path):
    root = make_dataset(tmp_path)
    (root / "valid" / f"{CSV_NAME}.csv").unlink()
    (root / "valid").rmdir()
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'valid'}: missing valid/ folder")):
        read_minionerec(root)
    with pytest.raises(DataError, match="not a folder"):
        read_minionerec(tmp_path / "nope")


def test_several_categories_need_a_name(tmp_path):
    make_dataset(tmp_path)
    make_dataset(
        tmp_path, name="Games", items={"1": "Chess", "2": "Go", "3": "Dice", "4": "Cards", "5": "Ball"}
    )
    with pytest.raises(DataError, match="several .*pass the dataset name"):
        read_minionerec(tmp_path)
    raw = read_minionerec(tmp_path, name="Games")
    assert set(raw.items["title"]) == {"Chess", "Go", "Dice", "Cards", "Ball"}
    assert all(p.name.startswith("Games") for p in raw.input_files)


def test_without_index_and_info_there_is_no_item_table(tmp_path):
    root = tmp_path
    for split, rows in (("train", TRAIN), ("valid", VALID), ("test", TEST)):
        write_csv(root / split / "data.csv", rows)
    raw = read_minionerec(root)
    assert raw.items is None
    assert raw.missing == {"index.json": "absent", "item.json": "absent", "info": "absent"}
    # With only info/*.txt, titles and SIDs come from there.
    (root / "info").mkdir()
    (root / "info" / "data.txt").write_text("".join(f"{sid(i)}\tA\tB {t}\t{i}\n" for i, t in TITLES.items()))
    items = read_minionerec(root).items.set_index("item")
    assert items.loc["2", "title"] == "A\tB Blue Kite" and items.loc["2", "sid"] == sid("2")
