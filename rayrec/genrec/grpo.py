"""GRPO parts: the policy continued from an SFT adapter, its frozen reference, TRL's trainer.

The policy is the base model (resized to the adapter's rows) with the SFT adapter loaded
trainable: LoRA and the SID token rows go on training from where SFT left them; every base
weight stays bit-identical. TRL's ``GRPOTrainer`` does the rest (groups, advantages, KL,
logging). Each generation is used for one optimisation pass (``num_iterations`` 1,
``steps_per_generation`` = ``grad_accum``), so TRL's old log-probs are the current ones: the
importance ratio is 1 and the objective is the group-advantage policy gradient with KL to
the SFT policy (PPO clipping and GSPO's sequence-level ratio would change nothing, so the
job refuses ``importance_sampling_level: sequence``). Four changes, each for a reason
found in testing:

* **Log-probs through the model's own forward.** TRL's fused LM-head path reads
  ``lm_head.weight``/``lm_head.bias`` directly; PEFT's trainable-token wrapper on
  ``lm_head`` has no ``bias`` (the run crashes) and the fused path would bypass the trained
  SID rows anyway. ``_get_per_token_logps_and_entropies`` here runs the PEFT model.
* **The reference is the whole SFT adapter.** For a pretrained adapter TRL adds a second
  adapter ``ref`` and copies the parameters named ``.default.`` into it; the trainable SID
  rows are named ``...trainable_tokens_delta.default`` (no trailing dot) and were left at
  their initial values, so the reference was not the SFT model (KL 0.33 before any update).
  ``sync_reference`` copies every parameter of ``default`` and freezes ``ref``: KL is exactly
  0 at step 0, and no second copy of the base model exists (``beta: 0`` builds no ``ref``).
* **Rows reach the rollouts.** TRL hands ``rollout_func`` the prompt strings only; the
  trainer keeps the current batch's rows so rollouts read each row's target (``add_gt``,
  dynamic sampling) from its own columns, never by looking up the prompt text.
* **Mixed rewards weigh what they say.** With several rewards, each is standardised within
  its group (``rewards.standardise_groups``: exact, a flat group gets 0) before TRL's
  ``normalize_then_sum`` weights and sums them; TRL's own per-reward step divides by
  std + 1e-4, which shrinks a reward that spreads ~1e-3 (the collaborative probability) by
  10 %. A single reward with ``scale_rewards: group`` is standardised the same way. The logged
  ``rewards/<name>/mean`` stay the raw rewards.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from rayrec.errors import ConfigError, RayrecError
from rayrec.genrec import rewards as R
from rayrec.genrec.lm import META_FILE, SID_FILE, pick_dtype, resize_embeddings

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
#: job field -> PEFT adapter_config.json field
LORA_FIELDS = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "target_modules": "target_modules"}


# ----------------------------------------------------------------------------- the SFT adapter


def read_adapter(path: Path | None) -> dict[str, Any]:
    """The SFT checkpoint's metadata (``genrec.json``) and LoRA config, or a clear error."""
    if path is None:
        raise ConfigError("grpo.adapter is not set: give the SFT run folder (its best adapter is used, e.g. "
                          "grpo.adapter=runs/genrec_tiny) or the checkpoint folder printed by `rayrec sft`")
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ConfigError(f"grpo.adapter {path}: no such folder; run the SFT job first (e.g. `rayrec sft "
                          "jobs/genrec_tiny.yaml` for jobs/genrec_tiny_grpo.yaml) and give its run folder or the "
                          "checkpoint folder it prints")
    missing = [f for f in (META_FILE, SID_FILE, ADAPTER_CONFIG) if not (path / f).is_file()]
    if missing:
        raise ConfigError(f"grpo.adapter {path}: not a rayrec SFT checkpoint (missing {', '.join(missing)}); give "
                          "the folder that holds adapter_model.safetensors and genrec.json")
    meta = json.loads((path / META_FILE).read_text())
    return {**meta, "path": str(path.resolve()), "lora": json.loads((path / ADAPTER_CONFIG).read_text())}


def check_base(job_base: str, adapter: dict[str, Any]) -> str:
    """The base the adapter was trained on; a job naming another base is an error."""
    trained = adapter["base"]
    if job_base != "tiny" and job_base != trained and Path(job_base).expanduser().resolve() != Path(trained).resolve():
        raise ConfigError(f"model.base={job_base!r} but the SFT adapter {adapter['path']} was trained on "
                          f"{trained!r}; GRPO continues that adapter on its own base (drop model.base or set it "
                          f"to {trained!r})")
    return trained


