"""`rayrec sft`, `rayrec grpo`, `rayrec eval-genrec` and `rayrec genrec sids|prompts|show|merge`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_commands(sub: argparse._SubParsersAction) -> None:
    _training_command(sub, "sft", cmd_sft, "LoRA SFT of a causal LM on semantic-ID prompts",
                      "jobs/genrec_tiny.yaml", "train.lr=1e-4 train.lora.r=8")
    _training_command(sub, "grpo", cmd_grpo, "GRPO of an SFT adapter with recommendation rewards",
                      "jobs/genrec_tiny_grpo.yaml", "grpo.adapter=PATH grpo.beta=0")

    e = sub.add_parser("eval-genrec", help="constrained beam-search evaluation of an SFT or GRPO checkpoint")
    e.add_argument("job", type=Path)
    e.add_argument("overrides", nargs="*")
    e.add_argument("--adapter", required=True, type=Path, help="checkpoint folder printed by `rayrec sft`")
    e.add_argument("--split", choices=["valid", "test"], help="default: eval.split of the job")
    e.add_argument("--local", action="store_true", help="decode in this process instead of Ray workers")
    e.add_argument("--out", type=Path, help="results JSON (default: next to the adapter)")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("genrec", help="semantic IDs, prompt datasets and result inspection")
    gsub = g.add_subparsers(dest="genrec_cmd", required=True, metavar="{sids,prompts,show,merge}")
    i = gsub.add_parser("sids", help="build (or check) the semantic-ID index of a job")
    i.add_argument("job", type=Path)
    i.add_argument("overrides", nargs="*")
    i.add_argument("--force", action="store_true", help="rebuild even if sids.dir already holds the index")
    i.set_defaults(func=cmd_sids)
    p = gsub.add_parser("prompts", help="count and print the prompt tasks of a job")
    p.add_argument("job", type=Path)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--show", type=int, default=1, help="examples printed per task")
    p.set_defaults(func=cmd_prompts)
    w = gsub.add_parser("show", help="print hits or misses of a results JSON")
    w.add_argument("results", type=Path)
    which = w.add_mutually_exclusive_group()
    which.add_argument("--correct", action="store_true", help="rows whose target was returned")
    which.add_argument("--incorrect", action="store_true", help="rows whose target was missed")
    w.add_argument("--limit", type=int, default=10)
    w.set_defaults(func=cmd_show)
    m = gsub.add_parser("merge", help="merge an adapter into its base and save a plain model folder")
    m.add_argument("--adapter", required=True, type=Path)
    m.add_argument("--out", required=True, type=Path)
    m.set_defaults(func=cmd_merge)


def _training_command(sub, name: str, func, what: str, job: str, overrides: str) -> None:
    """``rayrec sft`` and ``rayrec grpo``: the same arguments, a job kind each."""
    p = sub.add_parser(name, help=f"{what} (Ray Train, or --local)")
    p.add_argument("job", type=Path, help=f"job YAML, e.g. {job}")
    p.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {overrides}")
    p.add_argument("--local", action="store_true", help="train in this process without Ray")
    p.add_argument("--resume-from", help=f"{name.upper()} checkpoint folder to continue from")
    p.add_argument("--eval", action="store_true", help="evaluate the best adapter on eval.split afterwards")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="show Ray's and the workers' own output here too (else: rayrec.log in the run folder)")
    p.set_defaults(func=func)


def _job(args, *kinds: str):
    """The job file with overrides (one of ``kinds``, default any generative job); on a cluster its
    relative paths under the shared storage root."""
    from rayrec.cluster import shared_paths
    from rayrec.config.kinds import kind_named, load_job_file

    expect = tuple(kind_named(k) for k in kinds or ("genrec", "grpo"))
    return shared_paths(load_job_file(args.job, args.overrides, expect=expect))


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...], title: str) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))))
    print("-" * (sum(widths) + 2 * (len(widths) - 1)))
    for r in rows:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


def cmd_sids(args) -> int:
    from rayrec.data.dataset import ensure_prepared
    from rayrec.genrec.semantic_ids import describe_index, index_paths, load_or_build, write_built

    cfg = _job(args)
    items = ensure_prepared(cfg.data).table("items")
    built = cfg.sids.method in ("rq_kmeans", "rq_vae")
    existing = index_paths(cfg.sids.dir, cfg.sids.name)[0]
    if built and args.force:
        index, report = write_built(cfg.sids, items, cfg.run.seed)
    else:
        if built and existing.is_file():
            print(f"{existing} exists: checking it (pass --force to rebuild)")
        index, report = load_or_build(cfg.sids, items, cfg.run.seed)
    index.for_items(items)  # unknown / missing SIDs are errors here, not at training
    d = describe_index(index)
    rows = [("source", d["source"]), ("items", d["items"]), ("levels", d["levels"]),
            ("distinct codes per level", "/".join(map(str, d["distinct_codes"]))),
            ("collision rate (final)", f"{d['collision_rate']:.4f}")]
    shared = (report or {}).get("shared")
    if shared:
        rows += [("SIDs shared by several items (read)", shared["shared_sids"]),
                 ("items sharing them", shared["items_sharing"]), ("sids.shared", shared["policy"])]
        if shared.get("written"):
            rows.append(("disambiguated index", shared["written"]))
    if report and "usage" in report:
        rows += [("codebook usage per level", "/".join(f"{u:.2f}" for u in report["usage"])),
                 ("collision rate (raw)", f"{report['collision_rate_raw']:.4f}"),
                 ("after last-level reassign", f"{report['collision_rate_after_reassign']:.4f}"),
                 ("extra level added", str(report["extra_level"]))]
    _table(rows, ("", "value"), f"semantic IDs ({cfg.sids.method})")
    return 0


def cmd_prompts(args) -> int:
    from rayrec.genrec.inputs import fit_inputs, prepare_inputs, prompt_tokenizer

    cfg = _job(args)
    inputs = prepare_inputs(cfg)
    fit = fit_inputs(cfg, inputs, prompt_tokenizer(cfg, inputs))
    counts = inputs.train["task"].value_counts()
    rows = [(t, int(n), fit["train"].truncated.get(t, 0), fit["train"].dropped.get(t, 0)) for t, n in counts.items()]
    rows += [(t, 0, 0, n) for t, n in fit["train"].dropped.items() if t not in counts]
    rows.append(("valid (sid_seq)", len(inputs.valid), fit["valid"].total_truncated, fit["valid"].total_dropped))
    _table(rows, ("task", "examples", "history cut", "dropped"),
           f"training prompts (train split only; model.max_length={cfg.model.max_length} tokens)")
    for task, group in inputs.train.groupby("task"):
        for r in group.head(args.show).itertuples():
            print(f"\n=== {task} ===\n{r.prompt}{r.completion}")
    return 0


def cmd_sft(args) -> int:
    return _train(args, "genrec", "SFT")


def cmd_grpo(args) -> int:
    return _train(args, "grpo", "GRPO")


def _train(args, kind: str, label: str) -> int:
    from rayrec.recipes import recipe_for
    from rayrec.runs import print_outcome, run_job

    cfg = _job(args, kind)
    recipe = recipe_for(cfg)
    out = run_job(recipe, cfg, local=args.local, source=str(args.job), resume_from=args.resume_from,
                  verbose=args.verbose)
    print(f"\nevaluate: rayrec eval-genrec {args.job} --adapter {out.checkpoint}")
    print_outcome(recipe, out, f"final {label} metrics")
    code = _evaluate(cfg, Path(out.checkpoint), None, args.local, None, label) if args.eval and out.checkpoint else 0
    if cfg.export.name:
        from rayrec.cli.recs import export_at_end

        export_at_end(out.checkpoint, cfg)
    return code


def cmd_eval(args) -> int:
    return _evaluate(_job(args), args.adapter, args.split, args.local, args.out)  # a GRPO job evaluates its adapters


def _evaluate(cfg, adapter: Path, split: str | None, local: bool, out: Path | None, label: str = "model") -> int:
    from rayrec.genrec.evaluate import evaluate_adapter, metric_prefix, summary_rows

    split = split or cfg.eval.split
    res = evaluate_adapter(cfg, adapter, split=split, local=local, out=out)
    answers = "titles" if cfg.eval.task.endswith("_to_title") else "SIDs"
    _table(summary_rows(res.metrics, metric_prefix(split, cfg.eval.task), cfg.eval.ks), ("metric", label, "popularity"),
           f"{split} metrics of {cfg.eval.task}, beam search constrained to real {answers} "
           f"(num_beams={cfg.eval.num_beams})")
    print(f"\nresults: {res.results_path}")
    return 0


def cmd_show(args) -> int:
    from rayrec.genrec.evaluate import show_cases

    correct = True if args.correct else False if args.incorrect else None
    print("\n".join(show_cases(args.results, correct=correct, limit=args.limit)))
    return 0


def cmd_merge(args) -> int:
    from rayrec.genrec.lm import load_for_eval

    model, tokenizer, meta = load_for_eval(args.adapter, merge=True)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    (args.out / "genrec_merged_from.json").write_text(json.dumps({"adapter": str(args.adapter), **meta}, indent=2))
    print(f"merged model written to {args.out}")
    return 0
