"""The ``amazon`` source on small fixtures written in the 2014 and the 2018 formats."""

import gzip
import json

import pandas as pd
import pytest

from rayrec.config.schema import FilterConfig
from rayrec.data.dataset import open_prepared, source_reader
from rayrec.data.prepare import prepare
from rayrec.data.sources.amazon import read_amazon
from rayrec.errors import DataError

USERS, ITEMS = 7, 6  # every core user reviews every core item: a 5-core survivor set


def reviews() -> list[dict]:
    out = []
    for u in range(USERS):
        for i in range(ITEMS):
            out.append({"reviewerID": f"U{u}", "asin": f"B{i:03d}", "unixReviewTime": 1_400_000_000 + 1000 * (u + i),
                        "overall": float(1 + (u + i) % 5), "reviewText": "fine"})
    # a user with 2 reviews and an item with 1: both gone after 5-core
    out += [{"reviewerID": "Ushort", "asin": "B000", "unixReviewTime": 1_500_000_000, "overall": 5.0},
            {"reviewerID": "Ushort", "asin": "Brare", "unixReviewTime": 1_500_000_100, "overall": 4.0}]
    return out


def meta_2014() -> list[str]:
    lines = []
    for i in range(ITEMS):
        rec = {"asin": f"B{i:03d}", "title": f"Rose lip balm {i}" if i != 3 else None,
               "categories": [["Beauty", "Skin Care", "Lips"], ["Beauty", "Gift Sets"]],
               "description": "A <b>moisturising</b> balm &amp; more", "imUrl": f"http://img/{i}.jpg",
               "salesRank": {"Beauty": 1000 + i}}
        if rec["title"] is None:
            del rec["title"]
        lines.append(repr(rec))  # Python literal: single quotes, as in the 2014 dumps
    lines.append("{'asin': 'B999', 'title': __import__('os').getcwd()}")  # not a literal: a bad line, never run
    return lines


def write_2014(folder, cat="Beauty"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"reviews_{cat}_5.json").write_text("\n".join(json.dumps(r) for r in reviews()) + "\n")
    with gzip.open(folder / f"meta_{cat}.json.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(meta_2014()) + "\n")
    return folder


def write_2018(folder, cat="Luxury_Beauty"):
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / f"{cat}_5.json.gz", "wt", encoding="utf-8") as f:
        for r in reviews():
            f.write(json.dumps({**r, "verified": True, "reviewTime": "01 1, 2015"}) + "\n")
    with gzip.open(folder / f"meta_{cat}.json.gz", "wt", encoding="utf-8") as f:
        for i in range(ITEMS):
            f.write(json.dumps({"asin": f"B{i:03d}", "title": f"Crème {i}", "category": ["Luxury Beauty", "Lips"],
                                "description": ["Silky.", "<p>For dry lips</p>"],
                                "imageURLHighRes": [f"https://img/{i}L.jpg"], "brand": "Maison"}) + "\n")
    return folder


def test_2014_reviews_and_literal_metadata(tmp_path):
    raw = read_amazon(write_2014(tmp_path / "a14"), on_bad_line="skip")
    assert len(raw.interactions) == USERS * ITEMS + 2 and raw.skipped_lines == 1  # the non-literal line
    items = raw.items.set_index("item")
    assert items.loc["B000", "title"] == "Rose lip balm 0" and pd.isna(items.loc["B003", "title"])
    assert items.loc["B000", "text"] == "Rose lip balm 0. Beauty, Skin Care, Lips, Gift Sets. A moisturising balm & more"
    assert items.loc["B000", "genres"] == "Beauty|Skin Care|Lips|Gift Sets"
    assert items.loc["B001", "image_url"] == "http://img/1.jpg"
    assert raw.missing["metadata"] == 1 and raw.missing["titles"] == 1  # Brare has no metadata; B003 no title
    with pytest.raises(DataError, match=r"meta_Beauty.json.gz:7: neither JSON nor a Python literal"):
        read_amazon(tmp_path / "a14", on_bad_line="error")


def test_2018_gzipped_json_prepared_with_5_core(tmp_path):
    src = write_2018(tmp_path / "a18")
    out = tmp_path / "prepared"
    prepare(source_reader("amazon", src, on_bad_line="error"), out, source="amazon", params={},
            filters=FilterConfig(user_core=5, item_core=5, min_seq_len=5), split="leave_one_out")
    ds = open_prepared(out)
    assert ds.num_items == ITEMS and ds.manifest["counts"]["train_users"] == USERS
    items = pd.read_parquet(out / "items.parquet")
    first = items.sort_values("source_id").iloc[0]
    assert first["title"] == "Crème 0" and first["text"] == "Crème 0. Luxury Beauty, Lips. Silky. For dry lips"
    train = pd.read_parquet(out / "train.parquet")
    assert len(train) == USERS and all(len(s) == ITEMS - 2 for s in train["seq"])  # leave-one-out: 2 held out


def test_bad_review_lines_and_missing_files_name_the_file(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    lines = [json.dumps(r) for r in reviews()[:3]] + ['{"reviewerID": "U9", "asin": "B1"}', "not json"]
    (folder / "Beauty_5.json").write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe broken\n")
    with pytest.raises(DataError, match=r"Beauty_5.json:4: no unixReviewTime in the review"):
        read_amazon(folder)
    raw = read_amazon(folder, on_bad_line="skip")
    assert len(raw.interactions) == 3 and raw.skipped_lines == 3
    assert raw.missing == {"meta_Beauty.json.gz": "absent", "duplicate_reviews": 0}
    write_2014(tmp_path / "two")
    write_2018(tmp_path / "two")
    with pytest.raises(DataError, match="expected one reviews file.*category=<Cat>"):
        read_amazon(tmp_path / "two")
    with pytest.raises(DataError, match="no reviews file for category 'Toys'"):
        read_amazon(tmp_path / "two", category="Toys")


def test_duplicates_missing_ratings_and_hostile_lines(tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    rows = reviews()[:4]
    lines = [json.dumps(r) for r in rows] + [json.dumps(rows[0])]  # an exact repeat, as in the 2018 dumps
    lines += [json.dumps({k: v for k, v in rows[1].items() if k != "overall"} | {"unixReviewTime": 1})]
    lines += ["[" * 100_000 + "]" * 100_000, '{"reviewerID": "U1", "asin": "B1", "unixReviewTime": ' + "9" * 5000 + "}"]
    lines += ['{"reviewerID": "U2", "asin": "B2", "unixReviewTime": 5, "x": "' + "y" * (1 << 20) + '"}']
    (folder / "Beauty_5.json").write_text("\n".join(lines) + "\n")
    raw = read_amazon(folder, on_bad_line="skip")
    assert raw.skipped_lines == 3  # the deep nesting, the 5,000-digit number, the 1 MB line
    assert raw.missing["duplicate_reviews"] == 1 and len(raw.interactions) == 5
    assert raw.interactions["rating"].isna().all()  # one review without "overall": no ratings at all
    with pytest.raises(DataError, match=r"Beauty_5.json:7: not a JSON object \(RecursionError\)"):
        read_amazon(folder)
    (folder / "Beauty_5.json").write_text("\n".join(lines[:6] + lines[8:]) + "\n")
    with pytest.raises(DataError, match=r"Beauty_5.json:7: line longer than 1048576 bytes"):
        read_amazon(folder)
