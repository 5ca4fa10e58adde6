"""Requests to the LLM: one per user (taste summary) and one per item (description).

A user's request is built from the training sequence only (``train.parquet``), never from
valid/test rows, so no evaluation target leaks into the preference text. Each request
carries the chat messages (for the LLM) and the structured facts they were written
from (for the offline template).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

SYSTEM = ("You write short, specific recommendation profiles. Answer with plain text only: "
          "no lists, no headings, no preamble.")


@dataclass(frozen=True)
class Request:
    """One generation: ``kind`` user|item, the row index, chat messages, and the facts behind them."""

    kind: str
    idx: int
    messages: tuple[dict[str, str], ...]
    facts: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def prompt_text(self) -> str:
        return "\n".join(f"[{m['role']}] {m['content']}" for m in self.messages)

    def cache_payload(self) -> str:
        return json.dumps(self.messages, sort_keys=True)


def item_facts(items: pd.DataFrame) -> dict[int, dict[str, str]]:
    """item_idx -> title, genres ('|'-joined, may be empty) and text."""
    genres = items["genres"] if "genres" in items else pd.Series([""] * len(items), index=items.index)
    return {int(i): {"title": str(t), "genres": str(g or ""), "text": str(x or "")}
            for i, t, g, x in zip(items["item_idx"], items["title"], genres.fillna(""), items["text"].fillna(""), strict=True)}


def user_request(user_idx: int, train_seq: list[int], facts: dict[int, dict[str, str]], history_items: int) -> Request:
    """Taste summary from the user's most recent ``history_items`` training items."""
    recent = [int(i) for i in train_seq[-history_items:]]
    lines = [f"{n}. {facts[i]['title']}" + (f" ({facts[i]['genres']})" if facts[i]["genres"] else "")
             for n, i in enumerate(recent, start=1)]
    ask = ("A user interacted with these items, oldest first:\n" + "\n".join(lines) +
           "\n\nIn 2-3 sentences, describe this user's taste: the genres, themes and moods they "
           "prefer and what they would likely enjoy next.")
    return Request("user", user_idx, ({"role": "system", "content": SYSTEM}, {"role": "user", "content": ask}),
                   {"items": recent})


def item_request(item_idx: int, fact: dict[str, str]) -> Request:
    """A 2-3 sentence description from the item's title, genres and existing text."""
    parts = [f"Title: {fact['title']}"]
    if fact["genres"]:
        parts.append(f"Genres: {fact['genres'].replace('|', ', ')}")
    if fact["text"]:
        parts.append(f"Notes: {fact['text']}")
    ask = "\n".join(parts) + "\n\nWrite a 2-3 sentence description of this item for a recommender system."
    return Request("item", item_idx, ({"role": "system", "content": SYSTEM}, {"role": "user", "content": ask}),
                   {"item": item_idx})