def lora_settings(job_lora, adapter: dict[str, Any], base: str):
    """``train.lora`` checked against the adapter's (equal, field by field), or read from it."""
    from rayrec.config.genrec import LoraSettings
    from rayrec.genrec.inputs import check_targets

    cfg = adapter["lora"]
    trained_targets = sorted(cfg.get("target_modules") or [])
    from_adapter = LoraSettings(r=cfg["r"], alpha=cfg["lora_alpha"], dropout=cfg["lora_dropout"],
                                target_modules=trained_targets)
    if job_lora is None:
        return from_adapter
    for field, key in LORA_FIELDS.items():
        want = getattr(job_lora, field)
        if field == "target_modules":
            want = sorted(check_targets(base, want))
        have = trained_targets if field == "target_modules" else cfg[key]
        if (want != have) if field == "target_modules" else not math.isclose(float(want), float(have)):
            raise ConfigError(f"train.lora.{field}={want} but the SFT adapter {adapter['path']} has {field}={have}; "
                              f"GRPO continues training that adapter, so its LoRA config cannot change (drop "
                              f"train.lora, or set train.lora.{field}={have})")
    return from_adapter


def load_policy(adapter_dir: str | Path, *, dtype: torch.dtype, trainable: bool = True):
    """(PEFT model, tokenizer, meta): base -> tokenizer of the adapter -> resize -> SFT adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rayrec.genrec.lm import load_tokenizer

    adapter_dir = Path(adapter_dir)
    meta = json.loads((adapter_dir / META_FILE).read_text())
    tokenizer = load_tokenizer(adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(meta["base"], dtype=dtype)
    resize_embeddings(base, meta["embedding_rows"], mean_init=False)
    base.config.use_cache = False
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable)
    return model, tokenizer, meta


def sync_reference(model) -> int:
    """Copy every parameter of adapter ``default`` into adapter ``ref`` and freeze ``ref``; return the count.

    Covers the LoRA matrices (``.default.``) and the trainable SID rows (``...delta.default``).
    Under ZeRO-3 the parameters are gathered for the copy.
    """
    params = dict(model.named_parameters())
    copied = 0
    for name, p in params.items():
        parts = name.split(".")
        if "default" not in parts:
            continue
        ref_name = ".".join("ref" if x == "default" else x for x in parts)
        if ref_name not in params:
            raise RayrecError(f"reference adapter has no parameter {ref_name} (copy of {name})")
        ref = params[ref_name]
        with _gathered([p, ref]):
            ref.data.copy_(p.data)
        ref.requires_grad_(False)
        copied += 1
    return copied


def _gathered(params):
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    import contextlib

    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- TRL


def grpo_trainer_class():
    """``GRPOTrainer`` with the changes of the module docstring."""
    from trl import GRPOTrainer
    from trl.trainer.utils import entropy_from_logits, nanstd, selective_log_softmax

    class SidGRPOTrainer(GRPOTrainer):
        rollout_rows: list[dict] = []

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if self.beta != 0.0:
                sync_reference(self.model)

        def _generate_and_score_completions(self, inputs):
            self.rollout_rows = inputs
            self._raw_rewards = None
            mode = "train" if self.model.training else "eval"  # as TRL decides it, at the start
            out = super()._generate_and_score_completions(inputs)
            if self._raw_rewards is not None:  # log the raw rewards, not their group z-scores
                self._log_raw(self._raw_rewards, mode)
            return out

        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            """Each reward standardised within its group (exact std; a flat group 0), so neither TRL's
            ``normalize_then_sum`` nor its per-group scaling of one reward divides a small spread by
            std + 1e-4; TRL's own step then divides unit spreads by 1 + 1e-4, the same for every group."""
            raw = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            one_per_group = len(self.reward_funcs) == 1 and self.scale_rewards == "group"
            per_group = self.multi_objective_aggregation == "normalize_then_sum" or one_per_group
            if not per_group:
                return raw
            self._raw_rewards = raw
            z = R.standardise_groups(raw.detach().cpu().numpy(), self.num_generations)
            return torch.as_tensor(z, dtype=raw.dtype, device=raw.device)

        def _log_raw(self, raw, mode: str):
            metrics = self._metrics[mode]
            weights = self.reward_weights.to(raw.device)
            for i, name in enumerate(self.reward_func_names):
                col = raw[:, i]
                metrics[f"rewards/{name}/mean"][-1] = torch.nanmean(col).item()
                metrics[f"rewards/{name}/std"][-1] = nanstd(col).item()
            total = (raw * weights.unsqueeze(0)).nansum(dim=1)
            total[torch.isnan(raw).all(dim=1)] = torch.nan
            metrics["reward"][-1] = torch.nanmean(total).item()
            metrics["reward_std"][-1] = nanstd(total).item()

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                               batch_size=None, compute_entropy=False, compute_aux_loss=False,
                                               **_):
            batch_size = batch_size or input_ids.size(0)
            logps, entropies = [], []
            for start in range(0, input_ids.size(0), batch_size):
                ids, mask = input_ids[start : start + batch_size], attention_mask[start : start + batch_size]
                positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding, as in generate
                with self.accelerator.autocast():
                    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                                   logits_to_keep=logits_to_keep + 1).logits
                logits = logits[:, :-1].float() / self.temperature
                logps.append(selective_log_softmax(logits, ids[:, -logits_to_keep:]))
                if compute_entropy:
                    with torch.no_grad():
                        entropies.append(entropy_from_logits(logits))
            return torch.cat(logps), (torch.cat(entropies) if compute_entropy else None), None

    return SidGRPOTrainer


