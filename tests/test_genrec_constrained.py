"""Constrained beam search: only real items, whatever the model's own generation config says."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from rayrec.errors import ConfigError
from rayrec.genrec import constrained as C
from rayrec.genrec.lm import extend_tokenizer
from rayrec.genrec.tiny import tiny_qwen2, tiny_tokenizer

#: 60 items, 3 levels; unique because (i % 5, i // 5 % 7, i // 35) determines i below 70.
SIDS = {i: (f"<a_{i % 5}>", f"<b_{(i // 5) % 7}>", f"<c_{i // 35}>") for i in range(1, 61)}
PROMPTS = ["predict the next item", "please predict the next item for this user", "item", "predict item please"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lm():
    tok = tiny_tokenizer(PROMPTS + ["for this user"])
    extend_tokenizer(tok, sorted({t for s in SIDS.values() for t in s}))
    model = tiny_qwen2(len(tok), hidden=32, seed=3).eval()
    return model, tok, C.build_trie(tok, SIDS)


def test_trie_walks_prefixes_and_allows_only_children(lm):
    _, tok, trie = lm
    ids = tok.convert_tokens_to_ids
    assert trie.num_items == 60 and trie.max_len == 4
    nodes = trie.walk(torch.tensor([ids(["<a_1>", "<b_0>"]), ids(["<a_1>", "<a_2>"]), ids(["<a_0>", "<b_0>"])]))
    assert nodes[0] > 0 and nodes[1] == -1 and nodes[2] > 0
    allowed = set(trie.vocab_ids[trie.allowed_mask(nodes[:1])[0]].tolist())  # after <a_1><b_0>: items 1 (c_0) and 36 (c_1)
    assert allowed == {ids("<c_0>"), ids("<c_1>")}
    root = set(trie.vocab_ids[trie.allowed_mask(torch.tensor([0]))[0]].tolist())
    assert root == {ids(f"<a_{k}>") for k in range(5)}
    full = trie.walk(torch.tensor([ids(list(SIDS[7]))]))
    assert set(trie.vocab_ids[trie.allowed_mask(full)[0]].tolist()) == {tok.eos_token_id}
    assert trie.lookup(ids(list(SIDS[7])) + [tok.eos_token_id, tok.pad_token_id]) == 7
    assert trie.lookup(ids(["<a_1>", "<b_0>"])) is None


def test_processor_masks_every_other_token(lm):
    _, tok, trie = lm
    proc = C.TrieLogitsProcessor(trie, prompt_len=2)
    ids = tok.convert_tokens_to_ids
    input_ids = torch.tensor([[5, 6, ids("<a_3>")], [5, 6, 0]])  # second row is off the trie
    scores = torch.randn(2, len(tok))
    out = proc(input_ids, scores)
    finite = [set(torch.nonzero(torch.isfinite(r)).flatten().tolist()) for r in out]
    after_a3 = {s[1] for s in SIDS.values() if s[0] == "<a_3>"}
    assert finite[0] == {ids(b) for b in after_a3}
    assert finite[1] == {tok.eos_token_id}  # a dead row may only stop
    assert torch.equal(out[0, sorted(finite[0])], scores[0, sorted(finite[0])])


def test_never_returns_unknown_items_even_when_the_model_asks_for_sampling(lm):
    model, tok, trie = lm
    clean = C.beam_rank(model, tok, PROMPTS, trie, num_beams=10, batch_size=4)
    model.generation_config = GenerationConfig(do_sample=True, top_k=2, top_p=0.5, temperature=3.0,
                                               repetition_penalty=5.0, num_beams=1, pad_token_id=0, eos_token_id=3)
    runs = [C.beam_rank(model, tok, PROMPTS, trie, num_beams=10, batch_size=4) for _ in range(2)]
    assert model.generation_config.do_sample  # restored after decoding
    for got in runs:
        assert [r.items for r in got] == [r.items for r in clean]  # deterministic beam search, nothing inherited
    for r in clean:
        assert len(r.items) == 10 and len(set(r.items)) == 10 and all(i in SIDS for i in r.items)
        assert r.scores == sorted(r.scores, reverse=True)


def test_left_padded_batches_match_one_by_one(lm):
    model, tok, trie = lm
    batched = C.beam_rank(model, tok, PROMPTS, trie, num_beams=5, batch_size=4)
    single = C.beam_rank(model, tok, PROMPTS, trie, num_beams=5, batch_size=1)
    for b, s in zip(batched, single):
        assert b.items == s.items
        assert torch.allclose(torch.tensor(b.scores), torch.tensor(s.scores), atol=1e-4)


def test_beam_score_is_the_items_log_probability(lm):
    model, tok, trie = lm
    best = C.beam_rank(model, tok, PROMPTS[:1], trie, num_beams=5)[0]
    prompt = tok(PROMPTS[0])["input_ids"]
    seq = tok.convert_tokens_to_ids(list(SIDS[best.items[0]])) + [tok.eos_token_id]
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([prompt + seq])).logits.log_softmax(-1)[0]
    total = sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(seq))
    assert abs(total - best.scores[0]) < 1e-3


def test_unconstrained_search_emits_non_items(lm):
    model, tok, trie = lm
    free = C.beam_rank(model, tok, PROMPTS, trie, num_beams=10, batch_size=4, constrained=False)
    assert any(i is None for r in free for i in r.items)  # a random model rarely spells a real SID


def test_bad_requests_fail_before_decoding(lm):
    model, tok, trie = lm
    with pytest.raises(ConfigError, match="num_beams=61 exceeds the 60 distinct answers"):
        C.beam_rank(model, tok, PROMPTS, trie, num_beams=61)
    with pytest.raises(ConfigError, match="not in the tokenizer.*<z_1>"):
        C.build_trie(tok, {1: ("<z_1>",)})
