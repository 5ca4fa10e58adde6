"""The generative track on MiniOneRec's own file layout: shared SIDs, prompt lengths, title tasks.

The fixture (``tests/fixtures/minionerec_industrial``, written by ``minionerec_fixture.py``) has
MiniOneRec's exact layout, three SIDs shared by seven items, long titles and 10-item histories.
"""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest
import yaml
from minionerec_fixture import CHECKED_IN, NAME, SHARED, write_fixture

from rayrec.config.genrec import GenRecJobConfig
from rayrec.config.loader import load_model
from rayrec.data.dataset import open_prepared
from rayrec.data.sources.minionerec import read_minionerec
from rayrec.genrec import prompts as P
from rayrec.genrec.constrained import Ranked, build_title_trie, build_trie
from rayrec.genrec.evaluate import metrics_from_results, result_rows
from rayrec.genrec.inputs import fit_inputs, prepare_inputs, prompt_tokenizer, token_counter
from rayrec.genrec.semantic_ids import load_or_build, read_index

pytestmark = pytest.mark.usefixtures("one_torch_thread")
JOB = Path(__file__).parents[1] / "jobs" / "minionerec_industrial.yaml"
SHARED_ITEMS = {str(i) for group, _ in SHARED for i in group}


def test_the_checked_in_fixture_is_what_its_generator_writes(tmp_path):
    fresh = write_fixture(tmp_path / "f")
    files = sorted(p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file())
    assert len(files) == 6
    for rel in files:
        assert filecmp.cmp(fresh / rel, CHECKED_IN / rel, shallow=False), rel


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """A private copy of the fixture folder (the policies write beside its index)."""
    return write_fixture(tmp_path_factory.mktemp("minionerec") / "Amazon")


def job(raw: Path, tmp: Path, **overrides) -> GenRecJobConfig:
    """The shipped job, pointed at ``raw`` and at temporary outputs, with dotted ``overrides``."""
    data = yaml.safe_load(JOB.read_text())
    data["data"].update(path=str(tmp / "prepared"), input=str(raw))
    data["sids"]["dir"] = str(raw)
    data["tracking"]["uri"] = f"sqlite:///{tmp}/mlflow.db"
    data["run"]["storage_path"] = str(tmp / "runs")
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_model(GenRecJobConfig, path, [f"{k}={v}" for k, v in overrides.items()])


def test_the_published_index_has_shared_sids_and_reads_as_is(raw):
    index = read_index(raw, NAME)
    assert index.shared_counts() == {"shared_sids": 3, "items_sharing": 7}
    assert {i for items in index.duplicates().values() for i in items} == SHARED_ITEMS


def test_disambiguate_extends_only_the_shared_items_and_never_touches_the_file(raw, tmp_path):
    original = (raw / "index" / f"{NAME}.index.json").read_bytes()
    cfg = job(raw, tmp_path)
    assert cfg.sids.shared == "disambiguate"  # the default
    items = open_prepared(prepare_inputs(cfg).ds.path).table("items")
    read = read_index(raw, NAME)
    index, report = load_or_build(cfg.sids, items)
    assert report["shared"] == {"policy": "disambiguate", "shared_sids": 3, "items_sharing": 7,
                                "written": str(raw / "disambiguated" / "index" / f"{NAME}.index.json")}
    assert not index.duplicates()
    for item, seq in index.tokens.items():
        if item in SHARED_ITEMS:
            assert seq[:3] == read.tokens[item] and seq[3].startswith("<d_")
        else:
            assert seq == read.tokens[item]
    assert sorted(index.tokens[str(i)][3] for i in (30, 31, 32)) == ["<d_0>", "<d_1>", "<d_2>"]
    assert (raw / "index" / f"{NAME}.index.json").read_bytes() == original
    # the written index round-trips, has no shared SID left, and the info file names every item
    written = read_index(raw / "disambiguated", NAME)
    assert written.tokens == index.tokens and not written.duplicates()
    info = (raw / "disambiguated" / "info" / f"{NAME}.txt").read_text().splitlines()
    assert len(info) == len(index.tokens) and info[0].split("\t")[0] == "".join(index.tokens[info[0].split("\t")[2]])
    # the folder still reads as a MiniOneRec dataset: the written files are outside index/ and info/
    assert len(read_minionerec(raw).items) == len(index.tokens)


