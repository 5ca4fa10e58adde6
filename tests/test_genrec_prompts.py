"""Prompt tasks: built from the train split only, mixed by weight, answers never in the prompt."""

from __future__ import annotations

import pytest

from rayrec.config.genrec import PromptConfig
from rayrec.data.dataset import open_prepared
from rayrec.genrec import prompts as P
from rayrec.genrec.semantic_ids import sid_token


@pytest.fixture(scope="module")
def ds(tiny_dataset):
    return open_prepared(tiny_dataset)


@pytest.fixture(scope="module")
def sids(ds):
    """A made-up unique 3-level SID per item (the prompt code does not care how SIDs were built)."""
    items = ds.table("items")["item_idx"].tolist()
    return {int(i): (sid_token(0, i % 7), sid_token(1, (i // 7) % 7), sid_token(2, i // 49)) for i in items}


def test_every_task_is_present_and_alpaca_shaped(ds, sids):
    cfg = PromptConfig(tasks={"sid_seq": 1.0, "title_seq": 1.0, "sid_to_title": 1.0, "title_to_sid": 1.0})
    df = P.train_prompts(ds, sids, cfg, seed=0)
    assert set(df["task"]) == {"sid_seq", "title_seq", "sid_to_title", "title_to_sid"}
    assert df["prompt"].str.startswith("Below is an instruction").all()
    assert df["prompt"].str.endswith("### Response:\n").all()
    seq = df[df["task"] == "sid_seq"].iloc[0]
    assert seq["completion"] == "".join(sids[seq["target"]])
    assert all("".join(sids[i]) in seq["prompt"] for i in seq["history"])


def test_alignment_answers_never_appear_in_their_prompt(ds, sids):
    cfg = PromptConfig(tasks={"sid_to_title": 1.0, "title_to_sid": 1.0})
    df = P.train_prompts(ds, sids, cfg, seed=0)
    assert len(df) > 0
    assert not any(c in p for p, c in zip(df["prompt"], df["completion"]))
    titles = P.titles_of(ds)
    for r in df[df["task"] == "title_to_sid"].itertuples():
        assert titles[r.target] in r.prompt and r.completion == "".join(sids[r.target])


def test_sequence_examples_come_from_train_prefixes_only(ds, sids):
    cfg = PromptConfig(tasks={"sid_seq": 1.0, "title_seq": 1.0}, max_history=3)
    df = P.train_prompts(ds, sids, cfg, seed=0)
    train = {int(u): [int(i) for i in s] for u, s in zip(ds.table("train")["user_idx"], ds.table("train")["seq"])}
    expected = sum(len(s) - 1 for s in train.values())
    assert (df["task"] == "sid_seq").sum() == expected == (df["task"] == "title_seq").sum()
    for r in df.sample(200, random_state=0).itertuples():
        seq = train[r.user_idx]
        t = next(t for t in range(1, len(seq)) if seq[t] == r.target and seq[max(0, t - 3):t] == r.history)
        assert len(r.history) <= 3 and seq[t] == r.target
    # no valid/test target is ever a training answer for its user after its own history
    for split in ("valid", "test"):
        held = {(int(u), int(t)) for u, t in zip(ds.table(split)["user_idx"], ds.table(split)["target"])}
        pairs = {(int(u), int(t)) for u, t in zip(df["user_idx"], df["target"])}
        assert not held & pairs


def test_weights_mix_tasks_by_expected_copies(ds, sids):
    base = P.train_prompts(ds, sids, PromptConfig(tasks={"sid_seq": 1.0, "sid_to_title": 1.0}), seed=0)
    mixed = P.train_prompts(ds, sids, PromptConfig(tasks={"sid_seq": 0.5, "sid_to_title": 2.0}), seed=0)
    n_seq, n_align = (base["task"] == "sid_seq").sum(), (base["task"] == "sid_to_title").sum()
    assert (mixed["task"] == "sid_to_title").sum() == 2 * n_align
    assert abs((mixed["task"] == "sid_seq").sum() - n_seq / 2) < 0.1 * n_seq
    off = P.train_prompts(ds, sids, PromptConfig(tasks={"sid_seq": 1.0, "title_seq": 0.0}), seed=0)
    assert set(off["task"]) == {"sid_seq"}
    again = P.train_prompts(ds, sids, PromptConfig(tasks={"sid_seq": 0.5, "sid_to_title": 2.0}), seed=0)
    assert again.equals(mixed)  # seeded


def test_eval_prompts_use_the_fixed_instruction_and_last_history(ds, sids):
    cfg = PromptConfig(max_history=4)
    df = P.eval_prompts(ds, "test", sids, cfg, max_rows=20)
    test = ds.table("test").head(20)
    assert len(df) == 20 and (df["task"] == "sid_seq").all()
    assert df["prompt"].str.contains(P.INSTRUCTIONS["sid_seq"][0], regex=False).all()
    assert [list(h) for h in df["history"]] == [[int(i) for i in h][-4:] for h in test["history"]]
    assert df["target"].tolist() == test["target"].astype(int).tolist()


def test_tokenizer_corpus_leaves_sid_tokens_out(ds, sids):
    df = P.train_prompts(ds, sids, PromptConfig(), seed=0)
    corpus = P.tokenizer_corpus(df, titles=P.titles_of(ds))
    assert not any("<a_" in t for t in corpus)
