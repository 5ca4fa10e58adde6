"""Prompt datasets: Alpaca-style (instruction, input) -> response examples over semantic IDs.

Six tasks, mixed by config weight (expected copies of each example; 0 turns a task off):

- ``sid_seq``            SID history -> next item's SID (the recommendation task itself);
- ``title_seq``          title history -> next item's SID (language -> SID grounding);
- ``sid_to_title``       an item's SID -> its title   (alignment, SID to language);
- ``title_to_sid``       an item's title -> its SID   (alignment, language to SID);
- ``sid_seq_to_title``   SID history -> next item's title (MiniOneRec's fusion task);
- ``title_seq_to_title`` title history -> next item's title (recommendation in language only).

Training examples come from the prepared dataset's **train split only** (every prefix
of each user's train sequence; alignment over the items seen in train), so nothing of
valid/test leaks in. Valid/test prompts are ``sid_seq`` rows built by the same template
function with the first (fixed) instruction. The response is kept apart from the prompt
(TRL's prompt-completion format), so the loss covers the response tokens only.

``fit_lengths`` makes every example fit ``model.max_length`` tokens by dropping the oldest
history items (never the instruction, the latest item, or the answer and its EOS), and
counts what it cut and what it had to drop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from rayrec.data.dataset import Prepared
from rayrec.errors import DataError
from rayrec.genrec.semantic_ids import TOKEN_RE

ALPACA = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

#: Instruction paraphrases per task; the first one is used for evaluation prompts.
INSTRUCTIONS: dict[str, list[str]] = {
    "sid_seq": [
        "Given the items the user interacted with, in chronological order, predict the next item.",
        "Based on the user's interaction history below, recommend the item the user will interact with next.",
        "Here is a user's sequence of items. Which item comes next?",
    ],
    "title_seq": [
        "Given the titles of the items the user interacted with, in chronological order, predict the next item.",
        "The user enjoyed the items titled below, in this order. Recommend the next item.",
    ],
    "sid_to_title": [
        "Give the title of the item with the semantic ID below.",
        "Which title belongs to this item identifier?",
    ],
    "title_to_sid": [
        "Give the semantic ID of the item with the title below.",
        "Which item identifier belongs to this title?",
    ],
    "sid_seq_to_title": [
        "Given the items the user interacted with, in chronological order, give the title of the next item.",
        "The user interacted with the items below, in this order. What is the title of the item that comes next?",
    ],
    "title_seq_to_title": [
        "Given the titles of the items the user interacted with, in chronological order, give the title of the "
        "next item.",
        "The user enjoyed the items titled below, in this order. Name the title of the next item.",
    ],
}

#: History tasks: how the history is shown and what the answer is.
HISTORY_BY = {"sid_seq": "sid", "title_seq": "title", "sid_seq_to_title": "sid", "title_seq_to_title": "title"}
ANSWER_BY = {"sid_seq": "sid", "title_seq": "sid", "sid_seq_to_title": "title", "title_seq_to_title": "title"}

COLUMNS = ["task", "prompt", "completion", "user_idx", "target", "history", "instruction", "pos"]


def render(instruction: str, input_text: str) -> str:
    """The Alpaca prompt, ending where the response starts."""
    return ALPACA.format(instruction=instruction, input=input_text)


def sid_text(sids: dict[int, tuple[str, ...]], item: int) -> str:
    return "".join(sids[item])


def history_input(history: list[int], sids: dict[int, tuple[str, ...]], titles: dict[int, str], by: str) -> str:
    """The prompt input listing a history, by SID (``sid``) or by title (``title``)."""
    if by == "sid":
        return "The user interacted with: " + ", ".join(sid_text(sids, i) for i in history)
    return "The user interacted with: " + ", ".join(f'"{titles[i]}"' for i in history)


def seq_example(task: str, history: list[int], target: int | None, user: int, sids, titles, instruction: str,
                pos: int = -1) -> dict:
    """One history -> next-item example (the four ``HISTORY_BY`` tasks); the answer is the next
    item's SID or title, never shown in the prompt (only the history items are). ``pos``: the
    target's index in the user's train sequence (train prompts; -1 for valid/test rows), so a
    reward can read the whole history before it, not only the prompt's. ``target=None``: a
    history whose next item is not known (``rayrec recommend``): no answer, target -1."""
    answer = "" if target is None else sid_text(sids, target) if ANSWER_BY[task] == "sid" else titles[target]
    return {"task": task, "prompt": render(instruction, history_input(history, sids, titles, HISTORY_BY[task])),
            "completion": answer, "user_idx": user, "target": -1 if target is None else target, "history": list(history),
            "instruction": instruction, "pos": pos}


def align_example(task: str, item: int, sids, titles, instruction: str) -> dict:
    """One SID <-> title example; the answer is never part of the prompt."""
    sid, title = sid_text(sids, item), titles[item]
    prompt_input, answer = (sid, title) if task == "sid_to_title" else (title, sid)
    return {"task": task, "prompt": render(instruction, prompt_input), "completion": answer, "user_idx": -1,
            "target": item if task == "title_to_sid" else -1, "history": [], "instruction": instruction,
            "pos": -1}


def _pick(rng: np.random.Generator, task: str, paraphrase: bool) -> str:
    options = INSTRUCTIONS[task]
    return options[int(rng.integers(len(options)))] if paraphrase else options[0]


def task_examples(task: str, train: pd.DataFrame, sids, titles, max_history: int, rng, paraphrase: bool) -> list[dict]:
    """Every example of one task from the train sequences (``train``: user_idx, seq)."""
    out = []
    if task in HISTORY_BY:
        for user, seq in zip(train["user_idx"], train["seq"]):
            seq = [int(i) for i in seq]
            for t in range(1, len(seq)):
                out.append(seq_example(task, seq[max(0, t - max_history):t], seq[t], int(user), sids, titles,
                                       _pick(rng, task, paraphrase), pos=t))
    else:
        seen = sorted({int(i) for seq in train["seq"] for i in seq})
        out = [align_example(task, i, sids, titles, _pick(rng, task, paraphrase)) for i in seen]
    return out


def mix(pools: dict[str, list[dict]], weights: dict[str, float], rng: np.random.Generator) -> list[dict]:
    """Each example of task t appears floor(w_t) times, plus once more with probability frac(w_t)."""
    out = []
    for task, pool in pools.items():
        w = weights.get(task, 0.0)
        copies = np.floor(w) + (rng.random(len(pool)) < w - np.floor(w))
        for ex, c in zip(pool, copies.astype(int)):
            out.extend([ex] * c)
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def titles_of(ds: Prepared) -> dict[int, str]:
    """item_idx -> title (a missing title becomes 'item N', as prepare names it)."""
    items = ds.table("items")
    return {int(i): (str(t) if isinstance(t, str) and t.strip() else f"item {i}")
            for i, t in zip(items["item_idx"], items["title"])}


def train_prompts(ds: Prepared, sids: dict[int, tuple[str, ...]], cfg, seed: int = 0) -> pd.DataFrame:
    """The mixed training prompts (``cfg``: ``PromptConfig``), from the train split only."""
    rng = np.random.default_rng(seed)
    train, titles = ds.table("train"), titles_of(ds)
    pools = {t: task_examples(t, train, sids, titles, cfg.max_history, rng, cfg.paraphrase)
             for t, w in cfg.tasks.items() if w > 0}
    rows = mix(pools, cfg.tasks, rng)
    if cfg.max_examples is not None and len(rows) > cfg.max_examples:
        rows = rows[: cfg.max_examples]
    if not rows:
        raise DataError(f"{ds.path}: no training prompts (train sequences shorter than 2 items?)")
    return pd.DataFrame(rows, columns=COLUMNS)


def eval_prompts(ds: Prepared, split: str, sids: dict[int, tuple[str, ...]], cfg,
                 max_rows: int | None = None, task: str = "sid_seq") -> pd.DataFrame:
    """Prompts of one history ``task`` (default ``sid_seq``) over the valid or test rows, with the
    task's fixed first instruction."""
    table = ds.table(split)
    if max_rows is not None:
        table = table.head(max_rows)
    if table.empty:
        raise DataError(f"{ds.path}/{split}.parquet: no rows to evaluate")
    return history_prompts(table["user_idx"], table["history"], sids, titles_of(ds), cfg.max_history, task,
                           targets=table["target"])