def test_share_keeps_the_index_and_scores_hits_by_sid(raw, tmp_path):
    cfg = job(raw, tmp_path, **{"sids.shared": "share"})
    inputs = prepare_inputs(cfg)
    assert inputs.index.shared_counts()["shared_sids"] == 3
    tokenizer = prompt_tokenizer(cfg, inputs)
    trie = build_trie(tokenizer, inputs.item_sids)
    items = inputs.ds.table("items")
    idx = dict(zip(items["source_id"].astype(str), items["item_idx"].astype(int)))
    a, b = idx["4"], idx["5"]  # one SID, two items
    assert trie.canonical[a] == trie.canonical[b] == min(a, b) and trie.num_items == len(idx) - 4
    other = next(i for s, i in idx.items() if s not in SHARED_ITEMS)
    prompts = [{"user_idx": 0, "history": [other], "target": t} for t in (a, b, other)]
    decoded = Ranked([min(a, b), other], [-1.0, -2.0], [[], []])
    rows = result_rows(prompts, [decoded] * 3, inputs.item_sids, trie.canonical)
    assert [r["rank"] for r in rows] == [1, 1, 2]  # either item of the shared SID is a hit at rank 1
    assert [r["ambiguous"] for r in rows] == [True, True, False]
    assert rows[0]["target"] == rows[1]["target"] == rows[0]["predictions"][0]
    m = metrics_from_results(rows, [1, 2], "test")
    assert m["test/hr@1"] == pytest.approx(2 / 3) and m["test/ambiguous_targets"] == 2


def test_a_prompt_longer_than_max_length_loses_its_oldest_history_not_its_answer(raw, tmp_path):
    cfg = job(raw, tmp_path, **{"model.max_length": 200})
    inputs = prepare_inputs(cfg)
    before = inputs.train.copy()
    tokenizer = prompt_tokenizer(cfg, inputs)
    count = token_counter(tokenizer, eos=True)
    assert sum(n > 200 for n in count((before["prompt"] + before["completion"]).tolist())) > 50
    fit = fit_inputs(cfg, inputs, tokenizer)["train"]
    after = inputs.train
    assert fit.total_truncated > 50 and fit.items_cut > fit.total_truncated
    lengths = count((after["prompt"] + after["completion"]).tolist())
    assert max(lengths) <= 200
    titles = P.titles_of(inputs.ds)
    assert fit.total_dropped == 0  # even the longest 10-title history keeps its last items
    for (_, old), (_, new) in zip(before.iterrows(), after.iterrows()):
        assert new["completion"] == old["completion"] and new["instruction"] == old["instruction"]
        h_old, h_new = list(old["history"]), list(new["history"])
        assert h_new == h_old[len(h_old) - len(h_new):]  # the most recent items
        assert len(h_new) >= 1 or old["task"] not in P.HISTORY_BY
        if h_new != h_old:  # as many as fit: one more would not
            longer = P.render(old["instruction"], P.history_input(h_old[-len(h_new) - 1:], inputs.item_sids,
                                                                  titles, P.HISTORY_BY[old["task"]]))
            assert count([longer + old["completion"]])[0] > 200


def test_trl_sees_the_whole_answer_and_eos_after_fitting(raw, tmp_path):
    """TRL's own tokenization of the fitted rows: nothing is cut, every answer ends with EOS."""
    from rayrec.genrec.lm import build_trainer, extend_tokenizer
    from rayrec.genrec.tiny import tiny_qwen2

    cfg = job(raw, tmp_path, **{"model.max_length": 160, "prompts.max_examples": 300})
    inputs = prepare_inputs(cfg)
    tokenizer = prompt_tokenizer(cfg, inputs)
    fit = fit_inputs(cfg, inputs, tokenizer)["train"]
    assert fit.total_truncated > 20
    ids = extend_tokenizer(tokenizer, inputs.index.vocab())
    model = tiny_qwen2(len(tokenizer), hidden=16, heads=2, kv_heads=1)
    rows = inputs.train.to_dict("records")
    trainer = build_trainer(cfg, model, tokenizer, ids, rows, None, tmp_path / "out", use_gpu=False, deepspeed=None,
                            callbacks=[])
    data = trainer.train_dataset
    assert len(data) == len(rows)
    for row, ex in zip(rows, data):
        answer = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        labelled = [t for t in ex["labels"] if t != -100]  # the tokens the loss covers
        assert len(ex["input_ids"]) <= 160 and labelled == answer


def test_examples_that_cannot_fit_are_dropped_and_counted(raw, tmp_path):
    cfg = job(raw, tmp_path)
    inputs = prepare_inputs(cfg)
    count = token_counter(prompt_tokenizer(cfg, inputs), eos=True)
    titles = P.titles_of(inputs.ds)
    frame = inputs.train.groupby("task").head(3).reset_index(drop=True)
    lengths = count((frame["prompt"] + frame["completion"]).tolist())
    budget = min(lengths) - 1  # nothing fits whole; history rows keep what fits, or go
    out, fit = P.fit_lengths(frame, count, budget, inputs.item_sids, titles)
    assert fit.dropped.get("sid_to_title") == 3 and fit.dropped.get("title_to_sid") == 3
    assert fit.total_dropped + len(out) == len(frame) and fit.examples == len(frame)
    assert set(out["task"]) <= set(P.HISTORY_BY)
    kept, rep = P.fit_lengths(frame, count, budget, inputs.item_sids, titles, drop=False)
    assert len(kept) == len(frame) and rep.total_dropped == 0  # evaluation keeps every row
    assert rep.total_truncated == fit.total_truncated  # the rest are counted apart, not as cut to fit
    assert rep.over_budget == len(frame) - fit.total_truncated


