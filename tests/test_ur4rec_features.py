"""Item/user features: encoders, the on-disk cache, Ray Data map_batches, missing inputs, the CLI."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from rayrec.cli import main
from rayrec.config.joint import FeaturesConfig
from rayrec.data.features import (
    DescriptorImageEncoder,
    EmbeddingCache,
    compute_features,
    embed_cached,
    encode,
    load_feature_arrays,
    text_encoder_spec,
)
from rayrec.errors import ConfigError


def feats(tmp_path, **kw) -> FeaturesConfig:
    return FeaturesConfig(text_model="hash:32", cache_dir=tmp_path / "cache", dir=tmp_path / "features", **kw)


def test_second_run_computes_nothing(tiny_mm_dataset, tmp_path):
    cfg = feats(tmp_path)
    first = compute_features(cfg, tiny_mm_dataset, 300)
    assert first["computed"]["item_text"] == 120 and first["computed"]["item_image"] > 100
    assert first["dims"] == {"item_text": 32, "item_image": 236, "user_text": 32}
    again = compute_features(cfg, tiny_mm_dataset, 300)
    assert again == first  # up to date: not even read
    shutil.rmtree(cfg.dir)
    cached = compute_features(cfg, tiny_mm_dataset, 300)  # files gone, cache kept: nothing is encoded
    assert cached["computed"] == {"item_text": 0, "item_image": 0, "user_text": 0}
    arrays = load_feature_arrays(cfg.dir, num_items=120, num_users=300)
    assert arrays["item_text"].shape == (121, 32) and not arrays["item_text_ok"][0] and arrays["item_text_ok"][1:].all()


def test_cache_is_keyed_by_model_and_content(tmp_path):
    calls = []
    spec = text_encoder_spec("hash:8")
    cache = EmbeddingCache(tmp_path, spec.cache_key)
    vecs, n = embed_cached([b"a b", b"c"], ["a b", "c"], spec, cache, batch_size=4, use_ray=False)
    calls.append(n)
    vecs2, n = embed_cached([b"c", b"a b", b"d"], ["c", "a b", "d"], spec, EmbeddingCache(tmp_path, spec.cache_key),
                            batch_size=4, use_ray=False)
    calls.append(n)
    assert calls == [2, 1] and np.allclose(vecs2[1], vecs[0])
    other = EmbeddingCache(tmp_path, text_encoder_spec("hash:16").cache_key)
    assert other.hash(b"c") != cache.hash(b"c") and other.get([cache.hash(b"c")]) == {}


def test_missing_images_and_texts_are_counted_and_flagged(tiny_mm_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_mm_dataset, data, ignore=shutil.ignore_patterns("features"))
    (data / "images" / "3.png").unlink()
    items = pd.read_parquet(data / "items.parquet")
    items.loc[items["item_idx"] == 5, "text"] = ""
    items.to_parquet(data / "items.parquet")
    users = pd.read_parquet(data / "users.parquet")
    users[users["user_idx"] != 7].to_parquet(data / "users.parquet")
    m = compute_features(FeaturesConfig(text_model="hash:32", cache_dir=tmp_path / "cache"), data, 300)
    assert m["missing"] == {"item_text": 1, "item_image": 1, "user_text": 1}
    a = load_feature_arrays(data / "features", num_items=120, num_users=300)
    assert not a["item_image_ok"][3] and not a["item_text_ok"][5] and not a["user_text_ok"][7]
    assert (a["item_image"][3] == 0).all() and a["item_image_ok"][4]


def test_ray_data_map_batches_gives_the_same_vectors(ray_session, tmp_path):
    texts = [f"stellar orbital station {i}" for i in range(10)]
    spec = text_encoder_spec("hash:16")
    local = encode(texts, spec, batch_size=4, use_ray=False)
    remote = encode(texts, spec, batch_size=4, use_ray=True)
    np.testing.assert_allclose(local, remote)


def test_descriptor_tells_topics_apart(tiny_mm_dataset):
    items = pd.read_parquet(tiny_mm_dataset / "items.parquet").head(40)
    vecs = DescriptorImageEncoder(32)([str(tiny_mm_dataset / p) for p in items["image_path"]])
    same = items["genres"].to_numpy()[:, None] == items["genres"].to_numpy()[None, :]
    sim = vecs @ vecs.T
    off = ~np.eye(len(items), dtype=bool)
    assert sim[same & off].mean() > sim[~same].mean() + 0.2


def test_offline_minilm_embeds_by_meaning():
    spec = text_encoder_spec("all-MiniLM-L6-v2")
    assert spec.kind == "minilm" and (__import__("pathlib").Path(spec.path) / "modules.json").is_file()
    v = encode(["starships, gravity and wormholes", "a space station near a comet", "kisses, flowers and a wedding"],
               spec, batch_size=8, use_ray=False)
    assert v.shape == (3, 384)
    assert v[0] @ v[1] > v[0] @ v[2]


def test_bad_text_model_is_a_config_error():
    with pytest.raises(ConfigError, match="not all-MiniLM-L6-v2 .* hash:DIM, or a local sentence-transformers folder"):
        text_encoder_spec("bert-base-uncased")
    with pytest.raises(ConfigError, match="hash needs a dimension"):
        text_encoder_spec("hash:x")


def test_cli_data_features(tiny_mm_dataset, tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({
        "data": {"path": str(tiny_mm_dataset), "prepare_if_missing": False},
        "model": {"name": "ur4rec", "features": {"text_model": "hash:32", "cache_dir": str(tmp_path / "c"),
                                                 "dir": str(tmp_path / "f")}}}))
    assert main(["data", "features", str(job), "--local"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["dims"]["item_text"] == 32 and printed["missing"]["item_image"] == 0
    assert (tmp_path / "f" / "features.json").is_file()
    assert main(["data", "features", str(job), "--local", "model.features.text_model=nope"]) == 2


def test_multimodal_movielens_layout_absolute_posters_and_broken_ones(tmp_path):
    from PIL import Image
    from test_sources_multimodal import write_layout

    from rayrec.config.schema import FilterConfig
    from rayrec.data.dataset import source_reader
    from rayrec.data.prepare import prepare

    folder = write_layout(tmp_path / "ml")  # posters 10 and 30 are 8-byte stubs, 20 has none
    Image.new("RGB", (16, 16), (200, 10, 10)).save(folder / "image" / "10.png")
    data = tmp_path / "prepared"
    prepare(source_reader("movielens-multimodal", folder, on_bad_line="error"), data, source="movielens-multimodal",
            params={}, filters=FilterConfig(min_seq_len=1), split="user_prefix")
    m = compute_features(FeaturesConfig(text_model="hash:16", cache_dir=tmp_path / "cache"), data, 2)
    assert m["missing"] == {"item_text": 0, "item_image": 2, "user_text": 2}  # no pref texts in MovieLens
    ok = load_feature_arrays(data / "features", num_items=3, num_users=2)["item_image_ok"]
    assert ok.tolist() == [False, True, False, False]  # item 1 = movie 10, the only readable poster


def test_image_descriptors_are_the_same_on_every_cpu(tmp_path):
    """numpy picks SIMD kernels by CPU (AVX-512, AVX2, baseline); the descriptor must not change with them
    (its float32 arctan2 did, and with it the joint model's pinned reference run)."""
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
    code = ("import sys, glob, numpy as np; from rayrec.data.features import DescriptorImageEncoder; "
            "np.save(sys.argv[2], DescriptorImageEncoder(32)(sorted(glob.glob(sys.argv[1] + '/*.png'))))")
    outs = []
    for disabled in ("", "X86_V4 AVX512_ICL AVX512_SPR", "X86_V3 X86_V4 AVX512_ICL AVX512_SPR"):
        out = tmp_path / f"d{len(outs)}.npy"
        env = {**__import__("os").environ, "NPY_DISABLE_CPU_FEATURES": disabled}
        subprocess.run([sys.executable, "-c", code, str(tmp_path), str(out)], env=env, check=True)
        outs.append(np.load(out))
    assert all(np.array_equal(outs[0], o) for o in outs[1:])
