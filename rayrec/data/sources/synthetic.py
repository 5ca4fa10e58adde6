"""The embedded default dataset: a seeded, MovieLens-like world with real structure.

Nothing is downloaded. The generator builds a small "world" and samples users'
histories from it, so that every model in rayrec has something true to learn:

- items belong to latent topics (genres); popularity over items is Zipf-like;
- each topic has a Markov chain over its items: every item has a few strong
  "next" items in its topic, so the most recent item predicts the next one
  (what SASRec exploits);
- each user has a sparse mixture of 1-3 topics and mostly follows the chain of
  the current topic, switching topic with small probability according to the
  mixture (what the user-preference text describes);
- titles and descriptions are written from the topic's vocabulary and the
  optional PNG images take their palette and pattern from the topic, so the
  text and image experts carry signal about which items go together.

Two optional knobs make content matter beyond what item IDs learn (both off by default):

- ``styles=S`` splits each topic into a genre (``topic // S``, what the text tells) and a
  visual style (``topic % S``, what the image tells): text and image each carry half of
  the topic, so a model needs both; the preference text names genre and style;
- ``new_items=f`` marks a fraction of items as new releases: a walk can reach them only
  in its last ``new_window`` steps, where with probability P_NEW it picks a new item of
  one of the user's topics (drawn from the mixture, as the preference text states it, so
  not necessarily the current one). Under leave-one-out they are rare in training and
  common in validation and test: the cold-start case where IDs know little and content a lot.

Like MovieLens, a user never sees an item twice. The defaults give ML-100K
size (943 users, 1682 items); ``users=6040, items=3706, mean_len=165`` gives
ML-1M size (~1M events) in a few seconds, because sampling is vectorised over
users, one step of the walk at a time. The same arguments give the same data.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from rayrec.data.sources.base import RawData
from rayrec.errors import DataError

#: Strong successors per item, and how often a walk takes each of them.
N_SUCCESSORS = 3
SUCCESSOR_WEIGHTS = np.array([0.55, 0.30, 0.15])
#: Per step: probability to follow the chain (else jump within the topic by
#: popularity), and to switch topic (drawn from the user's mixture).
P_FOLLOW = 0.75
P_SWITCH = 0.08
ZIPF_EXPONENT = 0.9
#: Per step inside a walk's last ``new_window`` steps: probability to pick a new release.
P_NEW = 0.35
#: Style names for the preference text (``styles``), in the order of _topic_colors' hues.
STYLE_NAMES = "scarlet teal amber violet lime navy rose olive cyan ochre plum jade".split()
#: 2000-01-01, like ML-1M; users start uniformly over three years.
T0 = 946_684_800
START_SPAN_S = 3 * 365 * 86_400
#: Rating distribution before user/item/topic effects (ML-like, skewed high).
RATING_BASE = 3.55

#: name, adjectives, nouns, description words. Mostly disjoint between themes,
#: so that text alone tells the topics apart.
# fmt: off
THEMES: list[tuple[str, list[str], list[str], list[str]]] = [
    ("Noir", "shadowed rainy smoky crooked midnight bitter hushed neon grim velvet".split(),
     "Harbor Alley Detective Dame Precinct Saloon Wharf Informant Ledger Revolver".split(),
     "rain alibis confessions jazz cigarettes betrayal gangsters blackmail streetlights suspects".split()),
    ("Space", "stellar orbital cosmic distant silent frozen ionic lunar galactic quantum".split(),
     "Station Nebula Voyager Colony Comet Pilot Reactor Frontier Satellite Drift".split(),
     "starships gravity wormholes androids oxygen telescopes asteroids signals vacuum warp".split()),
    ("Romance", "tender golden secret sweet summer gentle blushing moonlit lovely wistful".split(),
     "Garden Letter Promise Wedding Sonnet Rose Waltz Bride Cottage Heart".split(),
     "kisses longing courtship flowers vows picnics love dances weddings letters".split()),
    ("Western", "dusty lonesome rugged scorched wild copper prairie rawhide sundown outlaw".split(),
     "Ranch Canyon Sheriff Mesa Stagecoach Gunslinger Corral Bounty Trail Saddle".split(),
     "cattle horses bandits gold duels whiskey deserts spurs posses railroads".split()),
    ("Horror", "haunted ghastly cursed rotten pale hollow wicked eerie feral bloody".split(),
     "Manor Crypt Witch Specter Asylum Ritual Cellar Doll Fog Graveyard".split(),
     "screams curses demons zombies candles shadows bones omens possession nightmares".split()),
    ("Comedy", "goofy silly cheeky zany wacky bumbling sunny clumsy merry jolly".split(),
     "Roommate Party Prank Vacation Mixup Office Neighbor Sitcom Banana Karaoke".split(),
     "jokes pranks laughter pies chaos slapstick hijinks pratfalls blunders giggles".split()),
    ("Fantasy", "enchanted ancient elven mythic crystal emerald runic gilded arcane sacred".split(),
     "Dragon Kingdom Sorcerer Quest Throne Sword Forest Wizard Realm Oracle".split(),
     "magic prophecies spells knights elves potions castles giants relics dungeons".split()),
    ("War", "valiant fallen steel iron armored trench frontline scarred loyal wartime".split(),
     "Battalion Bunker Sergeant Fleet Siege Front Medal Regiment Convoy Beachhead".split(),
     "artillery tanks soldiers trenches bombers victory sacrifice generals rations ceasefire".split()),
    ("Documentary", "factual true everyday rural urban untold vivid natural candid remote".split(),
     "Archive Portrait Journey Expedition Harvest Factory Island Village Ocean Witness".split(),
     "interviews footage history scientists wildlife farmers evidence archives communities climate".split()),
    ("Musical", "melodic jazzy rhythmic glittering bright dazzling lyrical brassy tuneful swinging".split(),
     "Chorus Ballroom Stage Melody Tenor Cabaret Overture Symphony Tap Encore".split(),
     "songs dancing rehearsals pianos trumpets ballads auditions spotlight harmonies choreography".split()),
    ("Thriller", "tense deadly covert ruthless cold rogue frantic lethal masked sinister".split(),
     "Heist Agent Cartel Vault Hostage Sniper Cipher Target Safehouse Dossier".split(),
     "spies conspiracy ransom bombs chases surveillance traitors hackers assassins codes".split()),
    ("Family", "cuddly tiny playful colorful fluffy curious little cheerful bouncy friendly".split(),
     "Puppy Toybox Bear Robot Penguin Kitten Treehouse Balloon Dino Bunny".split(),
     "friendship adventures toys cartoons snacks birthdays school parents animals bedtime".split()),
    ("Sports", "champion fast winning underdog athletic rookie varsity final racing undefeated".split(),
     "Stadium Coach Trophy League Pitcher Boxer Marathon Playoff Derby Goalkeeper".split(),
     "training rivals scoreboards sweat tournaments fans sprinting referees comebacks medals".split()),
    ("Historical", "royal imperial medieval victorian baroque feudal colonial regal dynastic ornate".split(),
     "Empire Duchess Monarch Cathedral Court Tapestry Crown Pharaoh Senate Dynasty".split(),
     "kings revolutions treaties palaces heirs scandals chronicles armies nobles parchment".split()),
    ("Mystery", "cryptic baffling locked foggy quiet peculiar obscure veiled riddled muffled".split(),
     "Clue Lighthouse Inspector Riddle Attic Locket Estate Diary Key Butler".split(),
     "secrets puzzles disappearances footprints inheritance whispers deductions riddles keys maps".split()),
    ("Drama", "heartfelt raw intimate restless fragile broken solemn tearful brooding weary".split(),
     "Family Reunion Funeral Winter Hospital Kitchen Verdict Inheritance Farewell Teacher".split(),
     "grief forgiveness siblings divorce memories illness ambition regret redemption loneliness".split()),
]
# fmt: on

FIRST_SENTENCES = [
    "The {a1} {n1} follows the {a2} {n2} through {w1}.",
    "In the {a1} {n1}, {w1} and {w2} shape the fate of the {n2}.",
    "A story of the {a1} {n1} and the {n2} of {w1}.",
    "When the {a1} {n1} meets the {a2} {n2}, expect {w1}.",
]
SECOND_SENTENCES = [
    "Expect {w1}, {w2} and the {a1} {n1}.",
    "Critics call it {a1}, full of {w1} and {w2}.",
    "Fans of {w1} will find the {n1} {a1}.",
    "It mixes {w1} with {w2} in a finale that feels {a1}.",
]


@dataclass
class _World:
    """The hidden structure: item topics, popularity and per-topic Markov chains."""

    topic_of: np.ndarray  # [items] int, topic of each item
    pop: np.ndarray  # [items] float, Zipf popularity (sums to 1)
    succ: np.ndarray  # [items, N_SUCCESSORS] int, strong next items within the topic
    order: np.ndarray  # [items] item indices grouped by topic
    cdf: np.ndarray  # [items] topic + within-topic popularity CDF, aligned with order
    start: np.ndarray  # [topics] where each topic begins in order
    size: np.ndarray  # [topics] items per topic
    new: np.ndarray  # [items] bool, new releases (reachable only at the end of a walk)
    new_order: np.ndarray  # [n_new] new items grouped by topic
    new_cdf: np.ndarray  # [n_new] per-topic popularity CDF of new items, aligned with new_order
    has_new: np.ndarray  # [topics] bool, the topic has at least one new item


def _check_params(users: int, items: int, topics: int, mean_len: float, min_len: int,
                  styles: int = 0, new_items: float = 0.0, new_window: int = 3) -> None:
    """Fail early with a message that says which value to change."""
    if styles < 0 or (styles and topics % styles):
        raise DataError(f"synthetic: styles ({styles}) must be 0 (off) or divide topics ({topics})")
    if styles > len(STYLE_NAMES):
        raise DataError(f"synthetic: styles ({styles}) must be at most {len(STYLE_NAMES)}")
    if not 0.0 <= new_items < 1.0:
        raise DataError(f"synthetic: new_items ({new_items}) is a fraction of items, in [0, 1)")
    if new_window < 1:
        raise DataError(f"synthetic: new_window ({new_window}) must be >= 1")
    if users < 1 or items < 2 or topics < 1:
        raise DataError(
            f"synthetic: need users >= 1, items >= 2, topics >= 1 (got {users}, {items}, {topics})"
        )
    if topics > items:
        raise DataError(
            f"synthetic: topics ({topics}) must not exceed items ({items}): each topic needs an item"
        )
    if not 1 <= min_len <= items:
        raise DataError(
            f"synthetic: min_len ({min_len}) must be between 1 and items ({items}); users never repeat items"
        )
    if mean_len < min_len:
        raise DataError(f"synthetic: mean_len ({mean_len}) must be >= min_len ({min_len})")


def _pseudo_theme(t: int) -> tuple[str, list[str], list[str], list[str]]:
    """Vocabulary made of pseudo-words for topics beyond the hand-written themes."""
    rng = np.random.default_rng([7, t])
    syl = "ka lo mi ru ten vor zel qua bri dun fae gor hil jun nox pel sar tro ulm wex".split()

    def words(n: int) -> list[str]:
        return ["".join(rng.choice(syl, size=rng.integers(2, 4))) for _ in range(n)]

    name = (syl[t % len(syl)] + syl[t // len(syl) % len(syl)]).capitalize()  # unique for t < 400
    return name, words(8), [w.capitalize() for w in words(8)], words(8)


def _themes(topics: int) -> list[tuple[str, list[str], list[str], list[str]]]:
    """One vocabulary per topic: hand-written themes first, pseudo-word ones after."""
    return [THEMES[t] if t < len(THEMES) else _pseudo_theme(t) for t in range(topics)]


def _successors(rng: np.random.Generator, members: np.ndarray, pop: np.ndarray) -> np.ndarray:
    """Pick N_SUCCESSORS distinct next items per item of one topic, favouring popular ones.

    Sampling without replacement by sqrt-popularity (so successors are not all the
    same few hits): Gumbel top-k for small topics, the first distinct of 8k draws
    for large ones (same distribution, O(m) instead of O(m^2)). Tiny topics repeat.
    """
    m = len(members)
    if m == 1:
        return np.repeat(members[:, None], N_SUCCESSORS, axis=1)
    k = min(N_SUCCESSORS, m - 1)
    logits = 0.5 * np.log(pop[members])
    top = np.empty((m, k), dtype=np.int64)
    todo = np.arange(m)
    if m > 512:
        top, ok = _first_distinct(rng, logits, k)
        todo = np.flatnonzero(~ok)
    if len(todo):
        keys = logits[None, :] + rng.gumbel(size=(len(todo), m))
        keys[np.arange(len(todo)), todo] = -np.inf  # never the item itself
        best = np.argpartition(-keys, k - 1, axis=1)[:, :k]
        top[todo] = np.take_along_axis(best, np.argsort(-np.take_along_axis(keys, best, 1), 1), 1)
    return members[top[:, np.arange(N_SUCCESSORS) % k]]


def _first_distinct(rng: np.random.Generator, logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row i of a topic: the first k distinct draws (by ``exp(logits)``) other than i.

    Returns ``(top [m, k], ok [m])``; rows with ``ok`` False found fewer than k.
    """
    m = len(logits)
    cdf = np.cumsum(np.exp(logits - logits.max()))
    draws = np.minimum(np.searchsorted(cdf, rng.random((m, 8 * k)) * cdf[-1]), m - 1)
    draws[draws == np.arange(m)[:, None]] = -1
    srt = np.argsort(draws, axis=1, kind="stable")  # equal values keep draw order
    sd = np.take_along_axis(draws, srt, 1)
    dup = np.zeros_like(sd, dtype=bool)
    dup[:, 1:] = sd[:, 1:] == sd[:, :-1]
    valid = np.empty_like(dup)
    np.put_along_axis(valid, srt, ~dup & (sd >= 0), 1)
    first = np.argsort(~valid, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(draws, first, 1), np.take_along_axis(valid, first, 1).all(1)


def _make_world(rng: np.random.Generator, items: int, topics: int, new_items: float = 0.0) -> _World:
    """Assign items to topics (balanced), draw Zipf popularity and the Markov chains,
    and mark ``new_items`` of them (a fraction) as new releases."""
    topic_of = rng.permutation(np.arange(items) % topics)
    pop = 1.0 / (rng.permutation(items) + 1.0) ** ZIPF_EXPONENT
    pop /= pop.sum()
    succ = np.empty((items, N_SUCCESSORS), dtype=np.int64)
    for t in range(topics):
        members = np.flatnonzero(topic_of == t)
        succ[members] = _successors(rng, members, pop)
    # Per-topic popularity CDFs laid end to end: topic t occupies (t, t + 1], so
    # one searchsorted of ``topic + u`` samples within any topic (see _in_topic).
    order = np.argsort(topic_of, kind="stable")
    cdf = np.cumsum(pop[order] / np.bincount(topic_of, weights=pop, minlength=topics)[topic_of[order]])
    ends = np.r_[np.flatnonzero(np.diff(topic_of[order])), items - 1]
    cdf[ends] = np.arange(topics) + 1.0
    size = np.bincount(topic_of, minlength=topics)
    new = np.zeros(items, dtype=bool)
    if new_items > 0:  # no draw otherwise: the default world stays as it was
        new[rng.choice(items, size=int(round(new_items * items)), replace=False)] = True
    new_order, new_cdf, has_new = _subset_sampler(topic_of, pop, new, topics)
    return _World(topic_of, pop, succ, order, cdf, np.r_[0, np.cumsum(size)[:-1]], size,
                  new, new_order, new_cdf, has_new)


def _subset_sampler(topic_of: np.ndarray, pop: np.ndarray, mask: np.ndarray,
                    topics: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Popularity sampling within a topic among the items in ``mask``.

    Returns ``(order, cdf, has)``: the masked items grouped by topic, and a CDF in which
    topic t's items occupy (t, t + 1]; ``has[t]`` says whether topic t has any.
    """
    order = np.flatnonzero(mask)
    order = order[np.argsort(topic_of[order], kind="stable")]
    has = np.bincount(topic_of[order], minlength=topics) > 0
    if not len(order):
        return order, np.zeros(0), has
    t, w = topic_of[order], pop[order]
    first = np.r_[0, np.flatnonzero(np.diff(t)) + 1]
    runs = np.diff(np.r_[first, len(t)])
    cum = np.cumsum(w)
    before = np.repeat(cum[first] - w[first], runs)
    cdf = t + (cum - before) / np.bincount(t, weights=w, minlength=topics)[t]
    cdf[first + runs - 1] = t[first] + 1.0
    return order, cdf, has


def _new_in_topic(rng: np.random.Generator, world: _World, topic: np.ndarray) -> np.ndarray:
    """One new release per entry of ``topic`` (each must have some), by popularity."""
    return _draw_in_topic(rng, world.new_order, world.new_cdf, topic)


def _in_topic(rng: np.random.Generator, world: _World, topic: np.ndarray) -> np.ndarray:
    """One item per entry of ``topic``, drawn by popularity within that topic."""
    return _draw_in_topic(rng, world.order, world.cdf, topic)


def _draw_in_topic(rng: np.random.Generator, order: np.ndarray, cdf: np.ndarray, topic: np.ndarray) -> np.ndarray:
    """One item of ``order`` per entry of ``topic``, from a CDF in which topic t occupies (t, t + 1]."""
    u = np.clip(rng.random(len(topic)), 1e-12, 1.0 - 1e-12)
    pos = np.searchsorted(cdf, topic + u, side="left")
    return order[np.minimum(pos, len(order) - 1)]


def _user_mixtures(rng: np.random.Generator, users: int, topics: int) -> tuple[np.ndarray, np.ndarray]:
    """Sparse topic mixtures: 1-3 distinct topics per user with Dirichlet weights.

    Topics themselves have Zipf-ish popularity (some genres are mainstream).
    Returns ``(topics [users, 3], weights [users, 3])``, weights sorted descending,
    zero for unused slots.
    """
    topic_pop = 1.0 / (rng.permutation(topics) + 1.0) ** 0.7
    keys = np.log(topic_pop)[None, :] + rng.gumbel(size=(users, topics))
    chosen = np.argsort(-keys, axis=1)[:, :3]
    if topics < 3:
        chosen = chosen[:, np.arange(3) % topics]
    n_topics = np.minimum(rng.choice([1, 2, 3], size=users, p=[0.3, 0.45, 0.25]), topics)
    w = rng.gamma(1.5, size=(users, 3)) * (np.arange(3)[None, :] < n_topics[:, None])
    srt = np.argsort(-w, axis=1)
    w = np.take_along_axis(w, srt, 1)
    return np.take_along_axis(chosen, srt, 1), w / w.sum(1, keepdims=True)


def _uniform_in_topic(rng: np.random.Generator, world: _World, topic: np.ndarray) -> np.ndarray:
    """One item per entry of ``topic``, uniformly within that topic."""
    return world.order[world.start[topic] + (rng.random(len(topic)) * world.size[topic]).astype(np.int64)]


def _pick_topic(rng: np.random.Generator, mix_t: np.ndarray, mix_w: np.ndarray) -> np.ndarray:
    """One topic per row, drawn from that row's mixture."""
    slot = (rng.random(len(mix_w))[:, None] > np.cumsum(mix_w, 1)).sum(1)
    return mix_t[np.arange(len(mix_t)), np.minimum(slot, 2)]


def _lengths(rng: np.random.Generator, users: int, items: int, mean_len: float, min_len: int) -> np.ndarray:
    """Lognormal sequence lengths with mean ~``mean_len``, at least ``min_len``, at most ``items``."""
    extra = max(mean_len - min_len, 1e-9)
    sigma = 0.9
    raw = rng.lognormal(np.log(extra) - sigma**2 / 2, sigma, size=users)
    return np.clip(np.round(min_len + raw), min_len, items).astype(np.int64)


def _propose(rng, world: _World, t: int, prev, topic, mix_t, mix_w) -> tuple[np.ndarray, np.ndarray]:
    """Next item per active user, before the no-repeat rule.

    At step 0 an item of the starting topic by popularity; later, switch topic with
    P_SWITCH (from the mixture, then a popular item of it), else follow one of the
    previous item's strong successors with P_FOLLOW, else jump within the topic.
    ``topic`` is updated in place. Returns ``(candidates, followed)``.
    """
    n = len(prev)
    if t == 0:
        return _in_topic(rng, world, topic), np.zeros(n, dtype=bool)
    switch = rng.random(n) < P_SWITCH
    topic[switch] = _pick_topic(rng, mix_t[switch], mix_w[switch])
    follow = ~switch & (rng.random(n) < P_FOLLOW)
    slot = np.searchsorted(np.cumsum(SUCCESSOR_WEIGHTS), rng.random(n), side="right")
    chained = world.succ[prev, np.minimum(slot, N_SUCCESSORS - 1)]
    return np.where(follow, chained, _in_topic(rng, world, topic)), follow


def _avoid_repeats(rng, world: _World, seen, users, prev, cand, follow, topic) -> np.ndarray:
    """Replace proposals the user has already seen (``seen[users[j]]`` is row j's history).

    In order: the previous item's other successors (keeps the chain strong), a few
    popularity then uniform draws within the topic, then (the user has exhausted
    most of the topic) uniform draws over the catalog, and a last exhaustive pick.
    """
    bad = seen[users, cand]
    for k in range(N_SUCCESSORS):
        idx = np.flatnonzero(bad & follow)
        alt = world.succ[prev[idx], k]
        ok = ~seen[users[idx], alt]
        cand[idx[ok]], bad[idx[ok]] = alt[ok], False
    for draw in (_in_topic,) * 3 + (_uniform_in_topic,) * 3:
        idx = np.flatnonzero(bad)
        alt = draw(rng, world, topic[idx])
        ok = ~seen[users[idx], alt]
        cand[idx[ok]], bad[idx[ok]] = alt[ok], False
    for _ in range(4):
        idx = np.flatnonzero(bad)
        alt = rng.integers(0, seen.shape[1], size=len(idx))
        ok = ~seen[users[idx], alt]
        cand[idx[ok]], bad[idx[ok]] = alt[ok], False
    idx = np.flatnonzero(bad)
    if len(idx):
        keys = rng.random((len(idx), seen.shape[1]))
        keys[seen[users[idx]]] = -1.0
        cand[idx] = keys.argmax(1)
    return cand


def _walk_chunk(rng, world: _World, mix_t, mix_w, lengths, offsets, out, new_window: int = 3) -> None:
    """Walk one chunk of users step by step, vectorised over the users still active.

    Writes each user's item indices to ``out[offsets[u] : offsets[u] + lengths[u]]``.
    New releases count as seen (unreachable) until a walk's last ``new_window`` steps.
    """
    seen = np.zeros((len(lengths), len(world.pop)), dtype=bool)  # [users, items]
    new_idx = np.flatnonzero(world.new)
    seen[:, new_idx] = True
    topic = _pick_topic(rng, mix_t, mix_w)
    cur = np.zeros(len(lengths), dtype=np.int64)
    for t in range(int(lengths.max())):
        act = np.flatnonzero(lengths > t)
        tp = topic[act]
        cand, follow = _propose(rng, world, t, cur[act], tp, mix_t[act], mix_w[act])
        if len(new_idx):
            left = lengths[act] - t  # steps left, this one included
            opening = (left == new_window) | ((t == 0) & (left < new_window))  # short walks start inside it
            seen[np.ix_(act[opening], new_idx)] = False
            # a new release comes from the user's taste (the mixture the preference text
            # names), not necessarily the current topic; the walk then goes on in its topic
            pick = np.flatnonzero((left <= new_window) & (rng.random(len(act)) < P_NEW))
            fav = _pick_topic(rng, mix_t[act[pick]], mix_w[act[pick]])
            pick, fav = pick[world.has_new[fav]], fav[world.has_new[fav]]
            tp[pick] = fav
            cand[pick], follow[pick] = _new_in_topic(rng, world, fav), False
        nxt = _avoid_repeats(rng, world, seen, act, cur[act], cand, follow, tp)
        topic[act], cur[act] = tp, nxt
        seen[act, nxt] = True
        out[offsets[act] + t] = nxt


def _walk(rng, world: _World, mix_t, mix_w, lengths, new_window: int = 3) -> np.ndarray:
    """All users' item sequences, flat and user-major: [sum(lengths)] item indices.

    Users go in chunks so that the seen-matrix stays under ~32 MB at any size.
    """
    offsets = np.r_[0, np.cumsum(lengths)[:-1]]
    out = np.empty(int(lengths.sum()), dtype=np.int64)
    chunk = max(1, 2**25 // len(world.pop))
    for lo in range(0, len(lengths), chunk):
        sl = slice(lo, lo + chunk)
        _walk_chunk(rng, world, mix_t[sl], mix_w[sl], lengths[sl], offsets[sl], out, new_window)
    return out


def _timestamps(rng: np.random.Generator, lengths: np.ndarray) -> np.ndarray:
    """Int64 seconds, strictly increasing per user. Users start uniformly over three
    years and keep their own pace (median gap ~6 h, heavy-tailed, spans of weeks to
    years), so activity interleaves and a global time cut splits some histories."""
    offsets = np.r_[0, np.cumsum(lengths)[:-1]]
    pace = np.repeat(rng.lognormal(np.log(6 * 3600.0), 1.0, size=len(lengths)), lengths)
    gaps = 1 + np.floor(pace * rng.lognormal(0.0, 1.5, size=int(lengths.sum()))).astype(np.int64)
    gaps[offsets] = 0
    cum = np.cumsum(gaps)
    starts = T0 + rng.integers(0, START_SPAN_S, size=len(lengths))
    return np.repeat(starts - cum[offsets], lengths) + cum


def _ratings(rng: np.random.Generator, world: _World, user_idx, item_idx, mix_t) -> np.ndarray:
    """Ratings 1-5 skewed high (mean ~3.6, like MovieLens): item quality, user
    leniency, and a bonus when the item is of the user's main topic."""
    quality = rng.normal(0.0, 0.55, size=len(world.pop))
    leniency = rng.normal(0.0, 0.35, size=len(mix_t))
    fav = world.topic_of[item_idx] == mix_t[user_idx, 0]
    latent = RATING_BASE + quality[item_idx] + leniency[user_idx] + 0.3 * fav
    latent += rng.normal(0.0, 1.0, size=len(item_idx))
    return np.clip(np.rint(latent), 1, 5).astype(np.float64)


def _pick(options: list, f: float):
    """The element of ``options`` at fraction ``f`` in [0, 1): a draw from a uniform number."""
    return options[int(f * len(options))]


def _other(options: list, chosen, f: float):
    """An element of ``options`` other than ``chosen`` (when there is one), at fraction ``f``."""
    return options[(options.index(chosen) + 1 + int(f * (len(options) - 1))) % len(options)]


def _item_table(rng: np.random.Generator, themes, topic_of: np.ndarray) -> pd.DataFrame:
    """Titles like "Crimson Harbor 17" and two-sentence descriptions from the topic's words.

    One description word in ~15 % of items comes from another topic, so the text
    signal is strong but not a perfect label.
    """
    u = rng.random((len(topic_of), 11))
    titles, texts = [], []
    for i, t in enumerate(topic_of):
        _, adj, nouns, words = themes[t]
        a1, n1, w1 = _pick(adj, u[i, 0]), _pick(nouns, u[i, 1]), _pick(words, u[i, 2])
        a2, n2, w2 = _other(adj, a1, u[i, 3]), _other(nouns, n1, u[i, 4]), _other(words, w1, u[i, 5])
        if u[i, 6] < 0.15:
            w2 = _pick(_pick(themes, u[i, 7])[3], u[i, 8])
        fill = dict(a1=a1, a2=a2, n1=n1.lower(), n2=n2.lower(), w1=w1, w2=w2)
        first = _pick(FIRST_SENTENCES, u[i, 9]).format(**fill)
        second = _pick(SECOND_SENTENCES, u[i, 10]).format(**fill)
        titles.append(f"{a1.capitalize()} {n1} {i + 1}")
        texts.append(f"{first} {second[0].upper()}{second[1:]}")
    genres = [themes[t][0] for t in topic_of]
    return pd.DataFrame({"item": _ids(len(topic_of)), "title": titles, "text": texts, "genres": genres})


def _user_table(rng: np.random.Generator, themes, mix_t: np.ndarray, mix_w: np.ndarray, styles: int = 0) -> pd.DataFrame:
    """One sentence per user naming their topics by weight, with two words of the main one.

    With ``styles``, a topic is named by its genre and its look ("noir with a teal look").
    """
    openers = ["Mostly into", "A big fan of", "Loves"]
    genre = (lambda t: t // styles) if styles else (lambda t: t)

    def label(t: int) -> str:
        name = themes[genre(t)][0].lower()
        look = STYLE_NAMES[t % styles] if styles else ""
        return f"{name} with {'an' if look[:1] in 'aeiou' else 'a'} {look} look" if styles else name

    u = rng.random((len(mix_t), 3))
    prefs = []
    for i in range(len(mix_t)):
        names = [label(t) for t, w in zip(mix_t[i], mix_w[i], strict=True) if w > 0]
        words = themes[genre(mix_t[i, 0])][3]
        w1 = _pick(words, u[i, 1])
        text = f"{_pick(openers, u[i, 0])} {names[0]} ({w1}, {_other(words, w1, u[i, 2])})"
        if len(names) > 1:
            text += f", also {names[1]}"
        if len(names) > 2:
            text += f" and a little {names[2]}"
        prefs.append(text + ".")
    return pd.DataFrame({"user": _ids(len(mix_t)), "pref_text": prefs})


def _topic_colors(topics: int) -> np.ndarray:
    """Two RGB colours per topic, hues spread by the golden ratio: [topics, 2, 3] in 0..255."""
    out = np.empty((topics, 2, 3))
    for t in range(topics):
        hue = (t * 0.618034) % 1.0
        out[t, 0] = colorsys.hsv_to_rgb(hue, 0.75, 0.95)
        out[t, 1] = colorsys.hsv_to_rgb((hue + 0.08) % 1.0, 0.6, 0.35)
    return out * 255.0


def _write_images(rng: np.random.Generator, image_dir: Path, topic_of: np.ndarray, size: int) -> list[str]:
    """Write ``<item>.png`` per item: the topic (or the look, with styles) fixes palette,
    stripe direction and frequency; each item adds its own phase, brightness and pixel noise.

    Returns paths relative to the dataset dir (``image_dir``'s parent).
    """
    from PIL import Image

    image_dir.mkdir(parents=True, exist_ok=True)
    colors = _topic_colors(int(topic_of.max()) + 1)
    yy, xx = np.mgrid[0:size, 0:size] / size
    coords = [xx, yy, xx + yy, None]  # vertical, horizontal, diagonal stripes, checker
    paths = []
    for i, t in enumerate(topic_of):
        freq, phase = 2 + (t // 4) % 3, rng.random()
        if t % 4 == 3:
            mask = (np.sin(2 * np.pi * (freq * xx + phase)) * np.sin(2 * np.pi * freq * yy)) > 0
        else:
            mask = np.sin(2 * np.pi * (freq * coords[t % 4] + phase)) > 0
        img = np.where(mask[..., None], colors[t, 0], colors[t, 1])
        img = img * rng.uniform(0.9, 1.1) + rng.normal(0.0, 6.0, size=img.shape)
        name = f"{i + 1}.png"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(image_dir / name)
        paths.append(f"{image_dir.name}/{name}")
    return paths


def _ids(n: int) -> np.ndarray:
    """Source ids "1".."n" as an object array, so ``_ids(n)[idx]`` maps indices to ids."""
    return np.array([str(i) for i in range(1, n + 1)], dtype=object)


def generate_synthetic(
    *,
    users: int = 943,
    items: int = 1682,
    topics: int = 12,
    mean_len: float = 60,
    min_len: int = 8,
    seed: int = 0,
    styles: int = 0,
    new_items: float = 0.0,
    new_window: int = 3,
    image_dir: Path | None = None,
    image_size: int = 32,
) -> RawData:
    """Generate the embedded dataset (see the module docstring for its structure).

    ``image_dir`` (normally ``<dataset_dir>/images``) gets one PNG per item and the
    item table an ``image_path`` relative to the dataset dir. Four independent
    random streams (world, walks, text, images) keep e.g. the interactions
    identical whether or not images are written. Ids are "1".."N". ``styles``,
    ``new_items`` and ``new_window``: see the module docstring (0 = off).
    """
    _check_params(users, items, topics, mean_len, min_len, styles, new_items, new_window)
    world_rng, walk_rng, text_rng, image_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)
    )
    world = _make_world(world_rng, items, topics, new_items)
    mix_t, mix_w = _user_mixtures(walk_rng, users, topics)
    lengths = _lengths(walk_rng, users, items - int(world.new.sum()), mean_len, min_len)
    seq = _walk(walk_rng, world, mix_t, mix_w, lengths, new_window)
    user_idx = np.repeat(np.arange(users), lengths)
    interactions = pd.DataFrame(
        {
            "user": _ids(users)[user_idx],
            "item": _ids(items)[seq],
            "timestamp": _timestamps(walk_rng, lengths),
            "rating": _ratings(walk_rng, world, user_idx, seq, mix_t),
        }
    )
    # with styles, text tells the genre and the image the look: each half of the topic
    themes = _themes(topics // styles if styles else topics)
    item_table = _item_table(text_rng, themes, world.topic_of // styles if styles else world.topic_of)
    if image_dir is not None:
        looks = world.topic_of % styles if styles else world.topic_of
        item_table["image_path"] = _write_images(image_rng, Path(image_dir), looks, image_size)
    users_table = _user_table(text_rng, themes, mix_t, mix_w, styles)
    return RawData(interactions=interactions, items=item_table, users=users_table)
