"""A tiny Qwen2-shaped causal LM and a word-level tokenizer, built locally (nothing downloaded).

Tests, the CPU job ``jobs/genrec_tiny.yaml`` and the benchmark use the same builders, so
what the tests pin is what the tiny job runs. The model has the production architecture
(Qwen2: RMSNorm, rotary attention with grouped KV heads, SwiGLU MLP) at toy width; the
tokenizer is a ``PreTrainedTokenizerFast`` like Qwen's, so every code path (adding SID
tokens, resizing, saving, ``from_pretrained`` of a folder) is the production one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch

#: Special tokens of the tiny tokenizer (ids 0..3, in this order).
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
#: Split words and single punctuation marks; SID tokens are added later as whole tokens.
_WORD = re.compile(r"\w+|[^\w\s]")


def tiny_tokenizer(corpus: Iterable[str], max_words: int | None = None):
    """A word-level ``PreTrainedTokenizerFast`` whose vocabulary is the words of ``corpus``.

    Words are taken in order of frequency (ties alphabetical), so the same corpus gives the
    same ids. Unknown words map to ``<unk>``. ``max_words`` caps the vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    counts: dict[str, int] = {}
    for text in corpus:
        for w in _WORD.findall(text):
            counts[w] = counts.get(w, 0) + 1
    words = sorted(counts, key=lambda w: (-counts[w], w))[:max_words]
    vocab = {t: i for i, t in enumerate([PAD, UNK, BOS, EOS])}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, unk_token=UNK, bos_token=BOS,
                                   eos_token=EOS, padding_side="left", model_max_length=4096)


def tiny_qwen2(vocab_size: int, *, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               intermediate: int | None = None, tie_embeddings: bool = False, seed: int = 0,
               pad_token_id: int = 0, bos_token_id: int = 2, eos_token_id: int = 3):
    """A randomly initialised ``Qwen2ForCausalLM`` of the given toy size (float32, eval mode off).

    The seed makes the initial weights a pure function of the arguments.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=1024, tie_word_embeddings=tie_embeddings, pad_token_id=pad_token_id,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = pad_token_id
    model.generation_config.eos_token_id = eos_token_id
    model.generation_config.bos_token_id = bos_token_id
    return model


def save_tiny_base(out: str | Path, corpus: Iterable[str], **model_kwargs) -> Path:
    """Write a tiny base model and its tokenizer to ``out`` (a folder ``from_pretrained`` reads).

    The SFT recipe does this once on the driver when ``model.base`` is ``tiny``, so that the
    workers and the evaluation load the base exactly as they would load Qwen2.5 from disk.
    """
    out = Path(out)
    tokenizer = tiny_tokenizer(corpus)
    model = tiny_qwen2(len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, **model_kwargs)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def grid_index(items, k: int = 8, levels: int = 3):
    """A fixed unique SID per item: item_idx written in base ``k`` (least significant level first).

    For tests and smoke runs that need an index without embedding anything; unique while
    item_idx < k**levels.  items: a prepared items table (item_idx, source_id).
    """
    import numpy as np

    from rayrec.errors import ConfigError
    from rayrec.genrec.semantic_ids import index_from_codes

    idx = items["item_idx"].to_numpy()
    if idx.max() >= k**levels:
        raise ConfigError(f"{len(idx)} items do not fit a {levels}-level grid of {k} codes; raise k or levels")
    codes = np.stack([(idx // k**lvl) % k for lvl in range(levels)], 1)
    return index_from_codes(items["source_id"].astype(str).tolist(), codes, "grid")