@pytest.mark.parametrize("task", ["sid_seq_to_title", "title_seq_to_title"])
def test_title_tasks_answer_with_the_next_title_and_never_leak_it(raw, tmp_path, task):
    cfg = job(raw, tmp_path, **{"prompts.tasks": f"{{{task}: 1.0}}"})
    inputs = prepare_inputs(cfg)
    titles = P.titles_of(inputs.ds)
    train = inputs.train
    assert set(train["task"]) == {task} and len(train) > 300
    for r in train.itertuples():
        assert r.completion == titles[r.target]
        shown = {titles[i] for i in r.history}
        assert r.completion not in r.prompt or r.completion in shown  # only as a history item's title
        if P.HISTORY_BY[task] == "sid":
            assert "".join(inputs.item_sids[r.history[-1]]) in r.prompt
    test = P.eval_prompts(inputs.ds, "test", inputs.item_sids, cfg.prompts, task=task)
    table = inputs.ds.table("test")
    assert test["target"].tolist() == table["target"].astype(int).tolist()
    assert all(r.completion not in r.prompt or r.completion in {titles[i] for i in r.history}
               for r in test.itertuples())


def test_the_title_trie_decodes_only_real_titles_and_merges_identical_ones(raw, tmp_path):
    from rayrec.genrec.constrained import beam_rank
    from rayrec.genrec.lm import extend_tokenizer
    from rayrec.genrec.tiny import tiny_qwen2

    cfg = job(raw, tmp_path)
    inputs = prepare_inputs(cfg)
    titles = P.titles_of(inputs.ds)
    tokenizer = prompt_tokenizer(cfg, inputs)
    trie = build_title_trie(tokenizer, titles)
    distinct = len(set(titles.values()))
    assert trie.num_items == distinct and trie.shared_items == len(titles) - distinct == 2
    extend_tokenizer(tokenizer, inputs.index.vocab())
    model = tiny_qwen2(len(tokenizer), hidden=16, heads=2, kv_heads=1, seed=1).eval()
    prompts = P.eval_prompts(inputs.ds, "test", inputs.item_sids, cfg.prompts, max_rows=3, task="sid_seq_to_title")
    ranked = beam_rank(model, tokenizer, prompts["prompt"].tolist(), trie, num_beams=5)
    decoded = [tokenizer.decode(t, skip_special_tokens=True) for r in ranked for t in r.tokens]
    assert all(None not in r.items for r in ranked)
    assert set(decoded) <= set(titles.values()) | {tokenizer.decode(tokenizer(t)["input_ids"]) for t in titles.values()}


def test_validation_is_capped_by_val_rows(raw, tmp_path):
    cfg = job(raw, tmp_path, **{"train.val_rows": 7})
    inputs = prepare_inputs(cfg)
    assert len(inputs.valid) == 7 and inputs.valid_total == 40
    assert inputs.valid["target"].tolist() == inputs.ds.table("valid")["target"].astype(int).head(7).tolist()
    every = prepare_inputs(job(raw, tmp_path, **{"train.val_rows": 0}))
    assert len(every.valid) == 40  # val_rows 0: val/loss only, over every row


def test_the_prompts_and_sids_commands_show_cuts_and_shared_sids(raw, tmp_path, capsys):
    from rayrec.cli import main

    cfg_path = tmp_path / "job.yaml"
    job(raw, tmp_path, **{"model.max_length": 200})
    assert main(["genrec", "prompts", str(cfg_path), "model.max_length=200", "--show", "0"]) == 0
    out = capsys.readouterr().out
    table = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith(("title_seq ", "sid_seq "))}
    assert int(table["title_seq"][1]) > 0 and table["sid_seq"][1:] == ["0", "0"]
    assert main(["genrec", "sids", str(cfg_path)]) == 0
    out = capsys.readouterr().out
    assert "SIDs shared by several items (read)" in out and "disambiguated index" in out



