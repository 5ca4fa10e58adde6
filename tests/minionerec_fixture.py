"""A small Amazon Industrial_and_Scientific folder in MiniOneRec's published layout.

    index/Industrial_and_Scientific.index.json       item id -> ["<a_..>", "<b_..>", "<c_..>"]
    index/Industrial_and_Scientific.item.json        item id -> {title, description, brand, categories}
    info/Industrial_and_Scientific_5_2016-10-2018-11.txt     SID <tab> title <tab> item id
    train/ valid/ test/ Industrial_and_Scientific_5_2016-10-2018-11.csv
        user_id,history_item_title,item_title,history_item_id,item_id,history_item_sid,item_sid

Like the published index, a few SIDs name several items (3 SIDs, 7 items; most of them
with identical titles), titles are long, and histories hold up to 10 items, so
``model.max_length`` cuts prompts. Deterministic: ``python tests/minionerec_fixture.py
OUT`` rewrites the checked-in copy under ``tests/fixtures/minionerec_industrial`` (a test
checks that the two agree).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np

NAME = "Industrial_and_Scientific"
CSV_NAME = f"{NAME}_5_2016-10-2018-11"
HEADER = ["user_id", "history_item_title", "item_title", "history_item_id", "item_id", "history_item_sid", "item_sid"]
CHECKED_IN = Path(__file__).parent / "fixtures" / "minionerec_industrial"

COLORS = ["Black", "White", "Red", "Blue", "Silver", "Gold", "Orange", "Grey", "Hot Pink", "Green", "Clear", "Brown"]
TOPICS = [
    ("3D Solutech", "{c} 3D Printer PLA Filament 1.75MM Filament, Dimensional Accuracy +/- 0.03 mm, 2.2 LBS (1.0KG)"),
    ("Scotch", "Super 33+ {c} Vinyl Electrical Tape, 3/4 in x 66 ft, Premium Grade, UL Listed"),
    ("Loctite", "Heavy Duty Epoxy {c} Quick Set 8-Fluid Ounce Bottle, Waterproof, Bonds Metal and Glass"),
    ("StainlessTown", "{c} Stainless Steel Fender Washer Assortment Kit, 18-8 Steel, 200 Pieces with Case"),
]
PER_TOPIC = 12
#: (items sharing one SID, whether their titles are identical): as in the published index.
SHARED = [((4, 5), True), ((17, 18), True), ((30, 31, 32), False)]


def items() -> tuple[dict[str, dict], dict[str, list[str]]]:
    """item id -> metadata, item id -> SID tokens (three SIDs shared, by ``SHARED``)."""
    meta, index = {}, {}
    for topic, (brand, pattern) in enumerate(TOPICS):
        for k in range(PER_TOPIC):
            item = topic * PER_TOPIC + k
            title = f"{brand} {pattern.format(c=COLORS[k])}"
            meta[str(item)] = {"title": title, "description": f"['{title}. Sold by {brand}.']", "brand": brand,
                               "categories": ""}
            index[str(item)] = [f"<a_{topic * 7 + 3}>", f"<b_{k // 4}>", f"<c_{(k * 37 + topic) % 256}>"]
    for group, same_title in SHARED:
        first = str(group[0])
        for item in group[1:]:
            index[str(item)] = list(index[first])
            if same_title:
                meta[str(item)] = dict(meta[first])
    return meta, index


def sequences(users: int = 40, seed: int = 0) -> dict[str, list[int]]:
    """user -> chronological item ids: mostly one topic, walking its items in order, some noise."""
    rng = np.random.default_rng(seed)
    out = {}
    for u in range(users):
        length = int(rng.integers(5, 21))
        topic, pos = int(rng.integers(len(TOPICS))), int(rng.integers(PER_TOPIC))
        seq = []
        for _ in range(length):
            if rng.random() < 0.15:
                seq.append(int(rng.integers(len(TOPICS) * PER_TOPIC)))
            else:
                pos = (pos + int(rng.integers(1, 3))) % PER_TOPIC
                seq.append(topic * PER_TOPIC + pos)
        out[f"A{1000 + u}"] = seq
    return out


def write_fixture(root: str | Path, *, users: int = 40, seed: int = 0) -> Path:
    """Write the folder under ``root``; returns ``root``."""
    root = Path(root)
    meta, index = items()
    sid = {k: "".join(v) for k, v in index.items()}
    (root / "index").mkdir(parents=True, exist_ok=True)
    (root / "info").mkdir(exist_ok=True)
    (root / "index" / f"{NAME}.index.json").write_text(json.dumps(index))
    (root / "index" / f"{NAME}.item.json").write_text(json.dumps(meta, indent=2))
    (root / "info" / f"{CSV_NAME}.txt").write_text("".join(f"{sid[k]}\t{meta[k]['title']}\t{k}\n" for k in index))
    rows: dict[str, list[list[str]]] = {"train": [], "valid": [], "test": []}
    for user, seq in sequences(users, seed).items():
        for t in range(1, len(seq)):
            split = "test" if t == len(seq) - 1 else "valid" if t == len(seq) - 2 else "train"
            hist, target = [str(i) for i in seq[max(0, t - 10) : t]], str(seq[t])
            rows[split].append([user, repr([meta[i]["title"] for i in hist]), meta[target]["title"],
                                repr([int(i) for i in hist]), target, repr([sid[i] for i in hist]), sid[target]])
    for split, split_rows in rows.items():
        (root / split).mkdir(exist_ok=True)
        with (root / split / f"{CSV_NAME}.csv").open("w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([HEADER, *split_rows])
    return root


if __name__ == "__main__":
    print(write_fixture(sys.argv[1] if len(sys.argv) > 1 else CHECKED_IN))
