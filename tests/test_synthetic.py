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


def _world(seed: int = 0, **kw):
    """The hidden world of ``generate_synthetic(seed=seed, items=.., topics=.., new_items=..)``."""
    from rayrec.data.sources.synthetic import _make_world

    world_rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(4)[0])
    return _make_world(world_rng, kw["items"], kw["topics"], kw.get("new_items", 0.0))


STYLED = dict(users=200, items=240, topics=6, styles=3, mean_len=20, min_len=5)


def test_styles_split_each_topic_into_a_text_genre_and_an_image_look(tmp_path):
    raw = generate_synthetic(**STYLED, image_dir=tmp_path / "images", image_size=16)
    topic = _world(**STYLED).topic_of
    genre, look = topic // 3, topic % 3
    items = raw.items
    assert items["genres"].nunique() == 2
    assert (items.groupby("genres").size() > 100).all()
    # text tells the genre and nothing of the look: same words within a genre whatever the look
    bags = [_words(t) for t in items["text"]]
    vocab = {g: set().union(*(b for b, gg in zip(bags, genre, strict=True) if gg == g)) for g in range(2)}
    assert len(vocab[0] & vocab[1]) < 0.3 * min(len(vocab[0]), len(vocab[1]))  # off-topic words only
    # the image tells the look and nothing of the genre
    rgb = np.stack([np.asarray(Image.open(tmp_path / p)).reshape(-1, 3).mean(0) for p in items["image_path"]])
    by_look = np.array([rgb[look == s].mean(0) for s in range(3)])
    nearest = np.abs(rgb[:, None, :] - by_look[None]).sum(-1).argmin(1)
    assert (nearest == look).mean() > 0.95
    same_look_other_genre = np.abs(rgb[(look == 0) & (genre == 0)].mean(0) - rgb[(look == 0) & (genre == 1)].mean(0)).sum()
    assert same_look_other_genre < 0.2 * np.abs(by_look[0] - by_look[1]).sum()
    # preferences name the look of the user's topics
    assert raw.users["pref_text"].str.contains(r"with an? (?:scarlet|teal|amber) look").all()
    # walks stay within a topic (genre and look together), not just a genre
    inter = raw.interactions
    idx = inter["item"].astype(int).to_numpy() - 1
    nxt = inter.groupby("user")["item"].shift(-1)
    ok = nxt.notna().to_numpy()
    a, b = idx[ok], nxt[ok].astype(int).to_numpy() - 1
    assert (topic[a] == topic[b]).mean() > 0.8


NEW = dict(users=300, items=200, topics=4, mean_len=20, min_len=5, new_items=0.2, new_window=3)


def test_new_items_appear_only_in_the_last_steps_of_a_walk():
    raw = generate_synthetic(**NEW)
    world = _world(**NEW)
    new = {str(i + 1) for i in np.flatnonzero(world.new)}
    assert len(new) == 40
    inter = raw.interactions
    from_end = inter.groupby("user").cumcount(ascending=False).to_numpy()
    is_new = inter["item"].isin(new).to_numpy()
    assert not is_new[from_end >= 3].any()  # released only for the last new_window steps
    assert is_new[from_end == 0].mean() > 0.3  # and common there: the cold-start targets
    assert not inter.duplicated(["user", "item"]).any()
    # a new release is of one of the user's topics, as the preference text names them
    last = inter[(from_end == 0) & is_new].merge(raw.items[["item", "genres"]], on="item")
    prefs = raw.users.set_index("user")["pref_text"]
    named = [g.lower() in prefs[u] for u, g in zip(last["user"], last["genres"], strict=True)]
    assert np.mean(named) > 0.95
    # the knobs off: the default world, draw for draw
    off = generate_synthetic(**{**NEW, "new_items": 0.0})
    pd.testing.assert_frame_equal(off.items, raw.items)
    assert not off.interactions.equals(raw.interactions)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(topics=6, styles=4), "styles"),
        (dict(new_items=1.0), "new_items"),
        (dict(new_window=0), "new_window"),
    ],
)
def test_bad_knobs_say_what_to_fix(bad, message):
    with pytest.raises(DataError, match=message):
        generate_synthetic(**{**SMALL, **bad})
