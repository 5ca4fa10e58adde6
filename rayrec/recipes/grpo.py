"""The ``grpo`` recipe: GRPO of an SFT adapter with recommendation rewards (TRL ``GRPOTrainer`` + PEFT).

prepare: the SFT adapter (its base, LoRA config and SID index, each checked against the
         job), the dataset, prompt tables of the item tasks, the reward inputs (item text
         embeddings for ``semantic``; the SASRec checkpoint checked for ``collaborative``),
         the DeepSpeed config. Every mistake is reported here, before a worker starts.
worker:  each Ray Train worker loads base + SFT adapter (trainable) and runs the GRPO
         trainer; ``prepare_trainer`` and ``RayTrainReportCallback`` as in the SFT recipe.
         Every ``train.save_steps`` a checkpoint is written and the first ``train.val_rows``
         valid rows are ranked by constrained beam search (val/hr@K, val/ndcg@K).
local:   the same trainer in this process; checkpoints under ``run_dir/checkpoints``.
outcome: the checkpoint best by ``cfg.selection_metric``; its ``checkpoint/`` folder is an
         adapter that `rayrec eval-genrec` (and ``--eval``) loads like an SFT one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayrec.config.genrec import GRPOJobConfig
from rayrec.config.loader import dump_job
from rayrec.errors import ConfigError
from rayrec.genrec.inputs import (
    GenRecInputs,
    canonical_targets,
    fit_inputs,
    log_inputs,
    prepare_inputs,
    prompt_tokenizer,
)
from rayrec.recipes import sft as S
from rayrec.runs import Outcome, Recipe, Run, TrainerParts, run_checkpoint
from rayrec.secrets import redact_uri
from rayrec.train.checkpoint import seed_everything
from rayrec.workers import hf as H

#: GRPO log keys kept under train/ (besides loss, lr, grad norm)
GRPO_KEYS = ("reward", "reward_std", "frac_reward_zero_std", "kl", "entropy", "step_time", "num_tokens")
GRPO_PREFIXES = ("rewards/", "completions/", "rollout/", "clip_ratio/")

log = logging.getLogger(__name__)


def renamed(logs: dict[str, Any]) -> dict[str, float]:
    """TRL's GRPO log keys -> rayrec names (``kl`` -> ``train/kl``, ``rewards/rule/mean`` -> ``train/rewards/...``)."""
    from rayrec.genrec.lm import METRIC_NAMES

    out = {}
    for k, v in logs.items():
        if not isinstance(v, int | float) or isinstance(v, bool):
            continue
        if k in METRIC_NAMES:
            out[METRIC_NAMES[k]] = float(v)
        elif k in GRPO_KEYS or k.startswith(GRPO_PREFIXES):
            out[f"train/{k}"] = float(v)
    return out


@dataclass
class Inputs:
    data: GenRecInputs
    adapter: dict[str, Any]  # read_adapter: genrec.json + path + LoRA config
    base: str
    deepspeed: dict | None
    embeddings: Any  # [N + 1, D] for the semantic reward, else None
    collaborative: str | None = None  # the checked SASRec checkpoint folder (absolute) for the collaborative reward
    job: str = ""  # the resolved job (``dump_job``), kept in every checkpoint's genrec.json

    def loop_config(self, run: Run) -> dict[str, Any]:
        tracker = run.tracker
        return {"adapter": self.adapter["path"], "deepspeed": self.deepspeed, "embeddings": self.embeddings,
                "sid_index": {k: list(v) for k, v in self.data.index.tokens.items()},
                "item_sids": self.data.item_sids, "run_name": run.dir.name, "num_items": self.data.ds.num_items,
                "items": self.data.ds.table("items")[["item_idx", "source_id"]], "collaborative": self.collaborative,
                "meta": {"config": self.job, "base": self.base, "data": str(self.data.ds.path.resolve()), "stage": "grpo",
                         "sft_adapter": self.adapter["path"], "sids_source": self.data.index.source,
                         "mlflow_run_id": tracker.run_id, "tracking_uri": redact_uri(tracker.uri)}}


