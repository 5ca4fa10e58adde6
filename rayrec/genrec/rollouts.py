"""Group generation for GRPO: G completions per prompt through the SID trie of evaluation.

* ``beam``: one constrained beam search with G beams returns G distinct valid items in
  score order. The call brings its own ``GenerationConfig`` (``beam_config``), so a
  checkpoint's sampling settings never leak in, and a fresh trie processor per call (no
  state is shared between rollouts and evaluation).
* ``sample``: constrained sampling at ``temperature`` (top-k/top-p off); each group is
  then ordered by the policy's own sequence log-probability (temperature 1, no trie
  renormalisation: the score evaluation's beam search ranks by), so a completion's position
  is its rank; copies of one item sit together and share its rank (``rewards.distinct_ranks``).
  ``dynamic_sampling`` draws ceil(1.5 G) and fills the group round-robin over the distinct
  items drawn, the target first, then by how often each was drawn: one copy of every item
  before a second copy of any (MiniOneRec's ``select_completion``).
* ``add_gt`` replaces the last completion of a group that misses the target with the
  target's SID (an off-policy completion; its sampling log-probs are unknown, None).

Without the constraint (``constrained=False``) a completion may be no item (``None``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig, LogitsProcessorList

from rayrec.genrec.constrained import SidTrie, TrieLogitsProcessor, beam_config, own_generation_config


@dataclass
class Group:
    """G completions of one prompt, in rank order."""

    completion_ids: list[list[int]]  # tokens up to and including EOS
    items: list[int | None]
    logprobs: list[list[float | None]]
    injected: list[bool] = field(default_factory=list)  # add_gt put the target here


def _trim(tokens: Sequence[int], eos_id: int, pad_id: int) -> list[int]:
    """Generated tokens up to and including the first EOS (padding after it dropped)."""
    out = []
    for t in tokens:
        out.append(int(t))
        if t == eos_id:
            return out
    while out and out[-1] == pad_id and pad_id != eos_id:
        out.pop()
    return out


def sample_config(tokenizer, n: int, max_new_tokens: int, temperature: float) -> GenerationConfig:
    """Plain multinomial sampling of ``n`` sequences per prompt (top-k/top-p and penalties off); the raw
    logits are kept (``output_logits``, not the processed scores) for the policy's own log-probabilities."""
    return GenerationConfig(
        do_sample=True, num_beams=1, num_return_sequences=n, max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=0, top_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0, use_cache=True, output_scores=False,
        output_logits=True,
        return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


def pick_dynamic(items: Sequence[int | None], target: int, size: int) -> list[int]:
    """Indices of a dynamic-sampling group: round-robin over the distinct items drawn (the target
    first, then the most frequent, then the first in ``items``' order: the most probable when they
    come ranked; invalid outputs last), one copy of each per round."""
    counts = Counter(items)
    copies: dict = {}
    for i, it in enumerate(items):
        copies.setdefault(it, []).append(i)
    order = sorted(copies, key=lambda it: (it != target, it is None, -counts[it], copies[it][0]))
    out: list[int] = []
    for round_ in range(max(counts.values(), default=0)):
        out += [copies[it][round_] for it in order if round_ < len(copies[it])]
    return out[:size]


def inject_target(group: Group, target: int, target_ids: list[int]) -> Group:
    """``add_gt``: the target replaces the group's last completion unless the group holds it."""
    injected = [False] * len(group.items)
    if target not in group.items:
        group.completion_ids[-1], group.items[-1] = list(target_ids), target
        group.logprobs[-1] = [None] * len(target_ids)
        injected[-1] = True
    group.injected = injected
    return group


@torch.no_grad()
def generate_groups(model, tokenizer, prompts: Sequence[str], trie: SidTrie, *, size: int, mode: str = "beam",
                    constrained: bool = True, temperature: float = 1.0, dynamic: bool = False,
                    targets: Sequence[int] | None = None, max_prompt_tokens: int | None = None) -> list[Group]:
    """One group of ``size`` completions for each prompt (one ``generate`` call for all prompts)."""
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    n = size if mode == "beam" or not dynamic else math.ceil(1.5 * size)
    if mode == "beam":
        config = beam_config(tokenizer, size, trie.max_len)
    else:
        config = sample_config(tokenizer, n, trie.max_len, temperature)
    device = next(model.parameters()).device
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, truncation=max_prompt_tokens is not None,
                    max_length=max_prompt_tokens).to(device)
    width = enc["input_ids"].shape[1]
    procs = LogitsProcessorList([TrieLogitsProcessor(trie, width)] if constrained else [])
    with own_generation_config(model, config):
        gen = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                             generation_config=config, logits_processor=procs)
    if mode == "beam":
        steps = model.compute_transition_scores(gen.sequences, gen.scores, gen.beam_indices).cpu()
    else:  # the policy's own log-probs (raw logits, temperature 1, no trie), as evaluation's beam search ranks
        steps = model.compute_transition_scores(gen.sequences, gen.logits, normalize_logits=True).cpu()
    seqs = gen.sequences[:, width:].cpu()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    groups = []
    for b in range(len(prompts)):
        rows = list(range(b * n, (b + 1) * n))
        ids = [_trim(seqs[r].tolist(), eos, pad) for r in rows]
        logps = [steps[r, : len(t)].tolist() for r, t in zip(rows, ids)]
        items = [trie.lookup(t) for t in ids]
        total = [float(steps[r, : len(t)].sum()) for r, t in zip(rows, ids)]
        total = [x if math.isfinite(x) else -math.inf for x in total]
        if mode == "beam":
            order = sorted(range(n), key=lambda i: -float(gen.sequences_scores[rows[i]]))
        else:
            order = sorted(range(n), key=lambda i: -total[i])
            if dynamic:
                if targets is None:
                    raise ValueError("dynamic sampling needs the targets")
                keep = pick_dynamic([items[i] for i in order], int(targets[b]), size)
                order = sorted((order[k] for k in keep), key=lambda i: -total[i])
        groups.append(Group([ids[i] for i in order], [items[i] for i in order], [logps[i] for i in order],
                            [False] * size))
    return groups