def grpo_args(cfg, output_dir: str | Path, *, use_gpu: bool, deepspeed: dict | None, completion_len: int):
    """TRL ``GRPOConfig`` from the job (``cfg``: ``GRPOJobConfig``)."""
    from trl import GRPOConfig

    t, g = cfg.train, cfg.grpo
    bf16 = pick_dtype(cfg.model.dtype, use_gpu) == torch.bfloat16
    return GRPOConfig(
        output_dir=str(output_dir), num_train_epochs=t.epochs, max_steps=t.max_steps or -1,
        per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum, learning_rate=t.lr,
        weight_decay=t.weight_decay, warmup_steps=t.warmup_ratio, lr_scheduler_type=t.scheduler,
        max_grad_norm=t.max_grad_norm, gradient_checkpointing=t.gradient_checkpointing, bf16=bf16,
        use_cpu=not use_gpu, deepspeed=deepspeed, seed=cfg.run.seed, data_seed=cfg.run.seed,
        logging_steps=t.logging_steps, logging_first_step=True, save_strategy="steps", save_steps=t.save_steps,
        save_total_limit=t.save_total_limit, eval_strategy="no", report_to=[], disable_tqdm=True,
        log_level="warning", dataloader_num_workers=0, ddp_find_unused_parameters=False,
        num_generations=g.num_generations, beta=g.beta, loss_type=g.loss_type,
        importance_sampling_level=g.importance_sampling_level, scale_rewards=g.scale_rewards,
        reward_weights=list(g.rewards.weights().values()), max_completion_length=completion_len,
        multi_objective_aggregation=aggregation(cfg), num_iterations=1,
        temperature=g.temperature if g.rollout == "sample" else 1.0, disable_dropout=True,
        remove_unused_columns=False, log_completions=False, shuffle_dataset=True,
    )


def aggregation(cfg) -> str:
    """TRL's ``multi_objective_aggregation``: several rewards are standardised per group before the
    weights apply (``grpo.reward_mixing``); one reward is plain GRPO (``scale_rewards`` applies)."""
    several = len(cfg.grpo.rewards.weights()) > 1
    return "normalize_then_sum" if several and cfg.grpo.reward_mixing == "normalize_then_sum" else "sum_then_normalize"