def history_prompts(users, histories, sids: dict[int, tuple[str, ...]], titles: dict[int, str], max_history: int,
                    task: str = "sid_seq", targets=None) -> pd.DataFrame:
    """The prompts of ``task`` for these histories (their last ``max_history`` items), with the task's
    fixed first instruction; ``targets`` (optional) are the items that came next."""
    instruction = INSTRUCTIONS[task][0]
    targets = [None] * len(users) if targets is None else [int(t) for t in targets]
    rows = [seq_example(task, [int(i) for i in h][-max_history:], t, int(u), sids, titles, instruction)
            for u, h, t in zip(users, histories, targets)]
    return pd.DataFrame(rows, columns=COLUMNS)


def tokenizer_corpus(*frames: pd.DataFrame, titles: dict[int, str] | None = None) -> list[str]:
    """Texts whose words make the tiny tokenizer's vocabulary (SID tokens are added separately)."""
    texts = [t for f in frames for t in f["prompt"].tolist()]
    texts += list((titles or {}).values())
    texts += [t for f in frames for t in f.loc[f["task"].map(ANSWER_BY).eq("title") | f["task"].eq("sid_to_title"),
                                                 "completion"].tolist()]
    return [TOKEN_RE.sub(" ", t) for t in texts]


# ----------------------------------------------------------------------------- lengths


