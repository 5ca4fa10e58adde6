"""The embedded synthetic dataset: determinism, sizes, and that its structure is real."""

from __future__ import annotations

import re
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from rayrec.data.sources.synthetic import FIRST_SENTENCES, SECOND_SENTENCES, generate_synthetic
from rayrec.errors import DataError

SMALL = dict(users=60, items=120, topics=6, mean_len=20, min_len=5)


@pytest.fixture(scope="module")
def default():
    """The default (ML-100K-like) dataset, generated once for this module."""
    return generate_synthetic()


def test_same_seed_same_data_other_seed_other_data():
    a, b, c = generate_synthetic(**SMALL), generate_synthetic(**SMALL), generate_synthetic(**SMALL, seed=1)
    pd.testing.assert_frame_equal(a.interactions, b.interactions)
    pd.testing.assert_frame_equal(a.items, b.items)
    pd.testing.assert_frame_equal(a.users, b.users)
    assert not a.interactions["item"].equals(c.interactions["item"])


def test_default_is_ml100k_like(default):
    inter, items, users = default.interactions, default.items, default.users
    assert list(inter.columns) == ["user", "item", "timestamp", "rating"]
    assert inter["timestamp"].dtype == np.int64 and inter["rating"].dtype == np.float64
    assert inter["user"].nunique() == 943 and len(items) == 1682 and len(users) == 943
    assert set(items["item"]) == {str(i) for i in range(1, 1683)}
    assert set(inter["item"]) <= set(items["item"])
    assert 0.8 * 943 * 60 < len(inter) < 1.2 * 943 * 60
    assert inter.groupby("user").size().min() >= 8
    assert not inter.duplicated(["user", "item"]).any()  # like MovieLens: no repeats
    assert set(inter["rating"].unique()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert 3.3 < inter["rating"].mean() < 3.9 and inter["rating"].mode()[0] == 4.0
    assert items["genres"].nunique() == 12 and "image_path" not in items


def test_timestamps_increase_per_user_and_users_interleave(default):
    inter = default.interactions
    assert (inter.groupby("user")["timestamp"].diff().dropna() > 0).all()
    spans = inter.groupby("user")["timestamp"].agg(["min", "max"])
    cut = inter["timestamp"].quantile(0.8)  # a global temporal cut, as in MiniOneRec
    assert (spans["max"] < cut).mean() > 0.5  # most users entirely before it ...
    assert (spans["min"] > cut).mean() > 0.1  # ... many entirely after it ...
    assert ((spans["min"] < cut) & (spans["max"] > cut)).sum() > 30  # ... and some across it


def test_markov_chain_is_learnable(default):
    """The most frequent successor of an item takes far more than its chance share."""
    inter = default.interactions
    pairs = pd.DataFrame({"a": inter["item"], "b": inter.groupby("user")["item"].shift(-1)}).dropna()
    counts = pairs.groupby(["a", "b"]).size()
    top, total = counts.groupby(level=0).max(), counts.groupby(level=0).sum()
    busy = total >= 20
    top_share = top[busy].sum() / total[busy].sum()
    chance = inter["item"].value_counts(normalize=True).iloc[0]  # even the most popular item
    assert top_share > 0.25 and top_share > 20 * chance
    genre = default.items.set_index("item")["genres"]
    assert (genre[pairs["a"]].to_numpy() == genre[pairs["b"]].to_numpy()).mean() > 0.8


#: Words of the sentence templates, shared by every topic.
TEMPLATE_WORDS = set(re.findall(r"[a-z]+", " ".join(FIRST_SENTENCES + SECOND_SENTENCES).lower()))


def _words(text: str) -> set[str]:
    """Content words of a title or text (template words and numbers left out)."""
    return set(re.findall(r"[a-z]+", text.lower())) - TEMPLATE_WORDS


def test_titles_and_texts_carry_topic_signal(default):
    items = default.items.head(300)
    assert items["title"].str.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]+ \d+").all()  # "Crimson Harbor 17"
    assert items["text"].str.count(r"\.").eq(2).all()
    bags = [_words(t + " " + d) for t, d in zip(items["title"], items["text"], strict=True)]
    genres = items["genres"].to_numpy()
    same, other = [], []
    for i in range(len(bags)):
        for j in range(i + 1, len(bags)):
            jac = len(bags[i] & bags[j]) / len(bags[i] | bags[j])
            (same if genres[i] == genres[j] else other).append(jac)
    assert np.mean(same) > 10 * np.mean(other)
    assert items["text"].nunique() > 0.95 * len(items)


def test_pref_text_names_the_users_main_topic(default):
    inter = default.interactions.merge(default.items[["item", "genres"]], on="item")
    main = inter.groupby("user")["genres"].agg(lambda g: g.value_counts().index[0])
    prefs = default.users.set_index("user")["pref_text"]
    named = [g.lower() in prefs[u] for u, g in main.items()]
    assert np.mean(named) > 0.9


def test_images_exist_and_differ_by_topic(tmp_path):
    raw = generate_synthetic(**SMALL, image_dir=tmp_path / "images", image_size=16)
    items = raw.items
    assert (items["image_path"] == "images/" + items["item"] + ".png").all()
    pixels = np.stack([np.asarray(Image.open(tmp_path / p)) for p in items["image_path"]]).astype(float)
    assert pixels.shape == (120, 16, 16, 3)
    mean_rgb = pixels.mean(axis=(1, 2))
    genres = items["genres"].to_numpy()
    centroids = {g: mean_rgb[genres == g].mean(0) for g in set(genres)}
    nearest = [min(centroids, key=lambda g: np.abs(m - centroids[g]).sum()) for m in mean_rgb]
    assert np.mean(np.array(nearest) == genres) > 0.95
    assert len({p.tobytes() for p in pixels}) == 120  # per-item noise: no two alike
    # Images use their own random stream: the rest of the data does not change.
    pd.testing.assert_frame_equal(raw.interactions, generate_synthetic(**SMALL).interactions)


def test_more_topics_than_themes_and_tiny_worlds():
    raw = generate_synthetic(users=20, items=80, topics=20, mean_len=10, min_len=3)
    assert raw.items["genres"].nunique() == 20
    tiny = generate_synthetic(users=5, items=4, topics=3, mean_len=4, min_len=4)
    assert (tiny.interactions.groupby("user").size() == 4).all()  # every item once per user


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(items=5, topics=6), "topics"),
        (dict(items=10, min_len=11), "min_len"),
        (dict(mean_len=3), "mean_len"),
    ],
)
def test_bad_parameters_say_what_to_fix(bad, message):
    with pytest.raises(DataError, match=message):
        generate_synthetic(**{**SMALL, **bad})


def test_ml1m_size_is_fast():
    start = time.perf_counter()
    raw = generate_synthetic(users=6040, items=3706, mean_len=165, min_len=20)
    elapsed = time.perf_counter() - start
    assert 0.9e6 < len(raw.interactions) < 1.1e6
    assert elapsed < 30, f"ML-1M size took {elapsed:.1f} s"
