"""Open a prepared dataset (the data contract), preparing it first when a job asks to."""

from __future__ import annotations

import inspect
import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rayrec.config.schema import DataConfig
from rayrec.data import prepare as prep
from rayrec.data.sources import SOURCES
from rayrec.errors import DataError

log = logging.getLogger(__name__)

REQUIRED_FILES = ("items.parquet", "train.parquet", "valid.parquet", "test.parquet", "manifest.json")


@dataclass
class Prepared:
    """A prepared dataset folder and what the trainer needs to know about it."""

    path: Path
    manifest: dict[str, Any]

    @property
    def num_items(self) -> int:
        return int(self.manifest["counts"]["items"])

    def table(self, split: str) -> pd.DataFrame:
        """``train``/``valid``/``test``/``items`` as a pandas DataFrame."""
        return pd.read_parquet(self.path / f"{split}.parquet")

    def file(self, split: str) -> str:
        return str(self.path / f"{split}.parquet")

    def max_history(self, split: str) -> int:
        """Longest history of an evaluation split (fixed width for masking seen items)."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        lengths = pc.list_value_length(pq.read_table(self.file(split), columns=["history"]).column("history"))
        longest = pc.max(lengths).as_py() if len(lengths) else None
        return int(longest) if longest else 1


def open_prepared(path: str | Path) -> Prepared:
    """Check that ``path`` holds a complete prepared dataset and read its manifest."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: no prepared dataset here (run `rayrec data prepare ... --out {path}`)")
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        raise DataError(f"{path}: not a prepared dataset, missing {', '.join(missing)}")
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        int(manifest["counts"]["items"]), int(manifest["counts"]["users"])
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}/manifest.json is corrupt ({type(e).__name__}: {str(e)[:80]}); prepare the "
                        f"dataset again (`rayrec data prepare ... --out {path} --overwrite`)") from None
    if manifest.get("schema_version") != prep.SCHEMA_VERSION:
        raise DataError(
            f"{path}/manifest.json: schema_version {manifest.get('schema_version')} != "
            f"{prep.SCHEMA_VERSION}; prepare the dataset again with this rayrec"
        )
    return Prepared(path, manifest)


def fingerprint(ds: Prepared) -> dict[str, Any]:
    """What identifies a prepared dataset's contents: a hash of its manifest (the input's hash, the source,
    filters and split, counts; not when it was written) and its counts. Checkpoints carry it."""
    import hashlib

    stable = {k: v for k, v in ds.manifest.items() if k != "created_at"}
    digest = hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()[:16]
    counts = ds.manifest["counts"]
    return {"manifest": digest, "users": int(counts["users"]), "items": int(counts["items"]),
            "interactions": int(counts.get("interactions", 0))}


def fingerprint_at(path: str | Path) -> dict[str, Any] | None:
    """``fingerprint`` of the dataset at ``path``, or None where it cannot be read (a worker that does not see it)."""
    try:
        return fingerprint(open_prepared(path))
    except (DataError, OSError):
        return None


def check_same_data(trained_on: dict[str, Any] | None, path: str | Path, what: str) -> None:
    """Refuse to resume or evaluate ``what`` (a checkpoint) on other data than it was trained on."""
    now = fingerprint_at(path)
    if trained_on and now and trained_on["manifest"] != now["manifest"]:
        raise DataError(f"{what} was trained on the dataset {describe_fingerprint(trained_on)}, but data.path {path} "
                        f"now holds {describe_fingerprint(now)} (prepared again, or another dataset); start a new "
                        "run (another run.name) or point data.path at the data it was trained on")


def describe_fingerprint(fp: dict[str, Any]) -> str:
    return f"{fp['manifest']} ({fp['users']} users, {fp['items']} items, {fp['interactions']} events)"


