"""The LM and PEFT toolkit of the generative track (SFT and GRPO): SID tokens in the tokenizer, resized
embeddings, LoRA targets, the TRL SFT trainer, loading an adapter for evaluation.

The order matters and is the same for training and for evaluation:

1. load the base model and its tokenizer;
2. add the SID tokens to the tokenizer (``extend_tokenizer``);
3. grow the embedding and output layers to the tokenizer (``resize_embeddings``; never
   shrink: Qwen pads its matrices past the tokenizer, and shrinking would drop rows);
4. wrap with PEFT: LoRA on the chosen projections, and PEFT *trainable tokens* on the new
   rows of ``embed_tokens`` (and ``lm_head`` when untied), so the SID embeddings are
   trained while every base weight, old embedding rows included, stays bit-identical.

At evaluation the adapter is loaded onto a base prepared by steps 1-3 with the
tokenizer saved next to the adapter, so the ``size mismatch for
model.embed_tokens.weight`` that users of the original scripts hit cannot happen.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from rayrec import stopping
from rayrec.errors import ConfigError, RayrecError

log = logging.getLogger(__name__)

META_FILE = "genrec.json"  # written into every checkpoint: base, sizes, SID index
SID_FILE = "sids.index.json"  # item source id -> tokens, as trained
REPO_ROOT = Path(__file__).resolve().parents[2]

#: Projection names by role, over the families rayrec meets (Qwen2/Llama/Mistral, GPT-2, Phi).
QKV_NAMES = ("q_proj", "k_proj", "v_proj", "qkv_proj", "c_attn", "query_key_value", "Wqkv")
ATTN_PARENTS = ("attn", "attention")
MLP_PARENTS = ("mlp", "feed_forward", "ffn")


def extend_tokenizer(tokenizer, tokens: list[str]) -> list[int]:
    """Add the SID tokens (whole, never split) and return their ids, in ``tokens`` order."""
    tokenizer.add_tokens([t for t in tokens if t not in tokenizer.get_vocab()])
    return tokenizer.convert_tokens_to_ids(tokens)


def resize_embeddings(model, num_tokens: int, mean_init: bool = True) -> int:
    """Grow input/output embeddings to hold ``num_tokens`` rows; return the row count.

    New rows start at the old rows' mean (``mean_init``) for training; at evaluation
    the saved adapter replaces them, so the (costly, random) initialisation is skipped.
    """
    rows = model.get_input_embeddings().weight.shape[0]
    if num_tokens > rows:
        model.resize_token_embeddings(num_tokens, mean_resizing=mean_init)
        rows = num_tokens
    return rows


def lora_targets(model, spec: str | list[str]) -> list[str]:
    """Module names for LoRA: ``all`` (every attention and MLP linear), ``qkv``, or an explicit list.

    An explicit name must match some module (by leaf name or dotted suffix); otherwise the
    error lists the candidates, before any training starts.
    """
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    leaves = sorted({n.rsplit(".", 1)[-1] for n in linears})
    if spec == "all":
        parents = ATTN_PARENTS + MLP_PARENTS
        found = sorted({n.rsplit(".", 1)[-1] for n in linears if any(p in n.lower() for p in parents)})
    elif spec == "qkv":
        found = sorted({leaf for leaf in leaves if leaf in QKV_NAMES})
    else:
        unknown = [t for t in spec if not any(n == t or n.endswith("." + t) for n in linears)]
        if unknown:
            raise ConfigError(f"train.lora.target_modules: {unknown} match no linear module of the model; "
                              f"choose among {leaves} (or use 'all' / 'qkv')")
        found = list(spec)
    if not found:
        raise ConfigError(f"train.lora.target_modules={spec!r} matches no module; linear modules are {leaves}")
    return found


def ties_embeddings(model) -> bool:
    """Whether the output layer shares the input embedding's weight."""
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def lora_config(model, settings, new_token_ids: list[int]):
    """PEFT ``LoraConfig`` with trainable SID rows (``settings``: the job's ``train.lora``)."""
    from peft import LoraConfig

    trainable = {"embed_tokens": list(new_token_ids)}
    if not ties_embeddings(model) and model.get_output_embeddings() is not None:
        trainable["lm_head"] = list(new_token_ids)
    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, bias="none",
                      target_modules=lora_targets(model, settings.target_modules), task_type="CAUSAL_LM",
                      trainable_token_indices=trainable)


