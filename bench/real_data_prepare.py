"""Prepared datasets of MiniOneRec's published Amazon data (real interactions, real item text).

Usage:  python bench/real_data_prepare.py --source MINIONEREC [--out data/real] [--datasets ...]

``MINIONEREC`` is a checkout of github.com/AkaliKong/MiniOneRec, or its bare git folder (the files
are then read with ``git show HEAD:PATH``). For each dataset (Industrial_and_Scientific,
Office_Products) it writes ``OUT/raw/<name>/`` in MiniOneRec's layout and prepares it with
``rayrec data prepare minionerec`` into ``OUT/<name>/``. Nothing here is checked in: the raw and
prepared files stay under ``data/`` (ignored by git).

The published snapshot has no train CSVs (they are Git LFS objects), so the training set is
rebuilt from the histories of the valid and test rows, and the benchmark says so:

- MiniOneRec splits by global time (8:1:1): a valid row predicts an event of the valid window from
  the user's history before it; a user's later valid rows carry the earlier valid targets in their
  histories, and test histories may carry valid targets.
- So a user's training sequence is the history of their *first* row (the valid or test row whose
  history holds none of the user's valid or test targets): events before the valid window only,
  at most MiniOneRec's 10 most recent. It is written as one train row per step (every prefix ->
  next item), the one-row-per-step layout the reader chains back into a sequence.
- Valid and test rows are kept exactly as published (temporal split, histories up to 10 items).
  No valid or test target is ever a training event.
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATASETS = ("Industrial_and_Scientific", "Office_Products")
SUFFIX = "_5_2016-10-2018-11"


class Source:
    """Files of a MiniOneRec checkout or bare git folder, by repository path."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.git = not (path / "data").is_dir()

    def read(self, rel: str) -> bytes:
        if not self.git:
            return (self.path / rel).read_bytes()
        out = subprocess.run(["git", f"--git-dir={self.path}", "show", f"HEAD:{rel}"], capture_output=True)
        if out.returncode:
            raise SystemExit(f"{self.path}: no {rel} ({out.stderr.decode().strip()})")
        return out.stdout


def rows_of(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(text.splitlines()))


def train_sequences(valid: list[dict[str, str]], test: list[dict[str, str]]) -> dict[str, list[str]]:
    """Each user's events before the valid window: the history of their first valid/test row."""
    rows: dict[str, list[tuple[list[str], str]]] = {}
    for r in valid + test:
        rows.setdefault(r["user_id"], []).append(([str(i) for i in ast.literal_eval(r["history_item_id"])],
                                                  str(r["item_id"])))
    out = {}
    for user, urows in rows.items():
        targets = {t for _, t in urows}
        first = [h for h, _ in urows if not targets.intersection(h)]
        if first:
            out[user] = max(first, key=len)
    return out


def write_raw(src: Source, name: str, raw: Path) -> dict[str, int]:
    """MiniOneRec's layout for one dataset under ``raw``, with the rebuilt train CSV."""
    base = "data/Amazon"
    splits = {s: src.read(f"{base}/{s}/{name}{SUFFIX}.csv").decode("utf-8") for s in ("valid", "test")}
    for s, text in splits.items():
        (raw / s).mkdir(parents=True, exist_ok=True)
        (raw / s / f"{name}{SUFFIX}.csv").write_text(text, encoding="utf-8")
    for rel, folder in ((f"index/{name}.index.json", "index"), (f"index/{name}.item.json", "index"),
                        (f"info/{name}{SUFFIX}.txt", "info")):
        (raw / folder).mkdir(parents=True, exist_ok=True)
        (raw / folder / Path(rel).name).write_bytes(src.read(f"{base}/{rel}"))
    valid, test = rows_of(splits["valid"]), rows_of(splits["test"])
    seqs = train_sequences(valid, test)
    (raw / "train").mkdir(parents=True, exist_ok=True)
    with (raw / "train" / f"{name}{SUFFIX}.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "history_item_id", "item_id"])
        for user, seq in seqs.items():
            for i in range(1, len(seq)):
                w.writerow([user, json.dumps([int(x) for x in seq[:i]]), seq[i]])
    return {"valid_rows": len(valid), "test_rows": len(test), "train_users": len(seqs),
            "train_events": sum(len(s) for s in seqs.values()),
            "users_without_train": len({r["user_id"] for r in valid + test} - set(seqs))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path, required=True, help="MiniOneRec checkout or bare git folder")
    ap.add_argument("--out", type=Path, default=ROOT / "data" / "real")
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    args = ap.parse_args()
    from rayrec.cli import main as rayrec

    src = Source(args.source)
    for name in args.datasets:
        raw = args.out / "raw" / name
        counts = write_raw(src, name, raw)
        print(f"{name}: {json.dumps(counts)}")
        rc = rayrec(["data", "prepare", "minionerec", "--input", str(raw), "--out", str(args.out / name),
                     "--option", f"name={name}", "--min-seq-len", "1", "--overwrite"])
        if rc:
            raise SystemExit(rc)


if __name__ == "__main__":
    main()