@dataclass
class FitReport:
    """What ``fit_lengths`` did to one table: examples whose history was cut, examples dropped
    (by task), and the history items removed in all."""

    examples: int = 0
    truncated: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    items_cut: int = 0
    over_budget: int = 0  # kept though too long (``drop=False``): the decoder cuts their tokens on the left

    @property
    def total_truncated(self) -> int:
        return sum(self.truncated.values())

    @property
    def total_dropped(self) -> int:
        return sum(self.dropped.values())


def fit_lengths(frame: pd.DataFrame, count: Callable[[list[str]], list[int]], budget: int, sids, titles, *,
                with_answer: bool = True, drop: bool = True) -> tuple[pd.DataFrame, FitReport]:
    """Make every example fit ``budget`` tokens by cutting its history on the left.

    ``count(texts)`` gives token counts. ``with_answer``: an example's length is that of
    prompt + completion + EOS (``count`` must add the EOS, as TRL does); otherwise the prompt's
    alone (evaluation and rollouts: ``budget`` leaves room for the longest answer). A history
    example that is too long keeps its instruction and its most recent history items, as many
    as fit (found by bisection, each candidate re-rendered and counted); one that does not fit
    even with its last item, and an alignment example that is too long, is dropped (``drop``;
    otherwise it keeps its last item and counts as cut: evaluation keeps every row, and the
    decoder cuts the prompt's tokens on the left). Returns the kept rows in their order and a
    ``FitReport``.
    """
    report = FitReport(examples=len(frame))
    if frame.empty:
        return frame, report

    def texts(prompts: list[str], answers: list[str]) -> list[str]:
        return [p + a for p, a in zip(prompts, answers)] if with_answer else list(prompts)

    lengths = count(texts(frame["prompt"].tolist(), frame["completion"].tolist()))
    over = [i for i, n in enumerate(lengths) if n > budget]
    prompts, keep = frame["prompt"].tolist(), [True] * len(frame)
    histories = frame["history"].tolist()
    for i in over:
        task, row = frame["task"].iat[i], frame.iloc[i]
        history = list(histories[i])
        if task not in HISTORY_BY or len(history) < 1 or (len(history) == 1 and not drop):
            if drop:
                keep[i] = False
                report.dropped[task] = report.dropped.get(task, 0) + 1
            else:
                report.over_budget += 1
            continue

        def prompt_with(n: int, row=row, history=history, task=task) -> str:
            return render(row["instruction"], history_input(history[-n:], sids, titles, HISTORY_BY[task]))

        lo, hi = 0, len(history) - 1  # lo items known to fit (0 = none), hi: the most that may fit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count(texts([prompt_with(mid)], [row["completion"]]))[0] <= budget:
                lo = mid
            else:
                hi = mid - 1
        if lo == 0 and drop:
            keep[i] = False
            report.dropped[task] = report.dropped.get(task, 0) + 1
            continue
        prompts[i], histories[i] = prompt_with(max(lo, 1)), history[-max(lo, 1):]
        report.items_cut += len(history) - max(lo, 1)
        if lo == 0:  # still too long with one item: counted apart, the decoder cuts its tokens
            report.over_budget += 1
        else:
            report.truncated[task] = report.truncated.get(task, 0) + 1
    out = frame.assign(prompt=prompts, history=histories)[keep].reset_index(drop=True)
    return out, report