def resolve_deepspeed(spec: str | None) -> dict[str, Any] | None:
    """The DeepSpeed config named by ``train.deepspeed`` (``zero2`` -> cluster/deepspeed/zero2.json).

    Names are looked up in ``cluster/deepspeed/`` of the working directory (``ray job
    submit --working-dir .``) and then of the rayrec checkout; a path is read as given.
    """
    if spec is None:
        return None
    is_name = "/" not in spec and not spec.endswith(".json")
    candidates = ([Path.cwd() / "cluster/deepspeed" / f"{spec}.json", REPO_ROOT / "cluster/deepspeed" / f"{spec}.json"]
                  if is_name else [Path(spec)])
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        known = sorted(p.stem for p in (REPO_ROOT / "cluster/deepspeed").glob("*.json"))
        raise ConfigError(f"train.deepspeed={spec!r}: no such DeepSpeed config ({', '.join(map(str, candidates))}); "
                          f"use one of {known} or a path to a JSON file")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: invalid JSON in DeepSpeed config: {e.msg}") from None
    if not isinstance(config, dict) or "zero_optimization" not in config:
        raise ConfigError(f"{path}: a DeepSpeed config needs a 'zero_optimization' section")
    return config


def pick_dtype(setting: str, use_gpu: bool) -> torch.dtype:
    """bf16 on GPU and fp32 on CPU for ``auto``; otherwise as configured."""
    if setting == "auto":
        return torch.bfloat16 if use_gpu else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[setting]