def prepare(cfg: GRPOJobConfig, run: Run) -> Inputs:
    from rayrec.genrec import grpo as G
    from rayrec.genrec.lm import SID_FILE, resolve_deepspeed
    from rayrec.genrec.semantic_ids import read_index

    deepspeed = resolve_deepspeed(cfg.train.deepspeed)
    adapter = G.read_adapter(run_checkpoint(cfg.grpo.adapter))
    base = G.check_base(cfg.model.base, adapter)
    G.lora_settings(cfg.train.lora, adapter, base)
    data = prepare_inputs(cfg, index=read_index(Path(adapter["path"]) / SID_FILE))
    if canonical_targets(data):
        log.info("sids.shared=share: targets of shared SIDs are scored as the item their SID names")
    tokenizer = prompt_tokenizer(cfg, data, base=adapter["path"])  # the adapter's, SID tokens included
    fit_inputs(cfg, data, tokenizer, answer_tokens=max(len(s) for s in data.item_sids.values()) + 1)
    distinct = len(set(data.item_sids.values()))  # items a decoded SID can name
    if cfg.grpo.rollout == "beam" and cfg.grpo.num_generations > distinct:
        raise ConfigError(f"grpo.num_generations={cfg.grpo.num_generations} with rollout beam needs that many "
                          f"distinct items, but the index has {distinct} distinct SIDs; lower grpo.num_generations")
    weights = cfg.grpo.rewards.weights()
    embeddings = G.item_embeddings(data.ds.table("items"), cfg.sids) if "semantic" in weights else None
    collaborative = None
    if "collaborative" in weights:  # the user's train history up to the SASRec's window, for every row
        found = run_checkpoint(cfg.grpo.collaborative_checkpoint)  # a finished run's folder: its best checkpoint
        _, max_len = G.load_collaborative(found, data.ds.table("items"))
        collaborative = str(Path(found).expanduser().resolve())  # workers load it by this (their cwd differs)
        data.train["cf_history"] = G.collaborative_histories(data.train, data.ds.table("train"), max_len)
    run.dir.mkdir(parents=True, exist_ok=True)
    return Inputs(data, adapter, base, deepspeed, embeddings, collaborative, dump_job(cfg))


def share(cfg: GRPOJobConfig) -> None:
    """A sweep: the dataset, and the adapter checked once (all trials continue it)."""
    from rayrec.data.dataset import ensure_prepared
    from rayrec.genrec.grpo import check_base, read_adapter

    ensure_prepared(cfg.data)
    check_base(cfg.model.base, read_adapter(run_checkpoint(cfg.grpo.adapter)))


def record(tracker, inputs: Inputs) -> None:
    log_inputs(tracker, inputs.data)
    tracker.set_tags({"rayrec.sft_adapter": inputs.adapter["path"],
                      "rayrec.sft_run": inputs.adapter.get("mlflow_run_id") or ""})


# ----------------------------------------------------------------------------- the trainer


def reward_context(cfg: GRPOJobConfig, loop: dict[str, Any]):
    from rayrec.genrec.rewards import RewardContext, sasrec_scorer

    ctx = RewardContext(embeddings=loop.get("embeddings"))
    if "collaborative" in cfg.grpo.rewards.weights():
        from rayrec.genrec.grpo import load_collaborative

        model, max_len = load_collaborative(loop["collaborative"], loop["items"], check=False)  # checked in prepare
        ctx.scorer = sasrec_scorer(model, max_len)
    return ctx


def make_trainer(cfg: GRPOJobConfig, loop: dict[str, Any], tracker, train_rows, valid_rows, output_dir, *,
                 use_gpu: bool, show: bool, extra_callbacks: list):
    """Policy, trie, rewards and callbacks -> the GRPO trainer (same in workers and locally)."""
    from rayrec.genrec.constrained import build_trie
    from rayrec.genrec.evaluate import val_ranking_callback
    from rayrec.genrec.grpo import build_trainer, load_policy
    from rayrec.genrec.lm import make_callbacks, pick_dtype

    model, tokenizer, _ = load_policy(loop["adapter"], dtype=pick_dtype(cfg.model.dtype, use_gpu))
    item_sids = loop["item_sids"]
    trie = build_trie(tokenizer, item_sids)
    meta = {**loop["meta"], "embedding_rows": int(model.get_input_embeddings().weight.shape[0])}
    callbacks = make_callbacks(tracker, meta, loop["sid_index"], rename=renamed)
    if cfg.train.val_rows and valid_rows:
        callbacks.append(val_ranking_callback(valid_rows[: cfg.train.val_rows], item_sids, tokenizer, cfg, tracker,
                                              on="save"))
    if show:
        callbacks.append(H.console_callback(line_on="save"))
    return build_trainer(cfg, model, tokenizer, train_rows, output_dir, trie=trie, item_sids=item_sids,
                         ctx=reward_context(cfg, loop), use_gpu=use_gpu, deepspeed=loop.get("deepspeed"),
                         callbacks=callbacks + extra_callbacks, max_prompt_tokens=cfg.model.max_length - trie.max_len)