def make_rollout(cfg, trie, tokenizer, item_sids: dict[int, tuple[str, ...]], max_prompt_tokens: int):
    """TRL ``rollout_func``: whole groups per prompt from ``rollouts.generate_groups``."""
    from trl.models.utils import unwrap_model_for_generation

    from rayrec.genrec.rollouts import generate_groups, inject_target

    g = cfg.grpo
    vocab = tokenizer.get_vocab()
    target_ids = {i: [vocab[t] for t in sids] + [tokenizer.eos_token_id] for i, sids in item_sids.items()}

    def rollout(prompts: list[str], trainer) -> dict[str, Any]:
        size = trainer.num_generations
        rows = trainer.rollout_rows
        if len(rows) != len(prompts) or len(prompts) % size:
            raise RayrecError(f"rollout got {len(prompts)} prompts for {len(rows)} rows; expected whole groups "
                              f"of {size}")
        firsts = list(range(0, len(prompts), size))
        for s in firsts:
            if any(prompts[s + k] != prompts[s] for k in range(size)):
                raise RayrecError("a group of completions spans several prompts; train.batch_size x grad_accum "
                                  "must be a multiple of grpo.num_generations")
        targets = [int(rows[s]["target"]) for s in firsts]
        model = trainer.model_wrapped
        chunk = max(1, cfg.eval.batch_size)  # prompts per generate call: memory bounded whatever grad_accum is
        groups = []
        with unwrap_model_for_generation(  # the checkpointing kwargs: TRL forces reentrant ones (PEFT + ZeRO-3)
                model, trainer.accelerator, gather_deepspeed3_params=trainer.args.ds3_gather_for_generation,
                gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs) as unwrapped:
            was_training = unwrapped.training
            unwrapped.eval()
            for c in range(0, len(firsts), chunk):
                part = firsts[c : c + chunk]
                groups += generate_groups(unwrapped, tokenizer, [prompts[s] for s in part], trie, size=size,
                                          mode=g.rollout, constrained=g.constrained, temperature=g.temperature,
                                          dynamic=g.dynamic_sampling, targets=targets[c : c + chunk],
                                          max_prompt_tokens=max_prompt_tokens)
            unwrapped.train(was_training)
        had_target = [t in grp.items for grp, t in zip(groups, targets)]  # before add_gt puts it in
        if g.add_gt:
            groups = [inject_target(grp, t, target_ids[t]) for grp, t in zip(groups, targets)]
        prompt_ids = tokenizer([prompts[s] for s in firsts], truncation=True, max_length=max_prompt_tokens)["input_ids"]
        out: dict[str, list] = {"prompt_ids": [], "completion_ids": [], "logprobs": [], "item": [], "rank": []}
        for grp, p_ids, has in zip(groups, prompt_ids, had_target):
            ranks = R.distinct_ranks(grp.items)  # copies of one sampled item share its rank
            for pos in range(size):
                out["prompt_ids"].append(list(p_ids))
                out["completion_ids"].append(grp.completion_ids[pos])
                out["logprobs"].append(grp.logprobs[pos])
                out["item"].append(-1 if grp.items[pos] is None else int(grp.items[pos]))
                out["rank"].append(ranks[pos])
            valid = [i for i in grp.items if i is not None]
            trainer._log_metric("rollout/distinct_items", len(set(valid)) / size)
            trainer._log_metric("rollout/invalid", (size - len(valid)) / size)
            trainer._log_metric("rollout/group_has_target", float(has))
            trainer._log_metric("rollout/injected_target", float(any(grp.injected)))
        return out

    return rollout


def make_rewards(cfg, ctx: R.RewardContext) -> list:
    """TRL reward functions, one per reward that is on (named, so TRL logs ``rewards/<name>/mean``)."""
    size = cfg.grpo.num_generations

    def one(name: str):
        def reward(prompts, completions, completion_ids, item, target, history, rank=None, cf_history=None, **_):
            items = [None if int(i) < 0 else int(i) for i in item]
            if name == "collaborative":  # the user's train history up to the SASRec's max_len, not the prompt's
                if cf_history is None:
                    raise RayrecError("the collaborative reward needs each row's cf_history (the recipe adds it)")
                history = cf_history
            return R.score(name, items, [int(t) for t in target], history, size, ctx, ranks=rank)

        reward.__name__ = name
        return reward

    return [one(name) for name in cfg.grpo.rewards.weights()]


def build_trainer(cfg, model, tokenizer, train_rows, output_dir, *, trie, item_sids, ctx: R.RewardContext,
                  use_gpu: bool, deepspeed: dict | None, callbacks: list, max_prompt_tokens: int):
    """The GRPO trainer over prompt rows (``prompt``, ``target``, ``history``; lists of dicts or an HF dataset)."""
    import os

    from datasets import Dataset
    from transformers import PrinterCallback

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is marked experimental in TRL 1.x
    if not isinstance(train_rows, Dataset):
        extra = ["cf_history"] if train_rows and "cf_history" in train_rows[0] else []
        train_rows = Dataset.from_list([{"prompt": r["prompt"], "target": int(r["target"]),
                                         "history": [int(i) for i in r["history"]],
                                         **{k: [int(i) for i in r[k]] for k in extra}} for r in train_rows])
    args = grpo_args(cfg, output_dir, use_gpu=use_gpu, deepspeed=deepspeed, completion_len=trie.max_len)
    trainer = grpo_trainer_class()(
        model=model, args=args, reward_funcs=make_rewards(cfg, ctx), train_dataset=train_rows,
        processing_class=tokenizer, callbacks=callbacks,
        rollout_func=make_rollout(cfg, trie, tokenizer, item_sids, max_prompt_tokens))
    trainer.remove_callback(PrinterCallback)
    return trainer