def load_tokenizer(path: str | Path):
    """The tokenizer of a model folder (or hub id) exactly as it was saved.

    transformers 5's ``AutoTokenizer`` rebuilds the tokenizer of a folder from the model type
    in its ``config.json`` (qwen2 -> ``Qwen2Tokenizer``, a BPE over the saved vocabulary): a
    tokenizer of another kind saved there, like the tiny word-level one, comes back garbled
    ("Below is an instruction" -> "s a s"). A local folder whose ``tokenizer_config.json``
    names the generic class is therefore read from its ``tokenizer.json`` as is.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = Path(path)
    config = folder / "tokenizer_config.json"
    if config.is_file() and (folder / "tokenizer.json").is_file():
        if json.loads(config.read_text()).get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return PreTrainedTokenizerFast.from_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(path))


def load_base(path: str, dtype: torch.dtype):
    """(model, tokenizer) of a local folder or hub id; a missing folder is a clear error."""
    from transformers import AutoModelForCausalLM

    try:
        tokenizer = load_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as e:
        raise RayrecError(f"model.base {path!r} cannot be loaded ({e}); give a local model folder, or a hub id "
                          "on a machine with hub access") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def prepare_base(path: str, sid_tokens: list[str], dtype: torch.dtype):
    """Steps 1-3: (model, tokenizer, SID token ids) with the SID rows in place."""
    model, tokenizer = load_base(path, dtype)
    ids = extend_tokenizer(tokenizer, sid_tokens)
    resize_embeddings(model, len(tokenizer))
    model.config.use_cache = False
    return model, tokenizer, ids


def sft_args(cfg, output_dir: str | Path, *, use_gpu: bool, deepspeed: dict | None, has_eval: bool):
    """TRL ``SFTConfig`` from the job (``cfg``: ``GenRecJobConfig``); loss on the response only."""
    from trl import SFTConfig

    t = cfg.train
    bf16 = pick_dtype(cfg.model.dtype, use_gpu) == torch.bfloat16
    return SFTConfig(
        output_dir=str(output_dir), num_train_epochs=t.epochs, per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum, learning_rate=t.lr,
        weight_decay=t.weight_decay, warmup_steps=t.warmup_ratio, lr_scheduler_type=t.scheduler,
        max_grad_norm=t.max_grad_norm, gradient_checkpointing=t.gradient_checkpointing, bf16=bf16,
        use_cpu=not use_gpu, deepspeed=deepspeed, seed=cfg.run.seed, data_seed=cfg.run.seed,
        logging_steps=t.logging_steps, logging_first_step=True, save_strategy="epoch",
        eval_strategy="epoch" if has_eval else "no", save_total_limit=t.save_total_limit,
        completion_only_loss=True, max_length=cfg.model.max_length, packing=False,
        report_to=[], disable_tqdm=True, log_level="warning", dataloader_num_workers=0,
        ddp_find_unused_parameters=False, dataset_num_proc=None,
    )


def sid_sft_trainer_class():
    """``SFTTrainer`` whose loss is the model's own forward with labels.

    TRL 1.x computes the loss with a fused LM head that reads ``lm_head.weight``
    directly, bypassing PEFT's wrapper on ``lm_head``: the trainable SID rows of the
    output layer would get no gradient. The plain forward goes through the wrapper.
    """
    from transformers import Trainer
    from trl import SFTTrainer

    class SidSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    return SidSFTTrainer


#: HF log keys -> rayrec metric names (the Ray result, MLflow and the tuner read these).
METRIC_NAMES = {"loss": "train/loss", "learning_rate": "train/lr", "grad_norm": "train/grad_norm",
                "eval_loss": "val/loss", "train_samples_per_second": "train/samples_per_s",
                "train_loss": "train/mean_loss"}
VAL_LOSS = "val/loss"  # mode: min


def renamed(logs: dict[str, Any]) -> dict[str, float]:
    return {METRIC_NAMES[k]: float(v) for k, v in logs.items() if k in METRIC_NAMES}


def make_callbacks(tracker, meta: dict[str, Any], sid_index: dict[str, list[str]], rename=renamed):
    """Two ``TrainerCallback``s: rayrec metric names (+ MLflow on rank 0), and checkpoint metadata.

    Metric names are added to ``state.log_history`` so ``RayTrainReportCallback``
    (which follows these in the callback list) reports ``val/loss`` and friends.
    """
    from transformers import TrainerCallback

    class Names(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stopping.check()  # a signal stops the run here, between optimizer steps

        def on_log(self, args, state, control, logs=None, **kwargs):
            named = rename(logs or {})
            if state.log_history:
                state.log_history[-1].update(named)
            if state.is_world_process_zero and named:
                tracker.log_metrics({**named, "epoch": float(state.epoch or 0)}, step=state.global_step)

    class Meta(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                ckpt.mkdir(parents=True, exist_ok=True)
                (ckpt / META_FILE).write_text(json.dumps({**meta, "global_step": state.global_step}, indent=2))
                (ckpt / SID_FILE).write_text(json.dumps(sid_index))

    return [Names(), Meta()]


def build_trainer(cfg, model, tokenizer, new_ids: list[int], train_rows, eval_rows, output_dir, *,
                  use_gpu: bool, deepspeed: dict | None, callbacks: list):
    """The LoRA SFT trainer over prompt/completion rows (lists of dicts or HF datasets)."""
    from datasets import Dataset
    from transformers import PrinterCallback

    def as_dataset(rows):
        if rows is None or isinstance(rows, Dataset):
            return rows
        return Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])

    args = sft_args(cfg, output_dir, use_gpu=use_gpu, deepspeed=deepspeed, has_eval=eval_rows is not None)
    trainer_cls = sid_sft_trainer_class()
    trainer = trainer_cls(model=model, args=args, train_dataset=as_dataset(train_rows),
                          eval_dataset=as_dataset(eval_rows), processing_class=tokenizer,
                          peft_config=lora_config(model, cfg.train.lora, new_ids), callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # a dict per log step; rayrec's console shows each epoch
    return trainer


def load_for_eval(adapter_dir: str | Path, *, device: str = "cpu", dtype: torch.dtype | None = None,
                  merge: bool = False):
    """(model, tokenizer, meta) from a checkpoint: base -> extended tokenizer -> resize -> adapter.

    The tokenizer comes from the checkpoint (it holds the SID tokens); the embeddings are
    resized to the row count recorded at training before the adapter is loaded.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_dir = Path(adapter_dir)
    meta_path = adapter_dir / META_FILE
    if not meta_path.is_file():
        raise RayrecError(f"{adapter_dir}: not a rayrec SFT checkpoint (no {META_FILE}); pass the folder that "
                          "holds adapter_model.safetensors and genrec.json (`rayrec sft` prints it)")
    meta = json.loads(meta_path.read_text())
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    tokenizer = load_tokenizer(adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(meta["base"], dtype=dtype)
    if len(tokenizer) > meta["embedding_rows"]:
        raise RayrecError(f"{adapter_dir}: tokenizer has {len(tokenizer)} tokens but training used "
                          f"{meta['embedding_rows']} embedding rows; the checkpoint is inconsistent")
    resize_embeddings(base, meta["embedding_rows"], mean_init=False)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    if merge:
        model = model.merge_and_unload()
    return model.to(device).eval(), tokenizer, meta