def local(cfg: GRPOJobConfig, inputs: Inputs, run: Run) -> Outcome:
    import datasets

    datasets.disable_progress_bars()
    if inputs.deepspeed is not None:
        H.single_process_group()
    loop = inputs.loop_config(run)
    seed_everything(cfg.run.seed)  # as on Ray (setup_hf_worker): the same run from the same seed
    trainer = make_trainer(cfg, loop, run.tracker, inputs.data.train.to_dict("records"),
                           inputs.data.valid.to_dict("records"), run.dir / "checkpoints", use_gpu=False,
                           show=run.console, extra_callbacks=[])
    trainer.train(resume_from_checkpoint=run.resume_from)
    history: dict[str, float] = {}
    for entry in trainer.state.log_history:
        history.update(renamed(entry) | {k: v for k, v in entry.items() if k.startswith(("val/", "test/"))})
    adapter = H.best_local(trainer.state.log_history, run.dir / "checkpoints", *cfg.selection_metric)
    metrics = summary({k: float(v) for k, v in history.items() if "/" in k}
                      | H.chosen_metrics(trainer.state.log_history, adapter))
    return Outcome(metrics, run.dir, adapter, run.tracker.run_id)


def grpo_worker(config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker."""
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer

    w = H.setup_hf_worker(config, GRPOJobConfig, "grpo")
    trainer = make_trainer(w.cfg, config, w.tracker, H.dataset_rows(S.TRAIN_KEY), H.dataset_rows(S.VALID_KEY),
                           w.output_dir, use_gpu=w.cfg.scaling.use_gpu, show=w.show,
                           extra_callbacks=[RayTrainReportCallback()])
    H.train_resuming(prepare_trainer(trainer), config.get("resume_from"))


def trainer_parts(cfg: GRPOJobConfig, inputs: Inputs, run: Run) -> TrainerParts:
    """Prompt tables as lazy Parquet reads from the run folder, as in the SFT recipe."""
    import os

    import ray.data
    import ray.train

    folder = run.dir / "prompts"
    columns = ["prompt", "target", "history", *(["cf_history"] if "cf_history" in inputs.data.train else [])]
    datasets = {S.TRAIN_KEY: ray.data.read_parquet(H.write_table(inputs.data.train[columns],
                                                                 folder / "train.parquet"))}
    if cfg.train.val_rows:
        datasets[S.VALID_KEY] = ray.data.read_parquet(H.write_table(
            inputs.data.valid.head(cfg.train.val_rows)[["prompt", "completion", "target"]], folder / "valid.parquet"))
    metric, mode = cfg.selection_metric
    opts = ray.train.DataConfig.default_ingest_options()
    opts.preserve_order = True
    return TrainerParts(
        loop=grpo_worker, config=inputs.loop_config(run), datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=[], execution_options=opts), score=(metric, mode),
        env={"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"), "TOKENIZERS_PARALLELISM": "false",
             "TRL_EXPERIMENTAL_SILENCE": "1"},
    )


#: TRL's detail kept in MLflow but not in the final table (clip ratios, length extremes, token counts)
DETAIL = ("clip_ratio/", "_length", "num_tokens", "/std", "step_time", "samples_per_s", "mean_loss")


def summary(metrics: dict[str, float]) -> dict[str, float]:
    """The final table's metrics: rayrec names, without TRL's detail (mean completion length stays)."""
    keep = {k: v for k, v in metrics.items() if k.startswith(("train/", "val/", "test/"))}
    return {k: v for k, v in keep.items() if k.endswith("mean_length") or not any(d in k for d in DETAIL)}


def outcome(cfg: GRPOJobConfig, result, run: Run) -> Outcome:
    """The SFT recipe's (best checkpoint by the selection metric), with the summary's metrics."""
    out = S.outcome(cfg, result, run)
    out.metrics = summary(out.metrics)
    return out


def console_keys(cfg: GRPOJobConfig) -> list[str]:
    metric, _ = cfg.selection_metric
    k = metric.partition("@")[2]
    return ["train/reward", "train/kl", *([f"val/ndcg@{k}", f"val/hr@{k}"] if k else [])]


RECIPE = Recipe(
    name="grpo", prepare=prepare, record=record, local=local, trainer=trainer_parts, outcome=outcome,
    console_keys=console_keys, share=share,
    curves=("train/reward", "train/kl", "train/frac_reward_zero_std", "val/ndcg@10", "val/hr@10"),
    tags=lambda cfg: {"rayrec.model": "genrec-grpo", "rayrec.base": cfg.model.base},
    checkpoint_label="adapter",
)