# ----------------------------------------------------------------------------- reward context


def item_embeddings(items, sids_cfg) -> Any:
    """[N + 1, D] L2-normalised text embeddings by item_idx (the encoder the SID index is built from)."""
    import numpy as np

    from rayrec.genrec.semantic_ids import embed_texts, item_texts

    emb = embed_texts(item_texts(items, sids_cfg.embedding.fields), sids_cfg.embedding.model,
                      sids_cfg.embedding.batch_size)
    out = np.zeros((int(items["item_idx"].max()) + 1, emb.shape[1]), dtype=np.float32)
    out[items["item_idx"].to_numpy()] = emb
    return out


def item_mapping(items) -> dict[int, str]:
    """item_idx -> the item's id in the raw data (``source_id``): what a model's item rows mean."""
    return {int(i): str(s) for i, s in zip(items["item_idx"], items["source_id"])}


def load_collaborative(path: Path | None, items, *, check: bool = True):
    """(sequential model in eval mode, max history length) from a `rayrec train` checkpoint (SASRec) trained
    on the same items (``items``: this job's items table); the model's ``score(history)`` gives the
    collaborative reward. A checkpoint whose item rows mean other items is refused, not only one of another
    size: its data's items table (the checkpoint's ``data.path``) must map every item_idx to the same item.
    ``check=False`` (Ray workers, whose working folder is not the driver's): the driver checked it, and
    ``path`` is the absolute checkpoint folder it resolved."""
    import yaml

    from rayrec.config.schema import JobConfig
    from rayrec.train.checkpoint import STATE_FILE, load_state
    from rayrec.train.specs import build_model

    if path is None:
        raise ConfigError("grpo.rewards.collaborative > 0 needs grpo.collaborative_checkpoint: the folder of a "
                          "SASRec checkpoint (state.pt) written by `rayrec train` on the same prepared data")
    path = Path(path).expanduser()
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"grpo.collaborative_checkpoint {path}: no {STATE_FILE}; give the folder of a finished "
                          "`rayrec train` run (runs/NAME) or one of its checkpoints (runs/NAME/final)")
    state = load_state(path)
    job = JobConfig.model_validate(yaml.safe_load(state["config"]))
    weights = state.get("best_model") or state["model"]
    emb = weights.get("item_emb.weight")
    if emb is None:
        raise ConfigError(f"grpo.collaborative_checkpoint {path}: a {job.model.name} checkpoint without item "
                          "embeddings; the collaborative reward needs a sequential model such as sasrec")
    num_items = int(items["item_idx"].max())
    if emb.shape[0] - 1 != num_items:
        raise ConfigError(f"grpo.collaborative_checkpoint {path}: trained on {emb.shape[0] - 1} items but this job's "
                          f"data has {num_items}; train the SASRec model on the same prepared data (data.path)")
    if check:
        check_items(path, job.data.path, items)
    model = build_model(job.model, num_items)
    model.load_state_dict(weights)
    return model.eval(), int(getattr(job.model, "max_len", 50))


def check_items(path: Path, data_path, items) -> None:
    """The SASRec checkpoint's items (its prepared data) are this job's, item_idx by item_idx."""
    from rayrec.data.dataset import open_prepared
    from rayrec.errors import DataError

    try:
        theirs = item_mapping(open_prepared(data_path).table("items"))
    except DataError as e:
        raise ConfigError(f"grpo.collaborative_checkpoint {path}: its prepared data ({data_path}) cannot be "
                          f"read, so its item mapping cannot be checked against this job's: {e}") from None
    ours = item_mapping(items)
    differ = sorted(i for i in ours if theirs.get(i) != ours[i])
    if differ:
        i = differ[0]
        raise ConfigError(f"grpo.collaborative_checkpoint {path}: its items mean other items than this job's "
                          f"({len(differ)} of {len(ours)} differ; item_idx {i} is {theirs.get(i)!r} there, "
                          f"{ours[i]!r} here); train the SASRec model on this job's prepared data (data.path)")


def collaborative_histories(rows, train, max_len: int) -> list[list[int]]:
    """Each prompt row's user history before its target in the train sequences (``pos``), the last
    ``max_len`` items (the SASRec's window); [] for rows without one (``title_to_sid``)."""
    seqs = {int(u): [int(i) for i in s] for u, s in zip(train["user_idx"], train["seq"])}
    out = []
    for user, pos in zip(rows["user_idx"], rows["pos"]):
        pos = int(pos)
        out.append(seqs[int(user)][max(0, pos - max_len):pos] if pos > 0 else [])
    return out
