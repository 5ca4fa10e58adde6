"""Constrained beam search over semantic IDs: every returned sequence is a real item.

A prefix trie over the token-id sequences of all items (each followed by EOS) is built
once per run. At every decoding step a ``LogitsProcessor`` looks up, for each beam, the
trie node of the tokens generated so far and masks every token that does not continue a
valid SID. The lookup is vectorised (one ``searchsorted`` per generated position over
all beams), so its cost is a few small tensor ops per step, independent of the number of
items, and no Python loop runs over beams.

Decoding is always plain beam search: the model's own ``generation_config`` is swapped
out for the call, because Instruct checkpoints ship ``do_sample=True`` with top-k/top-p,
temperature and repetition penalties that would otherwise leak into ``generate`` (which
silently broke the original MiniOneRec evaluation). ``num_beams`` items are returned per
prompt, best first; prompts are batched with left padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from rayrec.errors import ConfigError, DataError


class SidTrie:
    """Prefix trie over valid token sequences (item SIDs, or item titles), stored as flat tensors.

    Tokens are renumbered into a local vocabulary of the S distinct ids that occur (SID
    tokens and EOS). Node 0 is the root; an edge (node, local token) -> child is the key
    ``node * S + local`` in a sorted array, so a batch of lookups is one ``searchsorted``, and
    the edges leaving node m are the keys in ``[m * S, (m + 1) * S)``: the allowed tokens of
    a batch of nodes are found without an [M, S] matrix (titles make M and S large).

    vocab_ids # [S]      token id of each local token
    edge_keys # [E]      sorted node * S + local
    edge_next # [E]      child node of each edge

    Several items may share a sequence (``sids.shared: share``, or identical titles): the
    sequence then names the first of them (smallest id), ``canonical`` maps every item to
    the item its sequence names, and a hit compares ``canonical[target]``.
    """

    def __init__(self, sequences: dict[int, Sequence[int]], eos_id: int):
        if not sequences:
            raise DataError("cannot build a SID trie over zero items")
        full = {item: [*map(int, seq), int(eos_id)] for item, seq in sorted(sequences.items())}
        ids = sorted({t for seq in full.values() for t in seq})
        self.vocab_ids = torch.tensor(ids, dtype=torch.long)
        local = {t: i for i, t in enumerate(ids)}
        s = len(ids)
        children: dict[tuple[int, int], int] = {}
        self.item_of: dict[tuple[int, ...], int] = {}
        self.canonical: dict[int, int] = {}
        for item, seq in full.items():
            node = 0
            for tok in seq:
                node = children.setdefault((node, local[tok]), len(children) + 1)
            self.canonical[item] = self.item_of.setdefault(tuple(seq[:-1]), item)
        keys = torch.tensor([n * s + t for n, t in children], dtype=torch.long)
        order = keys.argsort()
        self.edge_keys = keys[order]
        self.edge_next = torch.tensor(list(children.values()), dtype=torch.long)[order]
        self.num_nodes = len(children) + 1
        self.size, self.eos_id = s, int(eos_id)
        self.max_len = max(len(seq) for seq in full.values())  # SID length + EOS
        self._local = torch.full((int(self.vocab_ids.max()) + 1,), -1, dtype=torch.long)
        self._local[self.vocab_ids] = torch.arange(s)

    @property
    def num_items(self) -> int:
        """Distinct sequences: the most items one beam search can return."""
        return len(self.item_of)

    @property
    def shared_items(self) -> int:
        """Items whose sequence names another item (shared SIDs, identical titles)."""
        return sum(1 for item, rep in self.canonical.items() if item != rep)

    def allowed_mask(self, nodes: torch.Tensor) -> torch.Tensor:
        """Which local tokens continue each node  # [R] (>= 0) -> [R, S] bool.

        Node m's edges are the contiguous keys in [m*S, (m+1)*S) of the sorted ``edge_keys``:
        two searchsorted calls give every row's range, one scatter fills the mask.
        """
        lo = torch.searchsorted(self.edge_keys, nodes * self.size)
        hi = torch.searchsorted(self.edge_keys, (nodes + 1) * self.size)
        counts = hi - lo  # [R]
        rows = torch.repeat_interleave(torch.arange(len(nodes)), counts)
        starts = torch.repeat_interleave(lo - torch.cumsum(counts, 0) + counts, counts)
        edges = starts + torch.arange(int(counts.sum()))
        mask = torch.zeros(len(nodes), self.size, dtype=torch.bool)
        mask[rows, self.edge_keys[edges] % self.size] = True
        return mask

    def walk(self, generated: torch.Tensor) -> torch.Tensor:
        """Trie node reached by each row's generated tokens  # [R, g] -> [R] (-1 = off the trie)."""
        rows = generated.shape[0]
        node = torch.zeros(rows, dtype=torch.long)
        for j in range(generated.shape[1]):
            tok = generated[:, j].cpu()
            in_vocab = (tok >= 0) & (tok < len(self._local))
            loc = torch.where(in_vocab, self._local[tok.clamp(0, len(self._local) - 1)], -1)
            key = node * self.size + loc
            pos = torch.searchsorted(self.edge_keys, key).clamp(max=len(self.edge_keys) - 1)
            hit = (self.edge_keys[pos] == key) & (node >= 0) & (loc >= 0)
            node = torch.where(hit, self.edge_next[pos], -1)
        return node

    def lookup(self, token_ids: Sequence[int]) -> int | None:
        """The item whose SID is ``token_ids`` (EOS and padding after it are ignored), else None."""
        ids = list(token_ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.item_of.get(tuple(ids))


class TrieLogitsProcessor(LogitsProcessor):
    """Masks every token that does not continue a valid SID (built per call, shares the trie).

    ``prompt_len`` is the (left-padded) prompt width: tokens after it are the generated ones.
    Rows already off the trie (only padding beams) may emit EOS only, so no row is all -inf.
    """

    def __init__(self, trie: SidTrie, prompt_len: int):
        self.trie, self.prompt_len = trie, prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        node = self.trie.walk(input_ids[:, self.prompt_len :])  # [R]
        allowed = self.trie.allowed_mask(node.clamp(min=0)).to(scores.device)  # [R, S]
        dead = (node < 0).to(scores.device)
        eos_col = self.trie.vocab_ids.to(scores.device) == self.trie.eos_id  # [S]
        allowed = torch.where(dead[:, None], eos_col[None, :], allowed)
        vocab = self.trie.vocab_ids.to(scores.device)
        sub = scores[:, vocab].masked_fill(~allowed, float("-inf"))  # [R, S]
        out = torch.full_like(scores, float("-inf"))
        out[:, vocab] = sub
        return out


def build_trie(tokenizer, item_tokens: dict[int, tuple[str, ...]]) -> SidTrie:
    """Trie over ``item_idx -> SID tokens``; every token must already be in the tokenizer."""
    vocab = tokenizer.get_vocab()
    missing = sorted({t for seq in item_tokens.values() for t in seq if t not in vocab})
    if missing:
        raise ConfigError(f"{len(missing)} SID token(s) are not in the tokenizer, e.g. {', '.join(missing[:5])}; "
                          "load the tokenizer saved with the adapter (it holds the added SID tokens)")
    return SidTrie({i: [vocab[t] for t in seq] for i, seq in item_tokens.items()}, tokenizer.eos_token_id)


def build_title_trie(tokenizer, titles: dict[int, str]) -> SidTrie:
    """Trie over ``item_idx -> title`` token ids (as a completion is tokenized after the prompt's
    newline); items with identical titles share one path (``SidTrie.canonical``)."""
    ids = tokenizer([titles[i] for i in titles], add_special_tokens=False)["input_ids"]
    empty = [i for i, seq in zip(titles, ids) if not seq]
    if empty:
        raise DataError(f"{len(empty)} item title(s) tokenize to nothing, e.g. item {empty[0]}")
    return SidTrie(dict(zip(titles, ids)), tokenizer.eos_token_id)


def beam_config(tokenizer, num_beams: int, max_new_tokens: int) -> GenerationConfig:
    """Plain beam search returning ``num_beams`` sequences ranked by summed log-probability.

    ``output_scores`` is on for ``sequences_scores`` (each beam's log-probability, -inf for
    filler beams when fewer valid continuations exist than beams).
    """
    return GenerationConfig(
        do_sample=False, num_beams=num_beams, num_return_sequences=num_beams, max_new_tokens=max_new_tokens,
        early_stopping=True, length_penalty=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
        temperature=1.0, top_k=None, top_p=None, use_cache=True, output_scores=True,
        return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


@contextmanager
def own_generation_config(model, config: GenerationConfig):
    """Swap the model's ``generation_config`` for ``config`` (nothing inherited), restore after."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = target.generation_config
    target.generation_config = config
    try:
        yield
    finally:
        target.generation_config = saved


@dataclass
class Ranked:
    """One prompt's beam output, best first: items (None = not a real item), scores, raw tokens."""

    items: list[int | None]
    scores: list[float]
    tokens: list[list[int]]


@torch.inference_mode()
def beam_rank(model, tokenizer, prompts: Sequence[str], trie: SidTrie, *, num_beams: int, batch_size: int = 8,
              constrained: bool = True, max_prompt_tokens: int | None = None) -> list[Ranked]:
    """Top ``num_beams`` items for each prompt by beam search (best first).

    ``constrained=False`` runs the same beam search without the trie (for the benchmark
    and to count how many invalid items an unconstrained model emits). Prompts longer
    than ``max_prompt_tokens`` keep their end (the most recent history and the template).
    """
    if constrained and num_beams > trie.num_items:
        raise ConfigError(f"eval.num_beams={num_beams} exceeds the {trie.num_items} distinct answers (items of the "
                          f"SID index, or titles); lower eval.num_beams to at most {trie.num_items}")
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    config = beam_config(tokenizer, num_beams, trie.max_len)
    device = next(model.parameters()).device
    out: list[Ranked] = []
    with own_generation_config(model, config):
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True,
                            truncation=max_prompt_tokens is not None, max_length=max_prompt_tokens).to(device)
            width = enc["input_ids"].shape[1]
            procs = LogitsProcessorList([TrieLogitsProcessor(trie, width)] if constrained else [])
            gen = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                 generation_config=config, logits_processor=procs)
            out.extend(_split_beams(gen.sequences[:, width:].cpu(), gen.sequences_scores.cpu(), num_beams, trie))
    return out


def _split_beams(seqs: torch.Tensor, scores: torch.Tensor, num_beams: int, trie: SidTrie) -> list[Ranked]:
    """seqs # [B * beams, T], scores # [B * beams] -> one ``Ranked`` per prompt, best first."""
    out = []
    for b in range(seqs.shape[0] // num_beams):
        rows = range(b * num_beams, (b + 1) * num_beams)
        order = sorted(rows, key=lambda r: -float(scores[r]))
        tokens = [seqs[r].tolist() for r in order]
        items = [trie.lookup(t) if torch.isfinite(scores[r]) else None for t, r in zip(tokens, order)]
        out.append(Ranked(items, [float(scores[r]) for r in order], tokens))
    return out