def check_contents(ds: Prepared) -> None:
    """The manifest agrees with the data: the item table has ``counts.items`` rows, every item id of
    the splits lies in 1..items, and no evaluation target is 0 (the padding id)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    n = ds.num_items
    rows = pq.ParquetFile(ds.file("items")).metadata.num_rows
    if rows != n:
        raise DataError(f"{ds.path}/manifest.json says {n} items but items.parquet holds {rows}; the dataset was "
                        "changed after it was prepared: prepare it again (`rayrec data prepare ... --overwrite`)")
    for split, column in (("train", "seq"), ("valid", "history"), ("valid", "target"), ("test", "history"),
                          ("test", "target")):
        col = pq.read_table(ds.file(split), columns=[column]).column(column)
        values = pc.list_flatten(col) if column in ("seq", "history") else col
        if not len(values):
            continue
        low, high = pc.min_max(values).values()
        low, high = low.as_py(), high.as_py()
        if column == "target" and low is not None and low <= 0:
            bad = pc.sum(pc.less_equal(values, 0)).as_py()
            raise DataError(f"{ds.file(split)}: {bad} targets are {low} (0 is the padding id, item ids are 1..{n}); "
                            "prepare the dataset again")
        if (low is not None and low < 0) or (high is not None and high > n):
            raise DataError(f"{ds.file(split)}: column {column} holds item ids {low}..{high}, outside 1..{n} "
                            f"(manifest.json counts.items = {n}); prepare the dataset again")


def source_reader(source: str, input: Path | None, *, on_bad_line: str, synth: dict[str, Any] | None = None, options: dict[str, Any] | None = None):
    """``read(workdir) -> RawData`` for ``source``; synthetic writes images into the dataset."""
    options = dict(options or {})
    if source == "synthetic":
        synth = dict(synth or {})
        images = synth.pop("images", True)

        def read_synth(workdir: Path):
            image_dir = workdir / "images" if images else None
            return SOURCES["synthetic"](**synth, image_dir=image_dir)

        return read_synth
    if input is None:
        raise DataError(f"source '{source}' needs --input PATH (the raw files)")
    if not Path(input).exists():
        raise DataError(f"{input}: input path does not exist")
    _check_options(source, options)
    return lambda workdir: SOURCES[source](Path(input), on_bad_line=on_bad_line, **options)


def _check_options(source: str, options: dict[str, Any]) -> None:
    """Reader options are keyword arguments of the reader: name the valid ones on a typo."""
    params = inspect.signature(SOURCES[source]).parameters
    valid = [n for n, p in params.items() if p.kind == p.KEYWORD_ONLY and n != "on_bad_line"]
    unknown = [k for k in options if k not in valid]
    if unknown:
        raise DataError(f"source '{source}' has no option {', '.join(map(repr, unknown))}; "
                        f"valid options: {', '.join(valid) or '(none)'}")


def ensure_prepared(cfg: DataConfig) -> Prepared:
    """Open ``cfg.path``; when absent and allowed, prepare it from ``cfg.source`` first."""
    if not cfg.path.exists():
        if not cfg.prepare_if_missing:
            raise DataError(f"data.path {cfg.path} does not exist and data.prepare_if_missing is false")
        if cfg.source != "synthetic" and cfg.input is None:
            raise DataError(f"data.path {cfg.path} does not exist yet and source '{cfg.source}' needs its raw "
                            "files: set data.input=/path/to/raw (or prepare it with `rayrec data prepare`)")
        log.info("preparing %s from source %s", cfg.path, cfg.source)
        synth = cfg.synth.model_dump() if cfg.source == "synthetic" else None
        params = {"source": cfg.source, "input": str(cfg.input) if cfg.input else None,
                  "synth": synth, "options": cfg.source_options}
        read = source_reader(cfg.source, cfg.input, on_bad_line=cfg.on_bad_line, synth=synth, options=cfg.source_options)
        prep.prepare(read, cfg.path, source=cfg.source, params=params, filters=cfg.filters, split=cfg.split)
    ds = open_prepared(cfg.path)
    check_contents(ds)
    _check_synth_matches(cfg, ds)
    return ds


def _check_synth_matches(cfg: DataConfig, ds: Prepared) -> None:
    """Warn when a synthetic dataset was prepared with other generator settings than the job's
    ``data.synth`` (which only says how to build ``data.path`` when it is absent, so the folder is
    used as it is: a dataset made by ``rayrec data synth`` is a valid target). Keys an older
    manifest lacks count as their defaults."""
    made = (ds.manifest.get("params") or {}).get("synth")
    if cfg.source != "synthetic" or ds.manifest.get("source") != "synthetic" or not isinstance(made, dict):
        return
    had = {**type(cfg.synth)().model_dump(), **made}
    diff = {k: (had.get(k), v) for k, v in cfg.synth.model_dump().items() if had.get(k) != v}
    if diff:
        shown = ", ".join(f"{k}: {a!r} there, {b!r} in the job" for k, (a, b) in sorted(diff.items()))
        log.warning("%s was made with other data.synth settings (%s); using it as it is. Delete it to "
                    "regenerate it from the job's settings.", ds.path, shown)


def describe(ds: Prepared) -> dict[str, Any]:
    """Statistics for `rayrec data info`: counts, length percentiles, sparsity, split sizes."""
    train = ds.table("train")
    valid, test = ds.table("valid"), ds.table("test")
    counts = ds.manifest["counts"]
    full_len = train["seq"].map(len).to_numpy()
    pct = np.percentile(full_len, [5, 25, 50, 75, 95, 100]) if len(full_len) else np.zeros(6)
    users, items, events = counts["users"], counts["items"], counts["interactions"]
    return {
        "path": str(ds.path),
        "source": ds.manifest["source"],
        "split": ds.manifest["split"],
        "users": users,
        "items": items,
        "interactions": events,
        "sparsity": 1.0 - events / max(1, users * items),
        "train_seq_len": dict(zip(["p5", "p25", "p50", "p75", "p95", "max"], [float(x) for x in pct])),
        "train_seq_len_mean": float(full_len.mean()) if len(full_len) else 0.0,
        "split_sizes": {"train_users": len(train), "train_events": int(full_len.sum()),
                        "valid_rows": len(valid), "test_rows": len(test)},
        "skipped_lines": ds.manifest.get("skipped_lines", 0),
        "missing": ds.manifest.get("missing", {}),
        "input_hash": ds.manifest.get("input_hash", "")[:16],
    }


read_dataset = partial(open_prepared)