def test_a_read_only_index_folder_still_trains_on_the_disambiguated_index(raw, tmp_path, monkeypatch, caplog):
    from rayrec.genrec import semantic_ids as S

    cfg = job(raw, tmp_path, **{"sids.name": NAME})
    items = prepare_inputs(cfg).ds.table("items")
    (raw / "disambiguated" / "index" / f"{NAME}.index.json").unlink(missing_ok=True)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(raw / "disambiguated"))

    monkeypatch.setattr(S, "write_index", refuse)
    index, report = load_or_build(cfg.sids, items)
    assert not index.duplicates() and "written" not in report["shared"]
    assert "cannot write the disambiguated index" in caplog.text


def test_sft_on_the_published_layout_then_title_evaluation(raw, tmp_path):
    """The shipped job, shortened: trains on the disambiguated index, logs what was cut and shared, and
    evaluates the SID task and a title task (exact title match, every output a real title)."""
    from mlflow.tracking import MlflowClient

    from rayrec import recipes
    from rayrec.genrec.evaluate import evaluate_adapter

    cfg = job(raw, tmp_path, **{"train.epochs": 1, "train.batch_size": 32, "prompts.max_examples": 240,
                                "model.tiny.hidden": 32, "model.max_length": 200, "train.val_rows": 8,
                                "eval.max_rows": 12, "eval.num_beams": 5, "eval.ks": "[1, 5]"})
    out = recipes.run(cfg, local=True)
    metrics = MlflowClient(cfg.tracking.uri).get_run(out.mlflow_run_id).data.metrics
    assert metrics["sids/shared_sids"] == 3 and metrics["sids/items_sharing"] == 7
    assert metrics["data/train_truncated"] > 0 and metrics["data/train_dropped"] == 0
    assert metrics["data/valid_prompts"] == 8 and metrics["data/valid_rows_total"] == 40
    sid = evaluate_adapter(cfg, out.checkpoint, local=True)
    assert sid.metrics["test/rows"] == 12 and sid.metrics["test/invalid"] == 0
    titles = set(P.titles_of(open_prepared(cfg.data.path)).values())
    for task in ("title_seq", "sid_seq_to_title", "title_seq_to_title"):
        titled = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"task": task})})
        res = evaluate_adapter(titled, out.checkpoint, local=True)
        assert res.results_path.name == f"eval_test_{task}.json"
        assert res.metrics[f"test_{task}/invalid"] == 0 and res.metrics[f"test_{task}/rows"] == 12
        assert f"test_{task}_popularity/hr@5" in res.metrics
        if task.endswith("_to_title"):
            assert all(p in titles for r in res.rows for p in r["predictions"])
        else:
            assert all(r["input"].count('"') >= 2 for r in res.rows)  # a title history
        for r in res.rows:  # a hit is an exact match of the answer (title or SID)
            assert (r["rank"] is not None) == (r["target"] in r["predictions"])


def test_disambiguation_refuses_what_it_cannot_make_unique():
    from rayrec.errors import DataError
    from rayrec.genrec.semantic_ids import SidIndex, disambiguate

    clash = SidIndex({"x": ("<a_1>", "<b_1>"), "y": ("<a_1>", "<b_1>"), "z": ("<a_1>", "<b_1>", "<c_0>")}, "f.json")
    with pytest.raises(DataError, match="f.json: adding a level.*collide"):
        disambiguate(clash)
    deep = tuple(f"<{c}_0>" for c in "abcdefghijklmnopqrstuvwxyz")
    with pytest.raises(DataError, match="already has 26 levels"):
        disambiguate(SidIndex({"x": deep, "y": deep}, "g.json"))


def test_share_maps_grpo_targets_and_the_popularity_baseline_to_the_sid(raw, tmp_path):
    from rayrec.genrec.evaluate import popularity_metrics
    from rayrec.genrec.inputs import canonical_targets
    from rayrec.genrec.semantic_ids import canonical_items

    cfg = job(raw, tmp_path, **{"sids.shared": "share"})
    inputs = prepare_inputs(cfg)
    canon = canonical_items(inputs.item_sids)
    expected = sum(canon[t] != t for table in (inputs.train, inputs.valid) for t in table["target"] if t >= 0)
    assert expected > 0 and canonical_targets(inputs) == expected
    assert all(canon[t] == t for t in inputs.train["target"] if t >= 0)
    a, b = next((min(g), max(g)) for g in ({i for i in canon if canon[i] == c} for c in set(canon.values()))
                if len(g) > 1)
    n = len(canon)  # ndcg@N = 1 / log2(rank + 1): one value per rank

    def ndcg(target, canonical=None):
        return popularity_metrics(inputs.ds, [target], [n], "t", canonical)[f"t_popularity/ndcg@{n}"]

    assert ndcg(a) != ndcg(b)  # by item: two ranks
    assert ndcg(a, canon) == ndcg(b, canon) >= max(ndcg(a), ndcg(b))  # by SID: one rank, the pair's counts summed
