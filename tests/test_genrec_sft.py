"""LoRA SFT on a tiny Qwen2-shaped model: what moves, what stays, loading order, bad configs."""

from __future__ import annotations

import json
import re

import pytest
import torch

from rayrec.config.genrec import GenRecJobConfig
from rayrec.config.loader import validate
from rayrec.errors import ConfigError
from rayrec.genrec import lm as sft
from rayrec.genrec.tiny import save_tiny_base, tiny_qwen2, tiny_tokenizer

SIDS = [f"<{lvl}_{c}>" for lvl in "abc" for c in range(4)]
PROMPT = "### Instruction: predict the next item . ### Response:"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rows(n: int) -> list[dict[str, str]]:
    return [{"prompt": f"{PROMPT} user {i % 3}", "completion": f"<a_{i % 4}><b_{(i + 1) % 4}><c_{i % 3}>"}
            for i in range(n)]


def job(**train) -> GenRecJobConfig:
    t = {"epochs": 2, "batch_size": 8, "lr": 5e-2, "warmup_ratio": 0.0, "logging_steps": 1, "val_rows": 0,
         "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, **train}
    return GenRecJobConfig.model_validate({"train": t, "model": {"max_length": 64}, "tracking": {"enabled": False}})


def base_weights(model) -> dict[str, torch.Tensor]:
    """Base parameters of a PEFT-wrapped model under their original names (adapters left out)."""
    out = {}
    for name, p in model.get_base_model().named_parameters():
        if "lora_" in name or "trainable_tokens" in name:
            continue
        out[re.sub(r"\.(token_adapter\.)?base_layer", "", name)] = p.detach()
    return out


def test_sid_tokens_are_whole_tokens_and_resize_only_grows():
    tok = tiny_tokenizer([PROMPT])
    model = tiny_qwen2(len(tok))
    before = len(tok)
    ids = sft.extend_tokenizer(tok, SIDS)
    assert ids == list(range(before, before + len(SIDS)))
    assert tok("x <a_1><b_2> y")["input_ids"][1:3] == [ids[1], ids[6]]
    assert sft.extend_tokenizer(tok, SIDS) == ids  # idempotent
    assert sft.resize_embeddings(model, len(tok)) == len(tok) == model.lm_head.weight.shape[0]
    assert sft.resize_embeddings(model, 5) == len(tok)  # never shrinks (Qwen pads its matrices)


def test_a_saved_tiny_base_reads_back_the_same_tokenizer(tmp_path):
    """transformers 5's AutoTokenizer rebuilds a qwen2 folder's tokenizer as a BPE over the vocabulary,
    which turned the word-level tiny tokenizer into a few characters ("Below is an" -> "s a s")."""
    text = f"{PROMPT} Loctite Heavy Duty Epoxy, 3/4 in"
    tok = tiny_tokenizer([text])
    save_tiny_base(tmp_path / "base", [text], hidden=16, heads=2, kv_heads=1)
    _, loaded = sft.load_base(str(tmp_path / "base"), torch.float32)
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.convert_ids_to_tokens(loaded(text)["input_ids"])[:3] == ["#", "#", "#"]
    sft.extend_tokenizer(loaded, SIDS)
    loaded.save_pretrained(tmp_path / "ckpt")  # as a checkpoint saves it
    assert sft.load_tokenizer(tmp_path / "ckpt")(text + " <a_1>")["input_ids"][:-1] == tok(text)["input_ids"]


def test_lora_targets():
    model = tiny_qwen2(50)
    every = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert sft.lora_targets(model, "all") == every
    assert sft.lora_targets(model, "qkv") == ["k_proj", "q_proj", "v_proj"]
    assert sft.lora_targets(model, ["q_proj", "mlp.down_proj"]) == ["q_proj", "mlp.down_proj"]
    with pytest.raises(ConfigError, match=r"\['qproj'\] match no linear module.*choose among"):
        sft.lora_targets(model, ["qproj", "v_proj"])


def test_deepspeed_configs_resolve_and_bad_ones_fail():
    z2, z3 = sft.resolve_deepspeed("zero2"), sft.resolve_deepspeed("zero3")
    assert z2["zero_optimization"]["stage"] == 2 and z3["zero_optimization"]["stage"] == 3
    assert z2["train_micro_batch_size_per_gpu"] == "auto" and z3["bf16"]["enabled"] == "auto"
    assert sft.resolve_deepspeed(None) is None
    with pytest.raises(ConfigError, match=r"train.deepspeed='zero5'.*use one of \['zero2', 'zero3'\]"):
        sft.resolve_deepspeed("zero5")
    with pytest.raises(ConfigError, match="no such DeepSpeed config"):
        sft.resolve_deepspeed("/nowhere/ds.json")


def test_config_errors_name_the_fix():
    with pytest.raises(ConfigError, match=r"eval.*ks contains 20 > num_beams 10.*eval.num_beams=20"):
        validate(GenRecJobConfig, {"eval": {"num_beams": 10, "ks": [1, 20]}}, source="job.yaml")
    with pytest.raises(ConfigError, match=r"global_batch_size=1024.*= 64; set train.grad_accum=16"):
        validate(GenRecJobConfig, {"train": {"batch_size": 8, "global_batch_size": 1024},
                                   "scaling": {"num_workers": 8}}, source="job.yaml")
    with pytest.raises(ConfigError, match=r"unknown key 'train.lora.rank'.*(valid keys in train.lora: alpha, "
                                          r"dropout, r)"):
        validate(GenRecJobConfig, {"train": {"lora": {"rank": 8}}}, source="job.yaml")
    cfg = validate(GenRecJobConfig, {"train": {"batch_size": 8, "grad_accum": 16, "global_batch_size": 1024},
                                     "scaling": {"num_workers": 8}}, source="job.yaml")
    assert cfg.global_batch_size == 1024 and cfg.selection_metric == ("val/ndcg@10", "max")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny base on disk, trained 4 LoRA steps with our callbacks (one checkpoint per epoch)."""
    tmp = tmp_path_factory.mktemp("sft")
    base = save_tiny_base(tmp / "base", [PROMPT, "user 0 1 2"], hidden=32)
    model, tok, ids = sft.prepare_base(str(base), SIDS, torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    meta = {"base": str(base), "embedding_rows": model.get_input_embeddings().weight.shape[0]}
    logged = []

    class Rec:
        def log_metrics(self, m, step=None):
            logged.append((step, m))

    callbacks = sft.make_callbacks(Rec(), meta, {"1": ["<a_1>", "<b_2>", "<c_0>"]})
    trainer = sft.build_trainer(job(), model, tok, ids, rows(16), None, tmp / "out", use_gpu=False,
                                deepspeed=None, callbacks=callbacks)
    trainer.train()
    return {"trainer": trainer, "before": before, "ids": ids, "tok": tok, "out": tmp / "out", "base": base,
            "logged": logged}


def test_lora_moves_adapters_and_new_rows_and_leaves_base_bit_identical(trained):
    model, before, ids = trained["trainer"].model, trained["before"], trained["ids"]
    after = base_weights(model)
    assert set(after) == set(before)
    assert all(torch.equal(after[n], before[n]) for n in before)  # every base weight, old rows included
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # LoRA B starts at zero
    emb = model.get_input_embeddings()
    new, old = torch.tensor(ids), torch.arange(ids[0])
    with torch.no_grad():
        assert torch.equal(emb(old), before["model.embed_tokens.weight"][old])
        assert not torch.allclose(emb(new), before["model.embed_tokens.weight"][new])
        h = torch.randn(1, 32)
        out = model.get_output_embeddings()(h)  # [1, V]
        ref = h @ before["lm_head.weight"].T
    assert torch.allclose(out[:, old], ref[:, old], atol=1e-6) and not torch.allclose(out[:, new], ref[:, new])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or "trainable_tokens_delta" in n for n in trainable)


def test_metrics_are_renamed_and_checkpoints_carry_metadata(trained):
    steps = [s for s, m in trained["logged"] if "train/loss" in m]
    assert steps[:2] == [1, 2] and all("train/lr" in m for s, m in trained["logged"] if "train/loss" in m)
    ckpt = trained["out"] / "checkpoint-4"
    meta = json.loads((ckpt / sft.META_FILE).read_text())
    assert meta["global_step"] == 4 and meta["base"] == str(trained["base"])
    assert json.loads((ckpt / sft.SID_FILE).read_text()) == {"1": ["<a_1>", "<b_2>", "<c_0>"]}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "trainer_state.json",
            "optimizer.pt"} <= {p.name for p in ckpt.iterdir()}


def test_loading_for_eval_reproduces_the_trained_model(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ckpt = trained["out"] / "checkpoint-4"
    model = trained["trainer"].model.eval()
    x = torch.tensor([trained["tok"](PROMPT + " <a_1><b_2>")["input_ids"]])
    with torch.no_grad():
        want = model(input_ids=x).logits
        loaded, tok, meta = sft.load_for_eval(ckpt)
        assert len(tok) == len(trained["tok"]) and meta["embedding_rows"] == len(tok)
        assert torch.allclose(loaded(input_ids=x).logits, want, atol=1e-5)
        merged, _, _ = sft.load_for_eval(ckpt, merge=True)
        assert not isinstance(merged, PeftModel) and torch.allclose(merged(input_ids=x).logits, want, atol=1e-4)
    naive = AutoModelForCausalLM.from_pretrained(trained["base"])  # no tokenizer extension, no resize
    with pytest.raises((RuntimeError, IndexError)):  # what users of the original scripts hit
        PeftModel.from_pretrained(naive, str(ckpt))
